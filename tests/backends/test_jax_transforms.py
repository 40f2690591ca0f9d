
"""dpkd.backends.jax under the JAX transforms: jit, vmap, value_and_grad, and checkify value checks.

Every comparison is against the same backend called eagerly (bitwise-close: the same float math) or
against the float64 spec; nothing is compared with numbers copied from the code under test.
"""

from __future__ import annotations

import importlib
import inspect

import dpkd.backends.jax as J
import dpkd.spec as S
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpkd.spec import registry as R


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _seq_problems(rng, problems=4, batch=5, dtype=jnp.float32):
    arrays = [jnp.asarray(-rng.uniform(0.5, 30.0, (problems, batch)), dtype) for _ in range(4)]
    lengths = [jnp.asarray(rng.integers(1, 25, (problems, batch))) for _ in range(2)]
    return arrays, lengths


def _token_problems(rng, problems=3, shape=(2, 6, 9), dtype=jnp.float32):
    s = jnp.asarray(rng.normal(size=(problems, *shape)) * 3, dtype)
    t = jnp.asarray(rng.normal(size=(problems, *shape)) * 3, dtype)
    m = jnp.asarray(rng.random((problems, *shape[:-1])) < 0.7).at[:, 0, 0].set(True)
    return s, t, m


def _close(x, y):
    # same backend, same dtype, same math: only XLA's fusion/reassociation may differ
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=2e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# jit + vmap of the two headline losses against the eager result


@pytest.mark.parametrize("options", [
    dict(beta=0.1), dict(beta=0.5, label_smoothing=0.2), dict(beta=0.3, reference_free=True),
    dict(beta=0.2, reduction="sum"), dict(beta=0.2, reduction="none"),
])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_dpkd_loss_jit_and_vmap_equal_eager(options, with_lengths):
    rng = np.random.default_rng(1)
    (a, b, c, d), (lt, ls) = _seq_problems(rng)
    kw = dict(chosen_lengths=lt, rejected_lengths=ls) if with_lengths else {}

    def one(i):
        k = {n: x[i] for n, x in kw.items()}
        return J.dpkd_loss(a[i], b[i], c[i], d[i], **k, **options)

    eager = [one(i) for i in range(a.shape[0])]
    jitted = J.jit(J.dpkd_loss)
    for i, e in enumerate(eager):
        out = jitted(a[i], b[i], c[i], d[i], **{n: x[i] for n, x in kw.items()}, **options)
        for got, want in zip(out, e):
            _close(got, want)

    def problem(a, b, c, d, kw):
        return J.dpkd_loss(a, b, c, d, **kw, **options)

    for fn in (jax.vmap(problem), jax.jit(jax.vmap(problem))):
        out = fn(a, b, c, d, kw)
        for field in range(3):
            _close(out[field], np.stack([np.asarray(e[field]) for e in eager]))


@pytest.mark.parametrize("options", [
    dict(), dict(form="ipo", beta=0.5), dict(form="dpop", lambda_=3.0), dict(label_smoothing=0.1),
    dict(reference_free=True), dict(normalizer=7.0), dict(reduction="none"), dict(reduction="sum"),
])
def test_dpkd_token_loss_jit_and_vmap_equal_eager(options):
    rng = np.random.default_rng(2)
    s, t, m = _token_problems(rng)
    eager = [J.dpkd_token_loss(s[i], t[i], m[i], **options) for i in range(s.shape[0])]
    jitted = J.jit(J.dpkd_token_loss)
    for i, e in enumerate(eager):
        for got, want in zip(jitted(s[i], t[i], m[i], **options), e):
            _close(got, want)
    fn = jax.vmap(lambda s, t, m: J.dpkd_token_loss(s, t, m, **options))
    for f in (fn, jax.jit(fn)):
        out = f(s, t, m)
        for field in range(4):
            _close(out[field], np.stack([np.asarray(e[field]) for e in eager]))


