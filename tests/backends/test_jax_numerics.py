"""dpkd.backends.jax numerics: the dtype policy (bf16 → float32 math and outputs, float64 under x64),
no NaN/Inf for extreme but finite inputs (±1e4 logits, agreeing argmaxes, AKL at p = q), argmax ties and
AKL's tie rule, the strict DPOP kink — each checked against the float64 spec or a closed form."""

from __future__ import annotations

import math

import dpkd.backends.jax as J
import dpkd.spec as S
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(params=[False, True], ids=["x32", "x64"])
def x64_mode(request):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


TOKEN_FNS = ["dpkd_token_loss", "forward_kl", "reverse_kl", "generalized_jsd", "akl"]


def _loss(out):
    return out[0] if isinstance(out, tuple) else out


def _logits(seed, shape=(2, 4, 11), scale=3.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def _mask(shape=(2, 4)):
    m = np.ones(shape, bool)
    m[0, 1] = False
    return m


# --------------------------------------------------------------------------------------------------
# Dtype policy


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", TOKEN_FNS)
def test_low_precision_runs_in_float32_and_returns_float32(x64_mode, name, low):
    s, t = jnp.asarray(_logits(0), low), jnp.asarray(_logits(1), low)
    m = jnp.asarray(_mask())
    fn = getattr(J, name)
    out = fn(s, t, m)
    assert _loss(out).dtype == jnp.float32
    for leaf in jax.tree.leaves(out):
        assert leaf.dtype == jnp.float32
    # bfloat16 → float32 is exact, so the result is the float32 computation on the rounded inputs ...
    same = fn(s.astype(jnp.float32), t.astype(jnp.float32), m)
    np.testing.assert_array_equal(np.asarray(_loss(out)), np.asarray(_loss(same)))
    # ... which is the float64 spec on those inputs to float32 accuracy
    ref = _loss(getattr(S, name)(np.asarray(s, np.float64), np.asarray(t, np.float64), np.asarray(m)))
    np.testing.assert_allclose(float(_loss(out)), float(ref), rtol=2e-6)
    # the gradient comes back in the input's dtype
    g = jax.grad(lambda x: _loss(fn(x, t, m)).sum())(s)
    assert g.dtype == jnp.dtype(low)
    assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_float32_stays_float32_and_float64_is_float64_under_x64(x64_mode):
    a = np.random.default_rng(2).uniform(-20, -1, (4, 5))
    out32 = J.dpkd_loss(*(jnp.asarray(x, jnp.float32) for x in a))
    assert out32.loss.dtype == jnp.float32 and out32.chosen_rewards.dtype == jnp.float32
    if x64_mode:
        out64 = J.dpkd_loss(*(jnp.asarray(x, jnp.float64) for x in a))
        assert out64.loss.dtype == jnp.float64
        np.testing.assert_allclose(out64.loss, S.dpkd_loss(*a).loss, rtol=1e-13)


def test_mixed_dtypes_run_in_the_widest(x64):
    s = jnp.asarray(_logits(3), jnp.bfloat16)
    t64 = jnp.asarray(_logits(4), jnp.float64)
    out = J.dpkd_token_loss(s, t64, jnp.asarray(_mask()))
    assert out.loss.dtype == jnp.float64
    ref = S.dpkd_token_loss(np.asarray(s, np.float64), np.asarray(t64), _mask())
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-12)


def test_token_counts_are_int64_under_x64_else_int32(x64_mode):
    logits = jnp.asarray(_logits(5), jnp.float32)
    labels = jnp.asarray(np.where(_mask(), 3, -100))
    _, n = J.sequence_logps(logits, labels)
    assert n.dtype == (jnp.int64 if x64_mode else jnp.int32)
    np.testing.assert_array_equal(n, _mask().sum(-1))


def test_bf16_sequence_losses_return_float32():
    a = [jnp.asarray(x, jnp.bfloat16) for x in np.random.default_rng(6).uniform(-20, -1, (4, 3))]
    for out in (J.dpkd_loss(*a), J.ipo_loss(*a, length_normalize=False), J.cpo_loss(a[0], a[1]),
                J.dpop_loss(*a)):
        assert out.loss.dtype == jnp.float32
        assert out.chosen_rewards.dtype == jnp.float32


