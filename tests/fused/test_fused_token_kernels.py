"""The fused token-level kernels at the edges their shortcuts must get right, in both backends, against the
float64 spec on materialised logits: ties (the argmax's first maximum across column blocks, AKL's head cut
inside a run of equal probabilities, its always-included first token), a vocabulary with a short last
block, the DPOP form, and logits of magnitude 1e4 in float32."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from dpkd.backends.jax import _token_kernels as jk  # noqa: E402
from dpkd.backends.jax import fused_token as jft  # noqa: E402
from dpkd.backends.torch import _token_kernels as tk  # noqa: E402
from dpkd.backends.torch import fused_token as tft  # noqa: E402
from dpkd.conformance.testing import assert_close  # noqa: E402

V = 300  # blocks of 128 columns: two whole ones and a short last one


@pytest.mark.parametrize("vocab", [5, 127, 128, 255, 256, 300, 1000])
def test_argmax_rows_is_the_first_maximum(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.integers(0, 4, (40, vocab)).astype(np.float32)  # many ties, across blocks
    x[0] = 7.0  # a constant row: index 0
    x[1, -1] = 9.0  # the maximum in the last (short) block only
    expected = np.argmax(x, axis=1)  # NumPy's rule: the first maximal index
    assert np.array_equal(tk.argmax_rows(torch.from_numpy(x)).numpy(), expected)
    assert np.array_equal(np.asarray(jk.argmax_rows(jnp.asarray(x))), expected)


def _tied_case(refs, seed: int, n: int, *, groups: int, teacher_groups: int | None = None,
               teacher_scale: float = 1.0):
    """A case whose vocabulary rows repeat with period ``groups`` (student and teacher), so that logits,
    probabilities and argmaxes tie across the column blocks. Every entry is a small multiple of a power
    of two, so the logits are exact whatever order a GEMM sums in: the ties are exact in every backend
    and in the spec. ``teacher_scale`` (a power of two) sharpens the teacher."""
    teacher_groups = teacher_groups or groups
    case = refs.make_case(seed, (n,), 6, V, teacher_size=5, bias=False)
    rng = np.random.default_rng(seed + 100)
    case.hidden = rng.integers(-2, 3, case.hidden.shape) * 0.5
    case.teacher_hidden = rng.integers(-2, 3, case.teacher_hidden.shape) * 0.5
    case.weight = (rng.integers(-3, 4, (groups, 6)) * 0.25)[np.arange(V) % groups]
    teacher_rows = rng.integers(-3, 4, (teacher_groups, 5)) * 0.25 * teacher_scale
    case.teacher_weight = teacher_rows[np.arange(V) % teacher_groups]
    return case


CASES = {
    "dpkd": ("dpkd_token_loss", {"beta": 0.7}),
    "dpkd_smoothed": ("dpkd_token_loss", {"beta": 0.7, "label_smoothing": 0.2}),
    "dpkd_ipo_free": ("dpkd_token_loss", {"beta": 0.5, "form": "ipo", "reference_free": True}),
    "dpop": ("dpkd_token_loss", {"beta": 0.5, "form": "dpop", "lambda_": 3.0}),
    "forward_kl": ("forward_kl", {"temperature": 0.7}),
    "reverse_kl": ("reverse_kl", {"temperature": 1.3}),
    "jsd": ("generalized_jsd", {"beta": 0.3}),
    "jsd_end": ("generalized_jsd", {"beta": 1.0}),
    # μ off the values C_k takes here (sums of a few distinct masses): AKL jumps where C_k = μ
    "akl_low": ("akl", {"mu": 0.0517}),
    "akl": ("akl", {"mu": 0.4871, "temperature": 1.2}),
    "akl_high": ("akl", {"mu": 0.9133}),
    "cross_entropy": ("cross_entropy", {}),
}


def _call_torch(name, options, case, mask, dtype, reduction, chunk_size):
    dt = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    h = torch.from_numpy(case.hidden).to(dt).requires_grad_(True)
    w = torch.from_numpy(case.weight).to(dt).requires_grad_(True)
    if name == "cross_entropy":
        out = tft.fused_cross_entropy(h, w, torch.from_numpy(case.labels), reduction=reduction,
                                      chunk_size=chunk_size, **options)
    else:
        fn = getattr(tft, "fused_" + name)
        out = fn(h, w, torch.from_numpy(case.teacher_hidden).to(dt), torch.from_numpy(case.teacher_weight).to(dt),
                 torch.from_numpy(mask), reduction=reduction, chunk_size=chunk_size, **options)
    loss = out.loss if isinstance(out, tuple) else out
    grads = torch.autograd.grad(loss.sum(), (h, w))
    fields = {f: getattr(out, f).detach().double().numpy() for f in out._fields} if isinstance(out, tuple) else \
        {"loss": loss.detach().double().numpy()}
    assert all(g.dtype == dt for g in grads)  # gradients come back in the input's dtype
    return fields, [g.double().numpy() for g in grads]


@functools.cache
def _jax_program(name, options, dtype, reduction, chunk_size):
    """One jitted (value, outputs) and gradient program per loss, options, dtype, reduction and chunk: cases of
    the same shapes reuse it, so each is compiled once per module (the arrays are arguments, not constants)."""
    fn = jft.fused_cross_entropy if name == "cross_entropy" else getattr(jft, "fused_" + name)
    kwargs = dict(options, reduction=reduction, chunk_size=chunk_size)

    def scalar(h, w, th, tw, target):
        out = fn(h, w, target, **kwargs) if name == "cross_entropy" else fn(h, w, th, tw, target, **kwargs)
        return jnp.sum(getattr(out, "loss", out)), out

    return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True))


def _call_jax(name, options, case, mask, dtype, reduction, chunk_size):
    dt = getattr(jnp, dtype)
    program = _jax_program(name, tuple(sorted(options.items())), dtype, reduction, chunk_size)
    target = jnp.asarray(case.labels) if name == "cross_entropy" else jnp.asarray(mask)
    (_, out), grads = program(jnp.asarray(case.hidden, dt), jnp.asarray(case.weight, dt),
                              jnp.asarray(case.teacher_hidden, dt), jnp.asarray(case.teacher_weight, dt), target)
    fields = {f: np.asarray(getattr(out, f), np.float64) for f in out._fields} if isinstance(out, tuple) else \
        {"loss": np.asarray(out, np.float64)}
    assert all(g.dtype == dt for g in grads)
    return fields, [np.asarray(g.astype(jnp.float32) if g.dtype == jnp.bfloat16 else g, np.float64) for g in grads]


BACKENDS = {"torch": _call_torch, "jax": _call_jax}


def _check(refs, backend, key, case, dtype="float64", reduction="mean", chunk_size=40, gradients=True):
    name, options = CASES[key]
    mask = case.labels != refs.IGNORE
    exp, exp_grads = refs.token_loss(name, options, case, mask, reduction)
    fields, grads = BACKENDS[backend](name, options, case, mask, dtype, reduction, chunk_size)
    scale = max(1.0, float(np.max(np.abs(refs.logits_of(case.hidden, case.weight, None)))),
                float(np.max(np.abs(refs.logits_of(case.teacher_hidden, case.teacher_weight, None)))))
    for field, value in fields.items():
        expected = getattr(exp, field) if hasattr(exp, "_fields") else exp
        assert_close(value, expected, dtype=dtype, quantity="values", what=f"{backend} {key} {field}", scale=scale)
    for pname, g, e in zip(("hidden", "weight"), grads, exp_grads):
        assert float(np.max(np.abs(e))) > 0
        assert np.all(np.isfinite(g))
        if not gradients:
            continue
        assert_close(g, e, dtype=dtype, quantity="gradients", what=f"{backend} {key} grad {pname}")


def _grid(torch_keys, jax_keys):
    """(backend, key) pairs: every key in Torch (cheap), in JAX the keys whose kernel code the test targets
    (each JAX pair compiles once; conformance/test_fused_vs_spec.py runs every registry variant in both)."""
    return [("torch", k) for k in torch_keys] + [("jax", k) for k in jax_keys]


TIED_ROWS = 60  # one shape for every tied case: the JAX programs of a key are shared between the tests
# the keys whose JAX kernels see the ties: the first-maximum argmax (DPKD, DPOP) and AKL's head
JAX_TIE_KEYS = ["dpkd", "dpkd_ipo_free", "dpop", "akl_low", "akl", "akl_high"]


@pytest.mark.parametrize(("backend", "key"), _grid(list(CASES), JAX_TIE_KEYS))
def test_ties_across_blocks_equal_spec(refs, backend, key):
    case = _tied_case(refs, 1, TIED_ROWS, groups=23)
    _check(refs, backend, key, case, reduction="none" if key == "dpop" else "mean")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("key", ["akl_low", "akl", "akl_high"])
def test_akl_cut_inside_equal_probabilities(refs, backend, key):
    # a uniform teacher (every p = 1/V: one run of ties) and a teacher of 4 distinct values repeated (μ falls
    # inside a run): the spec's AKL tie rule places the cut
    _check(refs, backend, key, _tied_case(refs, 2, TIED_ROWS, groups=23, teacher_groups=1))
    _check(refs, backend, key, _tied_case(refs, 3, TIED_ROWS, groups=23, teacher_groups=4))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_akl_peaked_teacher_keeps_the_first_token(refs, backend):
    # p_max > μ: the head is the top token alone (C_1 > μ, but the first token always belongs to it)
    _check(refs, backend, "akl_low", _tied_case(refs, 4, TIED_ROWS, groups=37, teacher_scale=16.0))


LARGE_KEYS = ["dpkd", "dpop", "forward_kl", "reverse_kl", "jsd", "akl", "cross_entropy"]


@pytest.mark.parametrize(("backend", "key"), _grid(LARGE_KEYS, LARGE_KEYS))
def test_logits_of_size_1e4_in_float32(refs, backend, key):
    # both distributions nearly one-hot at unrelated tokens: log-probs of −1e4, the shifted formulas'
    # regime; values within the table at the inputs' scale, as for the unfused losses. The reverse-KL
    # terms' gradient q ⊙ (log q − log p − KL) carries the absolute error of log-ratios of 1e4 (float32
    # ulp 1e-3): the materialised backend misses the gradient table there too, so RKL and AKL gradients
    # are only required finite.
    case = refs.make_case(5, (50,), 6, V, teacher_size=5, bias=False)
    case.weight = case.weight * 3000.0
    case.teacher_weight = case.teacher_weight * 3000.0
    for name in ("hidden", "weight", "teacher_hidden", "teacher_weight"):  # what a float32 backend sees
        setattr(case, name, getattr(case, name).astype(np.float32).astype(np.float64))
    _check(refs, backend, key, case, dtype="float32", chunk_size=17, gradients=key not in ("reverse_kl", "akl"))


# the bf16 → float32 cast is the driver's, shared by the kernels: in JAX a sparse-gradient, a dense-gradient
# and the labels kernel
@pytest.mark.parametrize(("backend", "key"), _grid(LARGE_KEYS, ["dpkd", "forward_kl", "cross_entropy"]))
def test_bfloat16_inputs_compute_in_float32(refs, backend, key):
    # bf16 hidden states and lm_heads: the spec on the bf16-rounded inputs, within the bf16 table (float32
    # math, gradients rounded once to bf16) — the logits are formed in float32, not rounded to bf16
    case = refs.make_case(7, (45,), 6, V, teacher_size=5, bias=False)
    for name in ("hidden", "weight", "teacher_hidden", "teacher_weight"):
        setattr(case, name, torch.from_numpy(getattr(case, name)).to(torch.bfloat16).double().numpy())
    _check(refs, backend, key, case, dtype="bfloat16", chunk_size=16)