def test_value_and_grad_under_jit_equals_eager_and_spec(x64):
    rng = np.random.default_rng(3)
    s, t, m = _token_problems(rng, problems=1, dtype=jnp.float64)
    s, t, m = s[0], t[0], m[0]

    def loss(s, t):
        return J.dpkd_token_loss(s, t, m, beta=0.7, form="dpop", lambda_=2.0).loss

    eager = jax.value_and_grad(loss, argnums=(0, 1))(s, t)
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(s, t)
    spec_grad = S.dpkd_token_loss_grad(np.asarray(s), np.asarray(t), np.asarray(m), beta=0.7, form="dpop",
                                       lambda_=2.0)
    for value, (gs, gt) in (eager, jitted):
        np.testing.assert_allclose(value, S.dpkd_token_loss(np.asarray(s), np.asarray(t), np.asarray(m),
                                                            beta=0.7, form="dpop", lambda_=2.0).loss, rtol=1e-12)
        np.testing.assert_allclose(gs, spec_grad["student_logits"], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(gt, spec_grad["teacher_logits"], rtol=1e-10, atol=1e-14)


def test_vmap_of_grad_equals_per_problem_spec_grad(x64):
    rng = np.random.default_rng(4)
    (a, b, c, d), (lt, ls) = _seq_problems(rng, dtype=jnp.float64)

    def loss(a, b, c, d, lt, ls):
        return J.dpkd_loss(a, b, c, d, chosen_lengths=lt, rejected_lengths=ls, beta=0.4).loss

    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)))(a, b, c, d, lt, ls)
    for i in range(a.shape[0]):
        ref = S.dpkd_loss_grad(*(np.asarray(x[i]) for x in (a, b, c, d)), chosen_lengths=np.asarray(lt[i]),
                               rejected_lengths=np.asarray(ls[i]), beta=0.4)
        for g, name in zip(grads, ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                                   "reference_rejected_logps")):
            np.testing.assert_allclose(g[i], ref[name], rtol=1e-10, atol=1e-16)


# --------------------------------------------------------------------------------------------------
# Every public function compiles with its options static


def _default_call(spec):
    variant = spec.variants[0]
    return R.build_call(spec, variant, R.default_draw(spec, variant))


def _jax_args(call):
    conv = lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    return [conv(a) for a in call.args], {k: conv(x) for k, x in call.kwargs.items()}


@pytest.mark.parametrize("name", sorted(J.STATIC_ARGNAMES))
def test_static_argnames_cover_exactly_the_non_array_options(name):
    params = inspect.signature(getattr(J, name)).parameters.values()
    keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    arrays = {"chosen_lengths", "rejected_lengths", "lengths"}
    assert set(J.STATIC_ARGNAMES[name]) == keyword_only - arrays


def test_every_public_function_has_static_argnames():
    # the fused lm_head path (dpkd.backends.jax.fused) jit-compiles itself and takes lm_head arrays, not the spec API
    fused = set(importlib.import_module("dpkd.backends.jax.fused").__all__)
    fused |= set(importlib.import_module("dpkd.backends.jax.fused_token").__all__)
    functions = {n for n in J.__all__ if callable(getattr(J, n)) and n[0].islower()} - {"jit", "checked", "throw"}
    functions -= fused
    assert functions == set(J.STATIC_ARGNAMES)
    assert functions == {n for n in S.__all__ if n[0].islower() and not n.endswith("_grad")}


@pytest.mark.parametrize("name", [s.name for s in R.REGISTRY])
def test_every_function_under_jit_equals_eager(name):
    call = _default_call(R.get(name))
    args, kwargs = _jax_args(call)
    fn = getattr(J, name)
    eager, jitted = fn(*args, **kwargs), J.jit(fn)(*args, **kwargs)
    flat_e, flat_j = jax.tree.leaves(eager), jax.tree.leaves(jitted)
    assert len(flat_e) == len(flat_j)
    for e, j in zip(flat_e, flat_j):
        _close(j, e)


def test_metrics_return_python_floats_eagerly_and_arrays_under_jit():
    rng = np.random.default_rng(5)
    (a, b, c, d), _ = _seq_problems(rng, problems=1)
    eager = J.preference_metrics(a[0], b[0], c[0], d[0])
    assert all(type(x) is float for x in eager.values())
    jitted = J.jit(J.preference_metrics)(a[0], b[0], c[0], d[0])
    assert all(isinstance(x, jax.Array) and x.shape == () for x in jitted.values())
    for k in eager:
        _close(jitted[k], eager[k])


