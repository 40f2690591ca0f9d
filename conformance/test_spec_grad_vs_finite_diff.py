"""The spec's analytic gradients equal float64 central finite differences of the spec's own values.

Draws within ``FINITE_DIFFERENCE.margin`` of a discontinuity (argmax tie, AKL head-set edge, DPOP kink) are
filtered with ``assume``; the tolerance is never widened. AKL's weights are stop-gradient by definition,
so its finite differences are taken of the registry's frozen-weight surrogate."""

import numpy as np
import pytest
from dpkd.conformance import testing as t
from dpkd.spec import registry
from hypothesis import assume, given
from hypothesis import strategies as st


def _summed(spec, call):
    fn = spec.reference_function()
    float_pos = registry.differentiable_positions(spec, call)

    def f(*arrays):
        args = list(call.args)
        for i, a in zip(float_pos, arrays):
            args[i] = a
        out = fn(*args, **call.kwargs)
        return float(np.sum(out[0] if isinstance(out, tuple) else out))

    return f


@pytest.mark.parametrize("case", t.cases(lambda s: s.gradient is not None), ids=str)
@given(data=st.data())
def test_analytic_gradient_matches_finite_differences(case, data):
    spec = case.spec
    call = data.draw(t.calls(spec, case.variant, max_batch=2, max_tokens=3, max_vocab=5), label="call")
    assume(t.well_conditioned(spec, call, t.FINITE_DIFFERENCE.margin))
    positions = registry.differentiable_positions(spec, call)
    arrays = [call.args[i] for i in positions]
    f = spec.fd_surrogate(call) if spec.fd_surrogate else _summed(spec, call)
    analytic = spec.gradient_function()(*call.args, **call.kwargs)
    scale = max(1.0, abs(f(*arrays)))
    for k, i in enumerate(positions):
        name = spec.positional[i].name
        numeric = t.central_difference(f, arrays, k)
        t.assert_close(analytic[name], numeric, dtype="float64", quantity="finite_difference", scale=scale,
                       what=f"{spec.name}_grad[{name!r}] vs central differences", call=call)
