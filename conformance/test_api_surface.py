"""The backend exports every public function of ``dpkd.spec`` with the same parameters — names, kinds and
defaults, in order — and, when it has a fused lm_head path, every fused function of the other built-in
backend likewise. A missing function or a differing parameter FAILS here, naming it (array-api-tests'
rule); a partial backend is an explicit opt-in (``--dpkd-allow-missing=name,...``), reported in the
summary."""

import pytest
from dpkd.conformance import testing as t

SPEC_FUNCTIONS = t.spec_functions()
FUSED_FUNCTIONS = t.fused_functions()


@pytest.mark.parametrize("name", SPEC_FUNCTIONS)
def test_backend_exports_the_spec_function_with_its_parameters(backend, name):
    t.require(backend, name)
    problems = t.signature_problems(t.spec_function(name), backend.function(name))
    assert not problems, f"backend {backend.name}: {name}: " + "; ".join(problems)


@pytest.mark.parametrize("name", FUSED_FUNCTIONS)
def test_fused_path_has_every_fused_function_of_the_other_backend(backend, name):
    if not t.has_fused_path(backend.module):
        pytest.skip(f"backend {backend.name} has no fused lm_head path")
    reference = t.fused_reference(backend.module)
    if reference is None:
        pytest.skip("no other built-in backend with a fused path is installed to compare with")
    t.require(backend, name)
    problems = t.signature_problems(getattr(reference, name), backend.function(name))
    assert not problems, f"backend {backend.name}: {name} differs from {reference.__name__}.{name}: " + \
        "; ".join(problems)
