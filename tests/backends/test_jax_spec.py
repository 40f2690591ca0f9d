"""dpkd.backends.jax equals the float64 spec (x64 on) to 1e-10 relative — values and jax.grad against the
spec's analytic ``*_grad`` — for every function and named variant of the registry, through the
conformance suite's own ``JaxAdapter`` (so the adapter is exercised with this backend as well)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from dpkd.conformance.adapters import JaxAdapter, NumpyAdapter, scalar_of
from dpkd.spec import registry as R

RTOL = 1e-10


@pytest.fixture(scope="module")
def adapters():
    previous = jax.config.jax_enable_x64
    jax_adapter = JaxAdapter()  # turns x64 on
    yield NumpyAdapter(), jax_adapter
    jax.config.update("jax_enable_x64", previous)


CASES = [(spec.name, variant.name, seed) for spec in R.REGISTRY for variant in spec.variants for seed in (0, 1)]


def _leaves(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, tuple):
        return [leaf for o in out for leaf in _leaves(o)]
    return [out]


def _assert_close(actual, expected, what):
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, what
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    # relative to each array's own magnitude (gradient entries far below it are rounding noise of the sum)
    np.testing.assert_allclose(a, e, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@pytest.mark.parametrize("name,variant,seed", CASES, ids=[f"{n}-{v}-{s}" for n, v, s in CASES])
def test_float64_value_and_gradient_equal_the_spec(adapters, name, variant, seed):
    numpy_adapter, jax_adapter = adapters
    spec = R.get(name)
    call = R.build_call(spec, spec.variant(variant), R.default_draw(spec, spec.variant(variant), seed=seed))
    if spec.gradient is None:
        expected = numpy_adapter.call(name, call.args, dict(call.kwargs), "float64")
        actual = jax_adapter.call(name, call.args, dict(call.kwargs), "float64")
        for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
            _assert_close(a, e, f"{name}/{variant} value")
        return
    wrt = R.differentiable_positions(spec, call)
    expected, expected_grads = numpy_adapter.value_and_grad(name, call.args, dict(call.kwargs), wrt, "float64")
    actual, grads = jax_adapter.value_and_grad(name, call.args, dict(call.kwargs), wrt, "float64")
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        _assert_close(a, e, f"{name}/{variant} value")
    assert np.asarray(scalar_of(actual)).dtype == np.float64
    for i, g, e in zip(wrt, grads, expected_grads, strict=True):
        _assert_close(g, e, f"{name}/{variant} gradient w.r.t. argument {i}")