# --------------------------------------------------------------------------------------------------
# Static errors (options, shapes, dtypes) raise the spec's message under jit too


def _spec_message(fn_name, *args, **kwargs):
    with pytest.raises(S.DPKDInputError) as info:
        getattr(S, fn_name)(*[np.asarray(a) if isinstance(a, jax.Array) else a for a in args], **kwargs)
    return str(info.value)


@pytest.mark.parametrize("bad", [dict(beta=-1.0), dict(beta=float("nan")), dict(reduction="avg"),
                                 dict(label_smoothing=0.7)])
def test_option_errors_under_jit_match_spec(bad):
    z = jnp.zeros(3)
    expected = _spec_message("dpkd_loss", z, z, z, z, **bad)
    for fn in (J.dpkd_loss, J.jit(J.dpkd_loss)):
        with pytest.raises(S.DPKDInputError) as info:
            fn(z, z, z, z, **bad)
        assert str(info.value) == expected


def test_shape_and_dtype_errors_under_jit_and_vmap_match_spec():
    s, t = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 4))
    m = jnp.ones((2, 3), bool)
    expected = _spec_message("dpkd_token_loss", s, t, m)
    with pytest.raises(S.DPKDInputError) as info:
        J.jit(J.dpkd_token_loss)(s, t, m)
    assert str(info.value) == expected
    # under vmap the per-problem shapes are checked: the spec's message for one problem
    expected_one = _spec_message("dpkd_token_loss", s[0], t[0], m[0])
    with pytest.raises(S.DPKDInputError) as info:
        jax.vmap(J.dpkd_token_loss)(s[None], t[None], m[None])
    assert str(info.value) == expected_one
    labels = jnp.zeros((2, 3), jnp.float32)
    expected = _spec_message("token_logps", s, labels)
    with pytest.raises(S.DPKDInputError) as info:
        J.jit(J.token_logps)(s, labels)
    assert str(info.value) == expected


def test_traced_option_is_refused_naming_it():
    z = jnp.zeros(3)
    with pytest.raises(S.DPKDInputError, match=r"dpkd_loss: `beta` must be a static Python value"):
        jax.jit(J.dpkd_loss)(z, z, z, z, beta=0.5)  # beta traced: not marked static


# --------------------------------------------------------------------------------------------------
# Value checks: eager (also under grad), skipped under plain jit, checkify under `checked`

VALUE_CASES = [
    ("dpkd_loss", "policy_chosen_logps holds NaN",
     lambda z, l: ((z.at[1].set(jnp.nan), z, z, z), {})),
    ("dpkd_loss", "chosen_lengths = 0",
     lambda z, l: ((z, z, z, z), dict(chosen_lengths=l.at[2].set(0), rejected_lengths=l))),
    ("dpkd_loss", "rejected_lengths < 0",
     lambda z, l: ((z, z, z, z), dict(chosen_lengths=l, rejected_lengths=l.at[0].set(-3)))),
    ("ipo_loss", "reference_rejected_logps holds Inf",
     lambda z, l: ((z, z, z, z.at[0].set(jnp.inf)), dict(chosen_lengths=l, rejected_lengths=l))),
]


@pytest.mark.parametrize("name,label,make", VALUE_CASES, ids=[c[1] for c in VALUE_CASES])
def test_sequence_value_checks(name, label, make):
    args, kwargs = make(jnp.zeros(4), jnp.ones(4, jnp.int32))
    expected = _spec_message(name, *args, **{k: np.asarray(x) for k, x in kwargs.items()})
    fn = getattr(J, name)
    with pytest.raises(S.DPKDInputError) as info:  # eager
        fn(*args, **kwargs)
    assert str(info.value) == expected
    with pytest.raises(S.DPKDInputError) as info:  # eager under grad: the predicate is still concrete
        jax.grad(lambda a0: fn(a0, *args[1:], **kwargs).loss)(args[0])
    assert str(info.value) == expected
    J.jit(fn)(*args, **kwargs)  # plain jit: skipped (no error, no crash)
    err, _ = J.jit(J.checked(fn))(*args, **kwargs)
    with pytest.raises(S.DPKDInputError) as info:
        J.throw(err)
    assert str(info.value) == expected