# --------------------------------------------------------------------------------------------------
# Extreme but finite inputs: finite values and gradients, equal to the float64 spec


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,kw", [
    ("dpkd_token_loss", {}), ("dpkd_token_loss", {"form": "ipo"}), ("dpkd_token_loss", {"form": "dpop"}),
    ("dpkd_token_loss", {"label_smoothing": 0.2}), ("forward_kl", {}), ("reverse_kl", {}),
    ("generalized_jsd", {}), ("generalized_jsd", {"beta": 0.9}), ("akl", {}), ("cross_entropy", {}),
])
def test_logits_of_1e4_give_finite_values_and_gradients(name, kw, dtype):
    rng = np.random.default_rng(7)
    s = jnp.asarray(np.sign(rng.normal(size=(2, 3, 8))) * 1e4 * rng.uniform(0.5, 1.0, (2, 3, 8)), dtype)
    t = jnp.asarray(np.sign(rng.normal(size=(2, 3, 8))) * 1e4 * rng.uniform(0.5, 1.0, (2, 3, 8)), dtype)
    if name == "cross_entropy":
        second = jnp.asarray(rng.integers(0, 8, (2, 3)))
        call = lambda x, y: J.cross_entropy(x, second)  # noqa: E731
        ref_fn = lambda x, y: S.cross_entropy(x, np.asarray(second))  # noqa: E731
    else:
        m = jnp.ones((2, 3), bool)
        call = lambda x, y: _loss(getattr(J, name)(x, y, m, **kw))  # noqa: E731
        ref_fn = lambda x, y: _loss(getattr(S, name)(x, y, np.asarray(m), **kw))  # noqa: E731
    value, grads = jax.value_and_grad(call, argnums=(0, 1))(s, t)
    assert bool(jnp.isfinite(value))
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    ref = float(ref_fn(np.asarray(s, np.float64), np.asarray(t, np.float64)))
    # float32 math on inputs of size 1e4: the error is relative to the inputs' scale (ulp(1e4) ≈ 1e-3)
    assert abs(float(value) - ref) <= 1e-6 * max(abs(ref), 1e4)


def test_sequence_losses_at_extreme_margins_are_finite():
    big = jnp.asarray([-1e4, 1e4, 0.0], jnp.float32)
    z = jnp.zeros(3, jnp.float32)
    for fn in (lambda a: J.dpkd_loss(a, z, z, z, beta=1.0), lambda a: J.dpop_loss(a, z, z, z),
               lambda a: J.cpo_loss(a, z, beta=1.0), lambda a: J.ipo_loss(a, z, z, z, length_normalize=False),
               lambda a: J.simpo_loss(a, z, chosen_lengths=jnp.ones(3), rejected_lengths=jnp.ones(3))):
        value, g = jax.value_and_grad(lambda a, fn=fn: fn(a).loss)(big)
        assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(g)))


def test_agreeing_argmaxes_give_the_minimum_with_zero_gradient(x64):
    s = jnp.asarray(_logits(8), jnp.float64)
    t = s * 2.0 + 1.0  # the same argmax at every position
    m = jnp.ones(s.shape[:-1], bool)
    for form, minimum in (("sigmoid", math.log(2.0)), ("ipo", 1.0 / (4 * 0.1**2))):
        out, (gs, gt) = jax.value_and_grad(lambda a, b, form=form: J.dpkd_token_loss(a, b, m, form=form).loss,
                                           argnums=(0, 1))(s, t)
        np.testing.assert_allclose(out, minimum, rtol=1e-14)
        np.testing.assert_array_equal(gs, 0.0)
        np.testing.assert_array_equal(gt, 0.0)
    assert float(J.dpkd_token_loss(s, t, m).agreement_rate) == 1.0


