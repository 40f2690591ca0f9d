"""The JAX fused lm_head path equals the float64 spec on materialised logits (values and gradients), for
every chunk size, under jit, and raises the same errors as the Torch fused path."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # the tight float64 comparisons; float32 inputs keep float32
import jax.numpy as jnp  # noqa: E402

fused = pytest.importorskip("dpkd.backends.jax.fused")
fused_token = pytest.importorskip("dpkd.backends.jax.fused_token")
from dpkd.conformance.testing import assert_close  # noqa: E402
from dpkd.spec.validation import DPKDInputError  # noqa: E402

ODD = (3, 47, 31, 123)  # (B, T, H, V)


def a(x, dtype):
    if x is None:
        return None
    x = np.asarray(x)
    return jnp.asarray(x, dtype=dtype) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)


def round_case(case, dtype):
    for name in ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias"):
        x = getattr(case, name)
        setattr(case, name, None if x is None else np.asarray(a(x, dtype), dtype=np.float64))
    return case


def values_scale(*arrays):
    return max(1.0, *(float(np.max(np.abs(x))) for x in arrays))


# Each case is one compiled program: the grid is smaller than the Torch one; the float64 chunk sizes are
# the (1, 7, 64, N), 7 without a bias and float32 at the default chunk
# (test_linear_token_logps_under_jit_and_chunk_invariance holds chunks 1, 7 and N equal to each other).
@pytest.mark.parametrize(("dtype", "chunk_size", "bias"), [
    ("float64", 1, True), ("float64", 64, True), ("float64", "N", True),
    ("float64", 7, False), ("float32", None, True),
])
def test_linear_token_logps_equals_spec(refs, dtype, chunk_size, bias):
    b_, t_, h_, v_ = ODD
    case = round_case(refs.make_case(0, (b_, t_), h_, v_, bias=bias), dtype)
    upstream = np.random.default_rng(1).standard_normal((b_, t_))
    exp_value, exp_grads = refs.linear_token_logps(case, upstream)
    size = b_ * t_ if chunk_size == "N" else chunk_size
    labels = jnp.asarray(case.labels)

    def f(g, lab, h, w, bb):
        out = fused.linear_token_logps(h, w, lab, bias=bb, chunk_size=size)
        return (out * g).sum(), out

    args = (a(case.hidden, dtype), a(case.weight, dtype), a(case.bias, dtype))
    # value and gradient from one compiled program
    program = jax.jit(jax.value_and_grad(f, argnums=(2, 3, 4) if bias else (2, 3), has_aux=True))
    (_, out), grads = program(a(upstream, dtype), labels, *args)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (b_, t_)
    assert np.all(np.asarray(out)[case.labels == refs.IGNORE] == 0)
    scale = values_scale(refs.logits_of(case.hidden, case.weight, case.bias))
    assert_close(out, exp_value, dtype=dtype, quantity="values", what="logps", scale=scale)
    for name, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
        assert_close(g, e, dtype=dtype, quantity="gradients", what=f"grad {name}")


def test_linear_token_logps_under_jit_and_chunk_invariance(refs):
    case = refs.make_case(2, (123,), 31, 47)
    labels = jnp.asarray(case.labels)
    results = []
    for size in (1, 7, 123):  # one row per chunk, a short last chunk, one chunk (64: the grid above)
        f = jax.jit(jax.value_and_grad(
            lambda h, w, bb, size=size: fused.linear_token_logps(h, w, labels, bias=bb, chunk_size=size).sum(),
            argnums=(0, 1, 2)))
        results.append(f(a(case.hidden, "float64"), a(case.weight, "float64"), a(case.bias, "float64")))
    leaves = [jax.tree_util.tree_leaves(r) for r in results]
    for other in leaves[1:]:
        for x, y in zip(leaves[0], other):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


SEQUENCE_LOSSES = [
    ("dpkd_loss", fused.fused_dpkd_loss, {"beta": 0.7, "label_smoothing": 0.1}, False, "lm_head"),
    ("dpkd_loss", fused.fused_dpkd_loss, {"beta": 0.5}, True, "lm_head"),
]


def _pair_cases(refs, seed, t_c=7, t_s=5, h=6, v=19, b_=3):
    chosen = refs.make_case(seed, (b_, t_c), h, v)
    rejected = refs.make_case(seed + 100, (b_, t_s), h, v)
    rejected.weight, rejected.bias = chosen.weight, chosen.bias
    rejected.teacher_weight, rejected.teacher_bias = chosen.teacher_weight, chosen.teacher_bias
    teacher_size = chosen.teacher_hidden.shape[-1]
    rejected.teacher_hidden = np.random.default_rng(seed + 7).standard_normal((b_, t_s, teacher_size))
    chosen.labels[:, 0] = 3
    rejected.labels[:, 0] = 4
    return chosen, rejected


# (dtype, mode, reduction, loss index, chunk sizes): both passes at both chunk layouts (T_c + T_s = 12: one
# pair per chunk; 25: two pairs per chunk plus a padded pair) and every other mode, reduction and dtype on
# one layout, on Eq. 8; Eq. 9 (length normalised) on each pass — each (grid point, chunk size) is one
# compiled value-and-gradient program
SEQUENCE_GRID = [
    ("float64", "single_pass", "mean", 0, (12, 25)), ("float64", "two_pass", "mean", 0, (12, 25)),
    ("float64", "single_pass", "sum", 0, (12,)), ("float64", "two_pass", "none", 0, (25,)),
    ("float64", "auto", "mean", 0, (25,)), ("float32", "single_pass", "mean", 0, (25,)),
    ("float64", "single_pass", "mean", 1, (25,)), ("float64", "two_pass", "none", 1, (12,)),
]


# Every sequence loss of the registry, every variant, is checked against the spec through the fused path by
# conformance/test_fused_vs_spec.py (single pass, the default chunk). Here: the modes, reductions and chunk
# layouts on DPKD, Eq. 8 and Eq. 9.
@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "mode", "reduction", "loss", "sizes"), SEQUENCE_GRID,
                         ids=[f"{g[0]}-{g[1]}-{g[2]}-{SEQUENCE_LOSSES[g[3]][0]}-{g[3]}" for g in SEQUENCE_GRID])
def test_fused_sequence_loss_equals_spec(refs, dtype, mode, reduction, loss, sizes):
    name, fn, options, lengths, teacher = SEQUENCE_LOSSES[loss]
    chosen, rejected = _pair_cases(refs, 10)
    round_case(chosen, dtype)
    round_case(rejected, dtype)
    exp, exp_grads, _ = refs.sequence(name, dict(options), chosen, rejected, use_lengths=lengths,
                                      reduction=reduction, teacher=teacher)
    kwargs = {**options, "length_normalize": lengths}
    teacher_arrays = (a(chosen.teacher_hidden, dtype), a(rejected.teacher_hidden, dtype),
                      a(chosen.teacher_weight, dtype), a(chosen.teacher_bias, dtype))
    labels = (jnp.asarray(chosen.labels), jnp.asarray(rejected.labels))
    params = (a(chosen.hidden, dtype), a(rejected.hidden, dtype), a(chosen.weight, dtype), a(chosen.bias, dtype))
    scale = values_scale(refs.logits_of(chosen.hidden, chosen.weight, chosen.bias), exp.chosen_rewards)
    for size in sizes:
        def f(ch, rj, w, bb, lab, th, size=size):
            out = fn(ch, rj, w, *lab, bias=bb, reduction=reduction, mode=mode, chunk_size=size,
                     teacher=fused.TeacherLMHead(*th), **kwargs)
            return out.loss.sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
            *params, labels, teacher_arrays)
        for field in ("loss", "chosen_rewards", "rejected_rewards"):
            assert_close(getattr(out, field), getattr(exp, field), dtype=dtype, quantity="values",
                         what=f"{name} {field} chunk {size}", scale=scale)
        for pname, g, e in zip(("chosen_hidden", "rejected_hidden", "weight", "bias"), grads, exp_grads):
            assert_close(g, e, dtype=dtype, quantity="gradients", what=f"{name} grad {pname} chunk {size}")


def test_precomputed_teacher_logps(refs):
    chosen, rejected = _pair_cases(refs, 12)
    exp, exp_grads, (c, d) = refs.sequence("dpkd_loss", {"beta": 0.3}, chosen, rejected, use_lengths=False,
                                           reduction="mean")
    labels = (jnp.asarray(chosen.labels), jnp.asarray(rejected.labels))
    teacher = fused.TeacherLogps(jnp.asarray(c), jnp.asarray(d))
    for mode in ("single_pass", "two_pass"):
        def f(ch, rj, w, mode=mode):
            return fused.fused_dpkd_loss(ch, rj, w, *labels, bias=jnp.asarray(chosen.bias), beta=0.3, mode=mode,
                                         teacher=teacher).loss

        params = (jnp.asarray(chosen.hidden), jnp.asarray(rejected.hidden), jnp.asarray(chosen.weight))
        value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(*params)
        assert_close(value, exp.loss, dtype="float64", quantity="values", what="loss")
        for g, e in zip(grads, exp_grads):
            assert_close(g, e, dtype="float64", quantity="gradients", what="grad")


def test_errors_match_the_torch_fused_path():
    torch = pytest.importorskip("torch")
    torch_fused = pytest.importorskip("dpkd.backends.torch.fused")
    shapes = {"hidden": (6, 4), "weight": (9, 5), "labels": (6,)}
    messages = []
    for lib, mod in ((jnp, fused), (torch, torch_fused)):
        with pytest.raises(DPKDInputError) as err:
            mod.linear_token_logps(lib.zeros(shapes["hidden"]), lib.zeros(shapes["weight"]),
                                   lib.zeros(shapes["labels"], dtype=lib.int32))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("linear_token_logps: `weight` ")
    with pytest.raises(DPKDInputError, match="^linear_token_logps: `labels` "):
        fused.linear_token_logps(jnp.zeros((6, 4)), jnp.zeros((9, 4)), jnp.full((6,), 9))
    with pytest.raises(DPKDInputError, match="^fused_dpkd_loss: `teacher` "):
        fused.fused_dpkd_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.zeros((9, 4)),
                              jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32))
