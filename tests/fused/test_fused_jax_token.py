"""The JAX fused token-level losses equal the unfused JAX backend functions on materialised logits
(hidden @ Wᵀ + b) in value and in the student gradients (hidden, weight, bias), for every chunk size and
reduction; they never hold a [N, V] array; bad input raises the Torch fused path's exact message."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # the tight float64 comparisons
import jax.numpy as jnp  # noqa: E402

ft = pytest.importorskip("dpkd.backends.jax.fused_token")
from dpkd.backends.jax import distill, token  # noqa: E402
from dpkd.spec.validation import DPKDInputError  # noqa: E402

N, H, H_T, V = 13, 5, 7, 11
IGNORE = -100
RTOL = 1e-10

# (fused function, unfused backend function, options)
LOSSES = {
    "dpkd_sigmoid": (ft.fused_dpkd_token_loss, token.dpkd_token_loss, {"beta": 0.7, "label_smoothing": 0.1}),
    "dpkd_ipo": (ft.fused_dpkd_token_loss, token.dpkd_token_loss, {"beta": 0.5, "form": "ipo"}),
    "dpkd_dpop": (ft.fused_dpkd_token_loss, token.dpkd_token_loss, {"beta": 0.5, "form": "dpop", "lambda_": 3.0}),
    "forward_kl": (ft.fused_forward_kl, distill.forward_kl, {"temperature": 1.5}),
    "reverse_kl": (ft.fused_reverse_kl, distill.reverse_kl, {"temperature": 0.8}),
    "generalized_jsd": (ft.fused_generalized_jsd, distill.generalized_jsd, {"beta": 0.3, "temperature": 1.2}),
    "akl": (ft.fused_akl, distill.akl, {"mu": 0.4, "temperature": 1.1}),
    "cross_entropy": (ft.fused_cross_entropy, distill.cross_entropy, {}),
}


def make_case(seed: int, bias: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    # a scale of 3 gives peaked distributions, so the argmaxes of student and teacher both agree and differ
    case = {
        "hidden": rng.standard_normal((N, H)),
        "weight": 3.0 * rng.standard_normal((V, H)) / np.sqrt(H),
        "bias": rng.standard_normal(V) if bias else None,
        "teacher_hidden": rng.standard_normal((N, H_T)),
        "teacher_weight": 3.0 * rng.standard_normal((V, H_T)) / np.sqrt(H_T),
        "teacher_bias": rng.standard_normal(V) if bias else None,
        "mask": rng.random(N) < 0.7,
        "labels": np.where(rng.random(N) < 0.25, IGNORE, rng.integers(0, V, N)),
        "upstream": rng.standard_normal(N),
    }
    case["mask"][:2] = True  # never an empty mean
    case["labels"][:2] = (1, 2)
    return {k: None if x is None else jnp.asarray(x) for k, x in case.items()}


def logits(hidden, weight, bias):
    out = hidden @ weight.T
    return out if bias is None else out + bias


@functools.cache
def _pair_program(name: str, chunk_size, reduction: str, normalizer, bias: bool):
    """One jitted program: (value, gradients) of the fused loss and of the unfused one on materialised
    logits; gradients of the scalar (or of Σ upstream·out under "none") w.r.t. the student's (hidden,
    weight[, bias]). The arrays are arguments, so every case of a grid point shares one compilation."""
    fused_fn, plain_fn, options = LOSSES[name]
    kw = dict(options, reduction=reduction, normalizer=normalizer)

    def fused(c, h, w, b):
        if name == "cross_entropy":
            return fused_fn(h, w, c["labels"], bias=b, chunk_size=chunk_size, **kw)
        return fused_fn(h, w, c["teacher_hidden"], c["teacher_weight"], c["mask"], bias=b,
                        teacher_bias=c.get("teacher_bias"), chunk_size=chunk_size, **kw)

    def plain(c, h, w, b):
        if name == "cross_entropy":
            return plain_fn(logits(h, w, b), c["labels"], **kw)
        return plain_fn(logits(h, w, b), logits(c["teacher_hidden"], c["teacher_weight"], c.get("teacher_bias")),
                        c["mask"], **kw)

    def program(c):
        args = (c["hidden"], c["weight"], c["bias"]) if bias else (c["hidden"], c["weight"])
        out = []
        for fn in (fused, plain):
            def scalar(*p, fn=fn):
                value = fn(c, *p, *((None,) if len(p) == 2 else ()))
                x = getattr(value, "loss", value)
                return ((x * c["upstream"]).sum() if reduction == "none" else x), value

            (_, value), grads = jax.value_and_grad(scalar, argnums=tuple(range(len(args))), has_aux=True)(*args)
            out.append((value, grads))
        return out

    return jax.jit(program)


def run_pair(name: str, case: dict, *, chunk_size, reduction: str, normalizer=None):
    """((fused value, fused grads), (unfused value, unfused grads)), from ``_pair_program``."""
    bias = case["bias"] is not None
    arrays = {k: x for k, x in case.items() if x is not None}
    return _pair_program(name, chunk_size, reduction, normalizer, bias)(arrays)


def assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * max(1.0, float(np.max(np.abs(expected)))))


def check_pair(name, pair):
    (value, grads), (expected_value, expected_grads) = pair
    if name.startswith("dpkd"):
        for field in ("loss", "agreement_rate", "chosen_rewards", "rejected_rewards"):
            assert_close(getattr(value, field), getattr(expected_value, field))
    else:
        assert_close(value, expected_value)
    assert len(grads) == len(expected_grads)
    for g, e in zip(grads, expected_grads):
        assert float(np.max(np.abs(np.asarray(e)))) > 0  # a gradient that is there to compare
        assert_close(g, e)


# Every token loss of the registry, every variant, is checked against the spec through the fused path by
# conformance/test_fused_vs_spec.py (the default chunk); here chunk-size invariance (one row per chunk, one
# chunk; 4 rows — a short last chunk — in the grid below), on a sparse-gradient and a dense-gradient kernel.
@pytest.mark.parametrize("chunk_size", [1, N])
@pytest.mark.parametrize("name", ["dpkd_sigmoid", "forward_kl"])
def test_fused_token_loss_equals_unfused_mean(name, chunk_size):
    check_pair(name, run_pair(name, make_case(0), chunk_size=chunk_size, reduction="mean"))


# The reductions are the driver's, shared by the kernels: each loss once, each reduction (per-row values and
# the reduced scalar are two code paths) on at least one sparse- and one dense-gradient kernel or twice (each
# grid point is one compilation).
REDUCTIONS = [
    ("dpkd_sigmoid", "none", None, True), ("forward_kl", "mean", 37.0, True),
    ("generalized_jsd", "mean", None, False), ("akl", "sum", None, True),
    ("cross_entropy", "none", None, True), ("cross_entropy", "sum", None, False),
]


@pytest.mark.parametrize(("name", "reduction", "normalizer", "bias"), REDUCTIONS)
def test_fused_token_loss_equals_unfused_reductions(name, reduction, normalizer, bias):
    check_pair(name, run_pair(name, make_case(1, bias=bias), chunk_size=4, reduction=reduction,
                              normalizer=normalizer))


def test_default_chunk_size_and_leading_axes():
    # [B, T, H] inputs, chunk_size from the byte budget: the same as the flat unfused loss
    case = make_case(2)
    h3, th3, m2 = case["hidden"][:12].reshape(3, 4, H), case["teacher_hidden"][:12].reshape(3, 4, H_T), \
        case["mask"][:12].reshape(3, 4)
    out = ft.fused_reverse_kl(h3, case["weight"], th3, case["teacher_weight"], m2, bias=case["bias"],
                              teacher_bias=case["teacher_bias"], reduction="none")
    expected = distill.reverse_kl(logits(h3, case["weight"], case["bias"]),
                                  logits(th3, case["teacher_weight"], case["teacher_bias"]), m2, reduction="none")
    assert_close(out, expected)


def _shapes(jaxpr, found):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            found.append(tuple(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _shapes(inner, found)
    return found


def test_gradient_never_holds_all_logits():
    # a fused loss whose value-and-gradient program holds a [≥N, V] array is not memory-flat
    case = make_case(3)

    def loss(h, w, b):
        return ft.fused_forward_kl(h, w, case["teacher_hidden"], case["teacher_weight"], case["mask"], bias=b,
                                   teacher_bias=case["teacher_bias"], chunk_size=4)

    program = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(case["hidden"], case["weight"], case["bias"])
    shapes = _shapes(program.jaxpr, [])
    assert any(s[-2:] == (4, V) for s in shapes)  # the chunk logits are there (the walk sees the loops)
    assert not [s for s in shapes if len(s) >= 2 and s[-1] == V and int(np.prod(s[:-1])) >= N]


@pytest.mark.parametrize(("rows", "vocab", "hidden"), [(8, 37, 4), (3, 37, 16), (40, 37, 2), (16, 1000, 8)])
def test_weight_grad_blocks_add_up_to_the_product(rows, vocab, hidden):
    # blocks of the vocabulary, a short last one included, add up to grad_w + gᵀ @ rows
    from dpkd.backends.jax._lm_head import add_weight_grad

    rng = np.random.default_rng(rows + vocab)
    g, x, acc = rng.normal(size=(rows, vocab)), rng.normal(size=(rows, hidden)), rng.normal(size=(vocab, hidden))
    got = add_weight_grad(jnp.asarray(acc), jnp.asarray(g), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), acc + g.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["token cross-entropy", "linear_token_logps", "sequence DPKD"])
def test_weight_grad_accumulation_holds_no_second_weight_sized_array(path):
    # XLA's CPU dot cannot add into its output: an accumulation as one product keeps a second [V, H] array
    from dpkd.backends.jax import fused
    from dpkd.backends.jax.fused import TeacherLogps

    n, h, v = 256, 256, 4000
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, h)) / 16, jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n))
    teacher = TeacherLogps(jnp.full(4, -9.0), jnp.full(4, -12.0))

    def loss(x, w):
        if path == "token cross-entropy":
            return ft.fused_cross_entropy(x, w, labels, chunk_size=32)
        if path == "linear_token_logps":
            return fused.linear_token_logps(x, w, labels, chunk_size=32).sum()
        pairs = x.reshape(8, n // 8, h)
        lab = labels.reshape(8, n // 8)
        return fused.fused_dpkd_loss(pairs[:4], pairs[4:], w, lab[:4], lab[4:], teacher=teacher, chunk_size=64).loss

    stats = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile().memory_analysis()
    assert stats.temp_size_in_bytes < v * h * 4


def test_token_kernel_temporaries_do_not_grow_with_the_rows():
    # each chunk gathers its counted rows and scatters its gradient into grad_hidden: sorted [N, H] copies of
    # the rows, the teacher's rows and their gradient would grow XLA's temporaries by ~3 · N · H · 4 bytes
    h, v = 64, 1000
    rng = np.random.default_rng(6)
    temp = {}
    for n in (512, 2048):
        x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
        xt = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(v, h)) / 8, jnp.float32)
        mask = jnp.asarray(rng.random(n) < 0.8, jnp.float32)

        def loss(x, w, xt=xt, mask=mask):
            return ft.fused_forward_kl(x, w, xt, w, mask, chunk_size=64)

        stats = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile().memory_analysis()
        temp[n] = stats.temp_size_in_bytes
    assert temp[2048] - temp[512] < (2048 - 512) * h * 4, temp


def _torch_message(fn_name: str, **overrides) -> str:
    torch = pytest.importorskip("torch")
    tfused = pytest.importorskip("dpkd.backends.torch.fused_token")
    case = {k: None if x is None else torch.from_numpy(np.array(x)) for k, x in make_case(4).items()}
    case.update({k: None if x is None else torch.from_numpy(np.array(x)) for k, x in overrides.items()})
    with pytest.raises(DPKDInputError) as info:
        call_fused(getattr(tfused, fn_name), fn_name, case)
    return str(info.value)


def call_fused(fn, fn_name: str, case: dict):
    if fn_name == "fused_cross_entropy":
        return fn(case["hidden"], case["weight"], case["labels"], bias=case["bias"], chunk_size=4)
    return fn(case["hidden"], case["weight"], case["teacher_hidden"], case["teacher_weight"], case["mask"],
              bias=case["bias"], teacher_bias=case["teacher_bias"], chunk_size=4)


@pytest.mark.parametrize(("fn_name", "overrides", "argument"), [
    ("fused_forward_kl", {"teacher_weight": np.ones((V + 1, H_T))}, "teacher_weight"),
    ("fused_dpkd_token_loss", {"mask": np.ones(N - 1)}, "mask"),
    ("fused_akl", {"mask": np.full(N, 2.0)}, "mask"),
    ("fused_reverse_kl", {"hidden": np.full((N, H), np.nan)}, "student_hidden"),
    ("fused_cross_entropy", {"labels": np.full(N, V)}, "labels"),
    ("fused_cross_entropy", {"labels": np.full(N, IGNORE)}, "labels"),
])
def test_bad_input_matches_torch_message(fn_name, overrides, argument):
    expected = _torch_message(fn_name, **overrides)
    case = make_case(4)
    case.update({k: jnp.asarray(x) for k, x in overrides.items()})
    with pytest.raises(DPKDInputError) as info:
        call_fused(getattr(ft, fn_name), fn_name, case)
    assert str(info.value) == expected
    assert str(info.value).startswith(f"{fn_name}: `{argument}`")


def test_under_jit_equals_eager():
    case = make_case(5)

    def loss(h, w, b, m):
        return ft.fused_generalized_jsd(h, w, case["teacher_hidden"], case["teacher_weight"], m, bias=b,
                                        teacher_bias=case["teacher_bias"], chunk_size=4, beta=0.6)

    args = (case["hidden"], case["weight"], case["bias"], case["mask"])
    eager = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    for x, y in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        assert_close(x, y)
