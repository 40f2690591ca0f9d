"""Metrics in PyTorch: implicit reward (paper Eq. 29), TRL-named preference metrics, first-token divergence.

Nothing here is differentiated: results are detached tensors or Python floats (the dict metrics read
their values to the host, which ends a torch.compile graph — call them outside the compiled step).
"""

from __future__ import annotations

import torch
from dpkd.spec import validation as v

from ._base import (
    ValueChecks,
    check_same_placement,
    compute_dtype,
    float_arg,
    kl_divergence,
    sequence_inputs,
    shape_of,
)

__all__ = ["implicit_reward", "preference_metrics", "first_token_divergence"]


def implicit_reward(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, *, beta: float = 0.1,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dpkd.spec.implicit_reward`` in PyTorch: the DPO/DPKD implicit reward of a response, elementwise. Formula,
    arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> implicit_reward(torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5)
        tensor([0.5000])
    """
    func = "implicit_reward"
    v.check_options(func, beta=beta)
    t = sequence_inputs(func, {"policy_logps": policy_logps, "reference_logps": reference_logps,
                               "lengths": lengths}, optional=("lengths",), lengths=("lengths",))
    r = t["policy_logps"] - t["reference_logps"]
    if t["lengths"] is not None:
        r = r / t["lengths"]
    return (beta * r).detach()


def preference_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """``dpkd.spec.preference_metrics`` in PyTorch: the metrics TRL's DPOTrainer logs, for one batch of (y_t, y_s)
    pairs. Formula, arguments, errors and references: the spec function. Dtypes and checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> m = preference_metrics(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
        ...                        torch.tensor([-2.0]), beta=1.0)
        >>> m["rewards/margins"], m["rewards/accuracies"]
        (2.0, 1.0)
    """
    func = "preference_metrics"
    v.check_options(func, beta=beta)
    v.check_lengths_pair(func, chosen_lengths, rejected_lengths)
    names = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
             "chosen_lengths", "rejected_lengths")
    t = sequence_inputs(func, dict(zip(names, (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                               reference_rejected_logps, chosen_lengths, rejected_lengths))),
                        optional=names[4:], lengths=names[4:], reduction="mean")
    with torch.no_grad():
        a, b, c, d = (t[n] for n in names[:4])
        chosen, rejected = a - c, b - d
        if t["chosen_lengths"] is not None:
            chosen, rejected = chosen / t["chosen_lengths"], rejected / t["rejected_lengths"]
        chosen, rejected = beta * chosen, beta * rejected
        values = torch.stack([
            chosen.mean(), rejected.mean(), (chosen > rejected).to(chosen.dtype).mean(),
            (chosen - rejected).mean(), a.mean(), b.mean(),
        ]).tolist()
    keys = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")
    return dict(zip(keys, values))


def first_token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """``dpkd.spec.first_token_divergence`` in PyTorch: first-response-token KLD and rKLD of the paper's Table 3
    (spec/README.md §6, the literal reading). Formula, arguments, errors and references: the spec function. Dtypes and
    checks: ``dpkd.backends.torch``.

    Example:
        >>> import torch
        >>> first_token_divergence(torch.zeros(2, 5), torch.zeros(2, 5))
        {'kld': 0.0, 'rkld': 0.0}
    """
    func = "first_token_divergence"
    v.check_student_teacher_shapes(func, shape_of(student_logits), shape_of(teacher_logits), None, min_ndim=1)
    # a mean over no prompts, or an empty vocabulary, would be a silent NaN
    v.check_nonempty_positions(func, "student_logits", shape_of(student_logits))
    s = float_arg(func, "student_logits", student_logits)
    t = float_arg(func, "teacher_logits", teacher_logits)
    check_same_placement(func, [("student_logits", s), ("teacher_logits", t)],
                         same_dtype=("student_logits", "teacher_logits"))
    checks = ValueChecks(func)
    checks.finite("student_logits", s)
    checks.finite("teacher_logits", t)
    checks.run()
    with torch.no_grad():
        dtype = compute_dtype(s.dtype)
        log_q = torch.log_softmax(s.to(dtype), dim=-1)
        log_p = torch.log_softmax(t.to(dtype), dim=-1)
        kld = kl_divergence(log_p, log_q).mean()
        rkld = kl_divergence(log_q, log_p).mean()
        kld, rkld = torch.stack([kld, rkld]).tolist()
    return {"kld": kld, "rkld": rkld}