def _token_value_cases():
    s = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 5)), jnp.float32)
    m = jnp.ones((2, 3), jnp.float32)
    labels = jnp.zeros((2, 3), jnp.int32)
    return [
        ("dpkd_token_loss", (s.at[0, 0, 0].set(jnp.nan), s, m), {}),
        ("dpkd_token_loss", (s, s.at[1, 2, 3].set(-jnp.inf), m), {}),
        ("dpkd_token_loss", (s, s, m.at[0, 1].set(0.5)), {}),
        ("dpkd_token_loss", (s, s, jnp.zeros_like(m)), {}),
        ("forward_kl", (s, s, jnp.zeros_like(m)), {}),
        ("akl", (s, s, m.at[1, 1].set(2.0)), {}),
        ("token_logps", (s, labels.at[0, 0].set(5)), {}),
        ("sequence_logps", (s, labels.at[1, 2].set(-5)), {}),
        ("cross_entropy", (s, jnp.full_like(labels, -100)), {}),
        ("cross_entropy", (s.at[0, 0, 0].set(jnp.nan), labels), {}),
        ("first_token_divergence", (s[:, 0].at[0, 0].set(jnp.inf), s[:, 0]), {}),
        ("implicit_reward", (m[0], m[0]), dict(lengths=jnp.array([1, 0, 1]))),
        ("objective", (1.0, jnp.asarray(jnp.nan)), dict(config=S.DISTIL_ONLY)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_token_and_other_value_checks(case):
    name, args, kwargs = _token_value_cases()[case]
    expected = _spec_message(name, *args, **kwargs)
    fn = getattr(J, name)
    with pytest.raises(S.DPKDInputError) as info:
        fn(*args, **kwargs)
    assert str(info.value) == expected
    J.jit(fn)(*args, **kwargs)  # skipped under plain jit
    err, _ = J.jit(J.checked(fn))(*args, **kwargs)
    with pytest.raises(S.DPKDInputError) as info:
        J.throw(err)
    assert str(info.value) == expected


def test_checked_valid_call_has_no_error_and_the_eager_output():
    rng = np.random.default_rng(7)
    s, t, m = _token_problems(rng, problems=1)
    err, out = J.jit(J.checked(J.dpkd_token_loss))(s[0], t[0], m[0], beta=0.3, form="ipo")
    assert err.get() is None
    J.throw(err)  # nothing to raise
    for got, want in zip(out, J.dpkd_token_loss(s[0], t[0], m[0], beta=0.3, form="ipo")):
        _close(got, want)


def test_checked_under_vmap_reports_the_failing_problem_with_the_eager_message():
    rng = np.random.default_rng(8)
    (a, b, c, d), (lt, ls) = _seq_problems(rng)
    lt = lt.at[2, 1].set(0)

    def problem(a, b, c, d, lt, ls):
        return J.dpkd_loss(a, b, c, d, chosen_lengths=lt, rejected_lengths=ls)

    err, _ = jax.jit(jax.vmap(J.checked(problem)))(a, b, c, d, lt, ls)
    assert "mapped index 2" in err.get()
    expected = _spec_message("dpkd_loss", a[2], b[2], c[2], d[2], chosen_lengths=np.asarray(lt[2]),
                             rejected_lengths=np.asarray(ls[2]))
    with pytest.raises(S.DPKDInputError) as info:
        J.throw(err)
    assert str(info.value) == expected


def test_checks_are_not_emitted_outside_checked():
    # a staged checkify.check that nobody functionalises would make jax.jit fail: make sure none leaks
    z = jnp.zeros(3)
    jax.jit(lambda a: J.dpkd_loss(a, z, z, z).loss)(z.at[0].set(jnp.nan))
    J.jit(J.checked(J.dpkd_loss))(z, z, z, z)
    jax.jit(lambda a: J.dpkd_loss(a, z, z, z).loss)(z)
