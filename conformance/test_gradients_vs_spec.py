"""Backend autograd equals the spec's analytic gradient (``<name>_grad``) of S = sum(loss), with respect to
every float array argument, in every dtype the backend takes."""

import pytest
from dpkd.conformance import testing as t
from dpkd.spec import registry
from hypothesis import assume, given
from hypothesis import strategies as st

DTYPES = ("float64", "float32", "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", t.cases(lambda s: s.gradient is not None), ids=str)
@given(data=st.data())
def test_gradient_matches_spec_analytic_gradient(backend, case, dtype, data):
    if t.is_reference(backend):
        pytest.skip("the numpy backend's gradients are the spec's (checked against finite differences)")
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name} does not take {dtype}")
    t.require(backend, case.spec.name)
    call = data.draw(t.calls(case.spec, case.variant, shapes=t.BACKEND_SHAPES), label="call")
    seen = t.round_call(call, backend.rounded, dtype)
    assume(t.well_conditioned(case.spec, seen, t.TOLERANCES[dtype].margin))
    wrt = registry.differentiable_positions(case.spec, call)
    expected = case.spec.gradient_function()(*seen.args, **seen.kwargs)
    _, grads = backend.value_and_grad(case.spec.name, call.args, dict(call.kwargs), wrt, dtype)
    for i, g in zip(wrt, grads):
        name = case.spec.positional[i].name
        t.assert_close(g, expected[name], dtype=dtype, quantity="gradients", backend=backend.name,
                       what=f"d sum({case.spec.name}) / d {name}", call=seen)
