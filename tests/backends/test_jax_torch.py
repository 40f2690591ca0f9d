"""JAX and Torch agree with each other (and both with the float64 spec) on the same random inputs: every
registry function and variant, values and gradients, in float64 (to 1e-10) and float32 (to float32
rounding), through the conformance adapters. Skipped where dpkd.backends.torch lacks a function."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest
from dpkd.conformance.adapters import JaxAdapter, NumpyAdapter, TorchAdapter
from dpkd.spec import registry as R

torch = pytest.importorskip("torch")

# float32: both backends round differently (op order, fused kernels); the bound is relative to each
# array's magnitude and to the inputs' scale, far below any modelling difference (e.g. a missing 1/L)
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}


@pytest.fixture(scope="module")
def adapters():
    try:
        importlib.import_module("dpkd.backends.torch")
    except ImportError as exc:  # pragma: no cover - the torch backend is written concurrently
        pytest.skip(f"dpkd.backends.torch is not importable: {exc}")
    torch.set_num_threads(1)
    previous = jax.config.jax_enable_x64
    pair = (JaxAdapter(), TorchAdapter(), NumpyAdapter())
    yield pair
    jax.config.update("jax_enable_x64", previous)


CASES = [(spec.name, variant.name, dtype) for spec in R.REGISTRY for variant in spec.variants
         for dtype in ("float64", "float32")]


def _leaves(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, tuple):
        return [leaf for o in out for leaf in _leaves(o)]
    return [out]


def _close(a, b, tol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, what
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1.0 if tol > 1e-9 else 0.0)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("name,variant,dtype", CASES, ids=[f"{n}-{v}-{d}" for n, v, d in CASES])
def test_jax_and_torch_agree(adapters, name, variant, dtype):
    jax_adapter, torch_adapter, numpy_adapter = adapters
    if not hasattr(torch_adapter.module, name):
        pytest.skip(f"dpkd.backends.torch has no {name} yet")
    spec = R.get(name)
    call = R.build_call(spec, spec.variant(variant), R.default_draw(spec, spec.variant(variant), seed=3))
    tol = TOLERANCE[dtype]
    if spec.gradient is None:
        outs = [ad.call(name, call.args, dict(call.kwargs), dtype) for ad in (jax_adapter, torch_adapter)]
        grads = [[], []]
    else:
        wrt = R.differentiable_positions(spec, call)
        (jo, jg), (to, tg) = (ad.value_and_grad(name, call.args, dict(call.kwargs), wrt, dtype)
                              for ad in (jax_adapter, torch_adapter))
        outs, grads = [jo, to], [jg, tg]
    for a, b in zip(_leaves(outs[0]), _leaves(outs[1]), strict=True):
        _close(a, b, tol, f"{name}/{variant}/{dtype} value: jax vs torch")
    for a, b in zip(grads[0], grads[1], strict=True):
        _close(a, b, tol, f"{name}/{variant}/{dtype} gradient: jax vs torch")
    if dtype == "float64":  # and both equal the spec
        expected = numpy_adapter.call(name, call.args, dict(call.kwargs), "float64")
        for a, e in zip(_leaves(outs[0]), _leaves(expected), strict=True):
            _close(a, e, tol, f"{name}/{variant} value: jax vs spec")
