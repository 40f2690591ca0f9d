"""The bad-input battery (spec/CONVENTIONS.md, "General": Errors): every invalid call raises ``DPKDInputError``
whose message names the function and the argument, and every backend raises the SAME message as the
spec. Cases come from the registry: option ranges, unknown reductions/forms, NaN/Inf, shapes, lengths ≤ 0,
labels outside the vocabulary, vocabulary mismatch, empty means, one-sided lengths, normalizer misuse."""

import numpy as np
import pytest
from dpkd.conformance import testing as t
from dpkd.spec import registry
from dpkd.spec.validation import DPKDInputError


def _battery():
    for spec in registry.REGISTRY:
        for bad in registry.bad_inputs(spec):
            yield pytest.param(spec, bad, id=f"{spec.name}: {bad.name} -> `{bad.argument}`")


BATTERY = list(_battery())


def _bad_call(spec, bad):
    variant = spec.variant(bad.variant) if bad.variant else spec.variants[0]
    base = registry.build_call(spec, variant, registry.default_draw(spec, variant, seed=3))
    return bad.mutate(base)


def _message(fn, call, convert=lambda x: x):
    with pytest.raises(DPKDInputError) as info:
        fn(*[convert(a) for a in call.args], **{k: convert(v) for k, v in call.kwargs.items()})
    return str(info.value)


@pytest.mark.parametrize("spec, bad", BATTERY)
def test_spec_refuses_with_a_message_naming_the_argument(spec, bad):
    call = _bad_call(spec, bad)
    message = _message(spec.reference_function(), call)
    assert message.startswith(f"{spec.name}: `{bad.argument}` "), f"{message!r}\n    {call}"


@pytest.mark.parametrize("spec, bad", BATTERY)
def test_backend_raises_the_same_message_as_the_spec(backend, spec, bad):
    if t.is_reference(backend):
        pytest.skip("the numpy backend is the spec (see test_spec_refuses_with_a_message_naming_the_argument)")
    t.require(backend, spec.name)
    call = _bad_call(spec, bad)
    expected = _message(spec.reference_function(), call)

    def convert(x):
        return backend.asarray(x, "float64") if isinstance(x, np.ndarray) else x

    assert _message(backend.function(spec.name), call, convert) == expected, f"    {call}"
