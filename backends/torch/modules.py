"""``nn.Module`` wrappers: the losses people configure once and call every step.

Each module stores its options, validates them at construction (the same ``DPKDInputError`` and message
as the functional form, which is named in it), and its ``forward`` calls the functional form with those
options; the per-call extras (lengths, ``normalizer``) stay keyword arguments of ``forward``.

    >>> import torch
    >>> loss_fn = DPKDLoss(beta=0.1)
    >>> out = loss_fn(torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-6.0]))
    >>> round(out.loss.item(), 4)   # softplus(−0.1·(−4))
    0.9130

The modules hold no parameters and no buffers: moving them between devices is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpkd.spec import validation as v
from torch import nn

from . import distill, sequence, token

__all__ = [
    "DPKDLoss",
    "IPOLoss",
    "CPOLoss",
    "SimPOLoss",
    "DPOPLoss",
    "DPKDTokenLoss",
    "CrossEntropyLoss",
    "ForwardKL",
    "ReverseKL",
    "GeneralizedJSD",
    "AKL",
]


class _ConfiguredLoss(nn.Module):
    """A functional loss with its options bound; subclasses name the function and its options.

    The options are checked at construction against the spec's declaration of the function (the message
    names the function: ``dpkd_loss: `beta` must be > 0.0, got -1.0``)."""

    _function: Callable[..., Any]

    def __init__(self, **options: Any):
        super().__init__()
        v.check_options(type(self)._function.__name__, **options)
        self.options = options

    def forward(self, *arrays: Any, **per_call: Any) -> Any:
        return type(self)._function(*arrays, **self.options, **per_call)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DPKDLoss(_ConfiguredLoss):
    """Sequence-level DPKD (``dpkd_loss``): forward(a, b, c, d, chosen_lengths=None, rejected_lengths=None)."""

    _function = staticmethod(sequence.dpkd_loss)

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.0, reference_free: bool = False,
                 reduction: str = "mean"):
        super().__init__(beta=beta, label_smoothing=label_smoothing, reference_free=reference_free,
                         reduction=reduction)


class IPOLoss(_ConfiguredLoss):
    """IPO (``ipo_loss``): forward(a, b, c, d, chosen_lengths=..., rejected_lengths=...)."""

    _function = staticmethod(sequence.ipo_loss)

    def __init__(self, *, tau: float = 0.1, length_normalize: bool = True, reduction: str = "mean"):
        super().__init__(tau=tau, length_normalize=length_normalize, reduction=reduction)


class CPOLoss(_ConfiguredLoss):
    """CPO (``cpo_loss``): forward(a, b, chosen_lengths=None)."""

    _function = staticmethod(sequence.cpo_loss)

    def __init__(self, *, beta: float = 0.1, nll_weight: float = 1.0, label_smoothing: float = 0.0,
                 reduction: str = "mean"):
        super().__init__(beta=beta, nll_weight=nll_weight, label_smoothing=label_smoothing, reduction=reduction)


class SimPOLoss(_ConfiguredLoss):
    """SimPO (``simpo_loss``): forward(a, b, chosen_lengths=..., rejected_lengths=...). No NLL term."""

    _function = staticmethod(sequence.simpo_loss)

    def __init__(self, *, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0,
                 reduction: str = "mean"):
        super().__init__(beta=beta, gamma=gamma, label_smoothing=label_smoothing, reduction=reduction)


class DPOPLoss(_ConfiguredLoss):
    """DPOP (``dpop_loss``), form "smaug" or "released": forward(a, b, c, d)."""

    _function = staticmethod(sequence.dpop_loss)

    def __init__(self, *, beta: float = 0.1, lambda_: float = 50.0, form: str = "smaug", reduction: str = "mean"):
        super().__init__(beta=beta, lambda_=lambda_, form=form, reduction=reduction)


class DPKDTokenLoss(_ConfiguredLoss):
    """Token-level DPKD (``dpkd_token_loss``): forward(student_logits, teacher_logits, mask, normalizer=None)."""

    _function = staticmethod(token.dpkd_token_loss)

    def __init__(self, *, beta: float = 0.1, form: str = "sigmoid", label_smoothing: float = 0.0,
                 reference_free: bool = False, lambda_: float = 50.0, reduction: str = "mean"):
        super().__init__(beta=beta, form=form, label_smoothing=label_smoothing, reference_free=reference_free,
                         lambda_=lambda_, reduction=reduction)


class CrossEntropyLoss(_ConfiguredLoss):
    """SFT cross-entropy (``cross_entropy``): forward(logits, labels, normalizer=None)."""

    _function = staticmethod(distill.cross_entropy)

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(ignore_index=ignore_index, reduction=reduction)


class ForwardKL(_ConfiguredLoss):
    """Forward KL(p‖q) (``forward_kl``): forward(student_logits, teacher_logits, mask, normalizer=None)."""

    _function = staticmethod(distill.forward_kl)

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__(temperature=temperature, reduction=reduction)


class ReverseKL(_ConfiguredLoss):
    """Reverse KL(q‖p) (``reverse_kl``): forward(student_logits, teacher_logits, mask, normalizer=None)."""

    _function = staticmethod(distill.reverse_kl)

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__(temperature=temperature, reduction=reduction)


class GeneralizedJSD(_ConfiguredLoss):
    """Generalised JSD, TRL's GKD convention (``generalized_jsd``): forward(S, T, mask, normalizer=None)."""

    _function = staticmethod(distill.generalized_jsd)

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__(beta=beta, temperature=temperature, reduction=reduction)


class AKL(_ConfiguredLoss):
    """Adaptive KL (``akl``): forward(student_logits, teacher_logits, mask, normalizer=None)."""

    _function = staticmethod(distill.akl)

    def __init__(self, *, mu: float = 0.5, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__(mu=mu, temperature=temperature, reduction=reduction)
