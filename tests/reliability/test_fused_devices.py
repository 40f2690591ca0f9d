"""Tensors on another device in the Torch fused path are refused naming the argument (as the materialised
path does), not with a raw device error from inside a kernel. The other device is ``meta`` (no GPU here)."""

import pytest

torch = pytest.importorskip("torch")

from dpkd.backends import torch as T  # noqa: E402
from dpkd.spec.validation import DPKDInputError  # noqa: E402

H, V = 4, 7


def _on(device, *shape, integer=False, ones=False):
    if integer or ones:
        return (torch.zeros if integer else torch.ones)(shape, dtype=torch.long if integer else None, device=device)
    return torch.randn(shape).to(device)


CASES = [
    ("linear_token_logps", "labels", lambda m: T.linear_token_logps(_on("cpu", 3, H), _on("cpu", V, H),
                                                                    _on(m, 3, integer=True))),
    ("fused_cross_entropy", "labels", lambda m: T.fused_cross_entropy(_on("cpu", 3, H), _on("cpu", V, H),
                                                                      _on(m, 3, integer=True))),
    ("fused_forward_kl", "mask", lambda m: T.fused_forward_kl(
        _on("cpu", 2, 3, H), _on("cpu", V, H), _on("cpu", 2, 3, H), _on("cpu", V, H), _on(m, 2, 3, ones=True))),
    ("fused_forward_kl", "teacher_weight", lambda m: T.fused_forward_kl(
        _on("cpu", 2, 3, H), _on("cpu", V, H), _on("cpu", 2, 3, H), _on(m, V, H), _on("cpu", 2, 3, ones=True))),
    ("fused_dpkd_loss", "chosen_labels", lambda m: T.fused_dpkd_loss(
        _on("cpu", 2, 3, H), _on("cpu", 2, 3, H), _on("cpu", V, H), _on(m, 2, 3, integer=True),
        _on("cpu", 2, 3, integer=True), reference_free=True)),
    ("fused_dpkd_loss", "rejected_labels", lambda m: T.fused_dpkd_loss(
        _on("cpu", 2, 3, H), _on("cpu", 2, 3, H), _on("cpu", V, H), _on("cpu", 2, 3, integer=True),
        _on(m, 2, 3, integer=True), reference_free=True)),
    ("fused_dpkd_loss", "weight", lambda m: T.fused_dpkd_loss(
        _on("cpu", 2, 3, H), _on("cpu", 2, 3, H), _on(m, V, H), _on("cpu", 2, 3, integer=True),
        _on("cpu", 2, 3, integer=True), reference_free=True)),
]


@pytest.mark.parametrize("func, argument, call", CASES, ids=[f"{f}-{a}" for f, a, _ in CASES])
def test_another_device_is_named(func, argument, call):
    with pytest.raises(DPKDInputError) as info:
        call("meta")
    assert str(info.value).startswith(f"{func}: `{argument}` is on device meta but `")
    assert "move them to one device" in str(info.value)
    call("cpu")  # the same call on one device runs
