"""Closed-form special cases of the registry (log 2 at h = 0, the limits h → ±∞, the token-level bounds
ℓ ≥ log 2 and ℓ ≥ 1/(4β²) with equality iff the argmaxes agree, JSD end points = KLs, p = q ⇒ 0, ...),
on every backend, in float64."""

import numpy as np
import pytest
from dpkd.conformance import testing as t
from dpkd.spec import registry

CLOSED_FORMS = [(s, cf) for s in registry.REGISTRY for cf in s.closed_forms]


@pytest.mark.parametrize("spec, closed_form", CLOSED_FORMS, ids=[cf.name for _, cf in CLOSED_FORMS])
def test_closed_form(backend, spec, closed_form):
    t.require(backend, spec.name)
    call = closed_form.make(np.random.default_rng(0))
    out, _ = t.run_backend(backend, call, "float64")
    value = out[closed_form.output] if isinstance(closed_form.output, str) else t._fields(out)[closed_form.output][1]
    expected = np.asarray(closed_form.expected(call), dtype=np.float64)
    what = f"{closed_form.name} [{spec.name} field {closed_form.output!r}]"
    if closed_form.relation == "==":
        t.assert_close(value, expected, dtype="float64", quantity="values", what=what, call=call,
                       backend=backend.name, extra_atol=closed_form.atol)
    else:
        assert closed_form.relation == ">"
        value = np.asarray(value, dtype=np.float64)
        where = closed_form.where(call)
        assert np.all(value[where] > expected[where]), (
            f"{what} on backend {backend.name}: expected > {expected[where]}, got {value[where]}\n    {call}")
