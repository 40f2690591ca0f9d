"""The fused lm_head path equals the float64 spec on the registry's cases, in value and in the gradient of
the student's hidden states, lm_head weight and bias: every sequence-level case through the generic
``fused_sequence_loss(NamedSequenceLoss(...))`` (a new sequence loss is fused and tested with no fused code of
its own), every token-level case through ``fused_token_loss(NamedTokenLoss(...))``, ``token_logps`` through
``linear_token_logps``, and the named wrappers (``fused_dpkd_loss``, …) on the same problems. The reference
is the spec on the materialised logits ``hidden @ Wᵀ + b``, its analytic gradient chained through the
projection (``dpkd.conformance.lm_head``). Backends without a fused path skip."""

import pytest
from dpkd.conformance import lm_head
from dpkd.conformance import testing as t

FUSABLE = t.cases(lambda s: s.kind in ("sequence", "token") or s.fused == "linear_token_logps")
# float64 on every case; float32 on each function's first variant (every case compiles once in JAX)
DTYPED = [(c, "float64") for c in FUSABLE] + [(c, "float32") for c in FUSABLE if c.variant == c.spec.variants[0]]
WRAPPED = [c for c in FUSABLE if c.spec.fused and c.spec.kind != "logps"]


def _fused(backend):
    if t.is_reference(backend) or not t.has_fused_path(backend.module):
        pytest.skip(f"backend {backend.name} has no fused lm_head path")


@pytest.mark.parametrize("case, dtype", DTYPED, ids=[f"{c}-{d}" for c, d in DTYPED])
def test_fused_path_equals_spec(backend, case, dtype):
    _fused(backend)
    fused = lm_head.fused_case(case.spec, case.variant)
    t.require(backend, fused.function)
    if dtype not in backend.dtypes:
        pytest.skip(f"backend {backend.name} does not take {dtype}")
    value, grads = backend.value_and_grad(fused.function, fused.args, dict(fused.kwargs), fused.wrt, dtype,
                                          wrt_kwargs=fused.wrt_kwargs)
    what = f"{fused.function}: {fused.name}"
    t.assert_close(t.scalar_of(value), fused.expected, dtype=dtype, quantity="values", what=what,
                   backend=backend.name, scale=fused.scale)
    for name, g, e in zip(fused.grad_names, grads, fused.gradients):
        t.assert_close(g, e, dtype=dtype, quantity="gradients", backend=backend.name, what=f"{what} d/d {name}")


@pytest.mark.parametrize("case", WRAPPED, ids=str)
def test_named_fused_wrapper_equals_spec(backend, case):
    _fused(backend)
    fused = lm_head.wrapper_case(lm_head.fused_case(case.spec, case.variant), case.spec)
    t.require(backend, fused.function)
    out = backend.call(fused.function, fused.args, dict(fused.kwargs), "float64")
    t.assert_outputs_close(out, fused.expected, dtype="float64", call=fused.spec_call, backend=backend.name,
                           scale=fused.scale)
