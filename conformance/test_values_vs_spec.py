"""Backend values equal the float64 spec evaluated on the inputs as the backend saw them (every dtype the
backend takes, the tolerance table of ``dpkd.conformance.testing``)."""

import pytest
from dpkd.conformance import testing as t
from hypothesis import assume, given
from hypothesis import strategies as st

DTYPES = ("float64", "float32", "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", t.cases(), ids=str)
@given(data=st.data())
def test_value_matches_float64_spec(backend, case, dtype, data):
    if t.is_reference(backend):
        pytest.skip("the numpy backend is the spec itself (see the closed-form, finite-difference and golden tests)")
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name} does not take {dtype}")
    t.require(backend, case.spec.name)
    call = data.draw(t.calls(case.spec, case.variant, shapes=t.BACKEND_SHAPES), label="call")
    seen = t.round_call(call, backend.rounded, dtype)
    assume(t.well_conditioned(case.spec, seen, t.TOLERANCES[dtype].margin))
    expected = t.spec_output(seen)
    actual, bf16_fields = t.run_backend(backend, call, dtype)
    t.assert_outputs_close(actual, expected, dtype=dtype, call=seen, backend=backend.name, bf16_fields=bf16_fields)