def test_akl_at_p_equals_q_is_zero_with_finite_zero_gradient(x64):
    s = jnp.asarray(_logits(9), jnp.float64)
    value, (gs, gt) = jax.value_and_grad(lambda a, b: J.akl(a, b, jnp.ones(s.shape[:-1])), argnums=(0, 1))(s, s)
    assert float(value) == 0.0
    np.testing.assert_array_equal(gs, 0.0)
    np.testing.assert_array_equal(gt, 0.0)
    # also in float32 with logits of 1e4
    big = jnp.asarray(_logits(9) * 3e3, jnp.float32)
    value, g = jax.value_and_grad(lambda a: J.akl(a, big, jnp.ones(big.shape[:-1])))(big)
    assert float(value) == 0.0 and bool(jnp.all(jnp.isfinite(g)))


# --------------------------------------------------------------------------------------------------
# Ties and sorting


def test_argmax_ties_resolve_to_the_lowest_index():
    # the student ties between tokens 1 and 3; the teacher's argmax is 1 at position 0 and 3 at position 1
    s = jnp.asarray([[[0.0, 2.0, 0.0, 2.0], [0.0, 2.0, 0.0, 2.0]]])
    t = jnp.asarray([[[0.0, 1.0, 0.0, 0.5], [0.0, 0.5, 0.0, 1.0]]])
    out = J.dpkd_token_loss(s, t, jnp.ones((1, 2)), reduction="none", beta=1.0)
    # position 0: y_s = 1 (lowest of the tie) = y_t → h = 0; position 1: y_s = 1, y_t = 3 →
    # h = (S3 − S1) − (T3 − T1) = 0 − 0.5
    np.testing.assert_allclose(out.loss, [[math.log(2.0), math.log1p(math.exp(0.5))]], rtol=1e-6)
    assert float(out.agreement_rate) == 0.5


def test_akl_tied_teacher_probabilities_are_never_split(x64):
    # p uniform over 4 tokens: one run of tied maxima, so all four are head (spec/README.md "Tie rule"), although
    # the cumulative sum reaches μ = 0.5 at the second: g_tail = 0, w_h = 1, the loss is KL(p‖q)
    t = np.zeros((1, 1, 4))
    s = np.array([[[0.3, -1.0, 2.0, 0.1]]])
    p, q = np.full(4, 0.25), np.exp(s[0, 0]) / np.exp(s[0, 0]).sum()
    expected = np.sum(p * np.log(p / q))
    np.testing.assert_allclose(J.akl(jnp.asarray(s), jnp.asarray(t), jnp.ones((1, 1))), expected, rtol=1e-13)


def test_dpop_penalty_derivative_is_strict_at_the_kink(x64):
    # c == a exactly: k = 1[c > a] = 0, so the released form's ∂/∂a is the plain DPKD term (no λ/2)
    a, b, c, d = (jnp.asarray([x]) for x in (-3.0, -5.0, -3.0, -4.0))
    for form in ("smaug", "released"):
        g = jax.grad(lambda x, form=form: J.dpop_loss(x, b, c, d, beta=0.5, lambda_=10.0, form=form).loss)(a)
        ref = S.dpop_loss_grad(*(np.asarray(x) for x in (a, b, c, d)), beta=0.5, lambda_=10.0, form=form)
        np.testing.assert_allclose(g, ref["policy_chosen_logps"], rtol=1e-14)


def test_generalized_jsd_endpoints_are_the_kls(x64):
    s, t, m = jnp.asarray(_logits(10)), jnp.asarray(_logits(11)), jnp.asarray(_mask())
    np.testing.assert_allclose(J.generalized_jsd(s, t, m, beta=0.0), J.forward_kl(s, t, m), rtol=1e-14)
    np.testing.assert_allclose(J.generalized_jsd(s, t, m, beta=1.0), J.reverse_kl(s, t, m), rtol=1e-14)
    # the documented discontinuity: the mixture form tends to 0 next to the end points
    assert float(J.generalized_jsd(s, t, m, beta=1e-9)) < 1e-6 < float(J.forward_kl(s, t, m))
