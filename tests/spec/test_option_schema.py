"""Every function's options are declared once, beside the spec function, and that declaration is what every
caller checks: the spec, both backends, their nn.Module wrappers, the fused path and the registry."""

from __future__ import annotations

import inspect

import dpkd.spec as spec
import pytest
from dpkd.spec import registry
from dpkd.spec import validation as v

PUBLIC = [n for n in spec.__all__ if n[0].islower() and callable(getattr(spec, n)) and not n.endswith("_grad")]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_function_declares_its_options_as_in_its_signature(name):
    params = inspect.signature(getattr(spec, name)).parameters
    keyword = [(n, p.default) for n, p in params.items() if p.kind is p.KEYWORD_ONLY
               and n not in ("chosen_lengths", "rejected_lengths", "lengths")]
    assert [(o.name, o.default) for o in v.options_of(name)] == keyword
    if name in {s.name for s in registry.REGISTRY}:
        assert registry.get(name).params == v.options_of(name)  # the registry reads the same declaration


def test_a_declaration_that_disagrees_with_the_signature_is_refused():
    with pytest.raises(TypeError, match="options of f"):
        @v.options(v.BETA)
        def f(x, *, beta=0.2, reduction="mean"):  # noqa: ARG001
            return x


def test_check_options_in_signature_order_and_the_requires_rule():
    # two bad options: the first in signature order is named
    with pytest.raises(v.DPKDInputError, match=r"^dpkd_token_loss: `beta` "):
        v.check_options("dpkd_token_loss", beta=-1.0, reduction="bad")
    with pytest.raises(v.DPKDInputError, match=r"^dpkd_token_loss: `label_smoothing` only applies to "
                                               r"form='sigmoid', got form='ipo'$"):
        v.check_options("dpkd_token_loss", form="ipo", label_smoothing=0.1)
    with pytest.raises(v.DPKDInputError, match=r"^forward_kl: `normalizer` only applies to reduction='mean'"):
        v.check_options("forward_kl", normalizer=3.0, reduction="sum")
    with pytest.raises(v.DPKDInputError, match=r"^dpkd_loss: `reference_free` must be True or False, got 1$"):
        v.check_options("dpkd_loss", reference_free=1)
    with pytest.raises(TypeError, match="declares no option"):
        v.check_options("dpkd_loss", tau=0.1)
    assert v.check_options("cpo_loss", beta=1, nll_weight=0) == {"beta": 1.0, "nll_weight": 0.0}


def test_fused_and_vocab_parallel_names_share_the_declaration():
    assert v.options_of("fused_dpkd_loss") is v.options_of("dpkd_loss")
    assert v.options_of("vocab_parallel_forward_kl") is v.options_of("forward_kl")
    assert v.options_of("akl_grad") is v.options_of("akl")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_backend_functions_and_modules_raise_the_declared_message(framework):
    backend = pytest.importorskip(f"dpkd.backends.{framework}")
    if framework == "torch":
        x = pytest.importorskip("torch").zeros(3)
    else:
        x = pytest.importorskip("jax.numpy").zeros(3)
    for bad in v.LABEL_SMOOTHING.invalid_values():
        with pytest.raises(v.DPKDInputError, match=r"^dpkd_loss: `label_smoothing` must be "):
            backend.dpkd_loss(x, x, x, x, label_smoothing=bad)
    if framework == "torch":
        with pytest.raises(v.DPKDInputError, match=r"^dpkd_token_loss: `label_smoothing` only applies to"):
            backend.DPKDTokenLoss(form="dpop", label_smoothing=0.2)
