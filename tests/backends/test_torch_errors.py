"""Validation of the Torch backend: the spec's error classes and messages, device/dtype mismatches, and
gradient accumulation made exact by ``normalizer``.

Another device is simulated with PyTorch's ``meta`` device, so these tests run on a CPU-only machine.
"""

from __future__ import annotations

import dpkd.backends.torch as dt
import dpkd.spec as spec
import numpy as np
import pytest
import torch
from dpkd.spec import DPKDInputError

torch.set_num_threads(1)

rng = np.random.default_rng(0)
a, b, c, d = (rng.normal(size=4) for _ in range(4))
lengths = np.array([1, 2, 3, 4])
S, T = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
mask = np.ones((2, 3))
labels = np.zeros((2, 3), dtype=np.int64)
nan = a.copy()
nan[2] = np.nan

# (function, positional arrays, options): each must raise the spec's error with the spec's exact message
BAD = [
    ("dpkd_loss", [a, b, c, d], dict(beta=-1.0)),
    ("dpkd_loss", [a, b, c, d], dict(chosen_lengths=lengths)),
    ("dpkd_loss", [a, b, c, d], dict(chosen_lengths=lengths - 1, rejected_lengths=lengths)),
    ("dpkd_loss", [a, b, c, nan], {}),
    ("dpkd_loss", [a, b, c, d[:3]], {}),
    ("dpkd_loss", [a, b, None, d], {}),
    ("dpkd_loss", [a, b, c, d > 0], {}),
    ("dpkd_loss", [a[:0], b[:0], c[:0], d[:0]], {}),
    ("ipo_loss", [a, b, c, d], {}),
    ("ipo_loss", [a, b, c, d], dict(length_normalize=False, rejected_lengths=lengths)),
    ("simpo_loss", [a, b], dict(chosen_lengths=None, rejected_lengths=lengths)),
    ("dpop_loss", [a, b, c, d], dict(form="x")),
    ("dpkd_token_loss", [S, T[..., :4], mask], {}),
    ("dpkd_token_loss", [S, T, mask * 0], {}),
    ("dpkd_token_loss", [S, T, mask * 2], {}),
    ("dpkd_token_loss", [S, T, mask], dict(normalizer=3.0, reduction="sum")),
    ("dpkd_token_loss", [S, T * np.inf, mask], {}),
    ("dpkd_token_loss", [S, T, mask], dict(form="ipo", label_smoothing=0.1)),
    ("akl", [S, T, mask[:, :2]], {}),
    ("cross_entropy", [S, labels + 5], {}),
    ("cross_entropy", [S, labels - 100], {}),
    ("cross_entropy", [S, labels.astype(np.float64)], {}),
    ("token_logps", [S, None], {}),
    ("shift_for_causal_lm", [S[:, :1], labels[:, :1]], {}),
    ("first_token_divergence", [S[:, 0], T[:, 0, :3]], {}),
    ("implicit_reward", [a, c], dict(lengths=lengths * 0)),
    ("objective", [np.array(1.0), None], dict(config=spec.RELEASED_OBJECTIVE)),
]


def _torch(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


@pytest.mark.parametrize("case", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_same_error_and_message_as_spec(case) -> None:
    name, args, kw = case
    with pytest.raises(DPKDInputError) as expected:
        getattr(spec, name)(*args, **kw)
    with pytest.raises(DPKDInputError) as got:
        getattr(dt, name)(*[_torch(x) for x in args], **kw)
    assert str(got.value) == str(expected.value)


def test_student_teacher_device_mismatch() -> None:
    s = torch.randn(2, 3, 5)
    with pytest.raises(DPKDInputError, match=r"dpkd_token_loss: `teacher_logits` is on device meta but "
                                             r"`student_logits` is on cpu"):
        dt.dpkd_token_loss(s, torch.empty(2, 3, 5, device="meta"), torch.ones(2, 3))
    with pytest.raises(DPKDInputError, match=r"forward_kl: `mask` is on device meta"):
        dt.forward_kl(s, s, torch.ones(2, 3, device="meta"))
    x = torch.zeros(4)
    with pytest.raises(DPKDInputError, match=r"dpkd_loss: `reference_rejected_logps` is on device meta"):
        dt.dpkd_loss(x, x, x, torch.zeros(4, device="meta"))
    with pytest.raises(DPKDInputError, match=r"token_logps: `labels` is on device meta"):
        dt.token_logps(s, torch.zeros(2, 3, dtype=torch.long, device="meta"))


def test_student_teacher_dtype_mismatch() -> None:
    s = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    with pytest.raises(DPKDInputError, match=r"dpkd_token_loss: `teacher_logits` has dtype torch.float32 but "
                                             r"`student_logits` has torch.bfloat16"):
        dt.dpkd_token_loss(s, s.float(), torch.ones(2, 3))
    x = torch.zeros(4)
    with pytest.raises(DPKDInputError, match=r"dpkd_loss: `reference_chosen_logps` has dtype torch.float64"):
        dt.dpkd_loss(x, x, x.double(), x)
    # the mask and the lengths are not log-probs: their dtype is free
    dt.dpkd_token_loss(s, s, torch.ones(2, 3, dtype=torch.bool))
    dt.dpkd_loss(x, x, x, x, chosen_lengths=torch.ones(4, dtype=torch.long), rejected_lengths=torch.ones(4))


@pytest.mark.parametrize("name", ["dpkd_token_loss", "forward_kl", "akl", "cross_entropy"])
def test_normalizer_makes_gradient_accumulation_exact(name: str) -> None:
    """Batch 8 × accumulation 1 equals batch 1 × accumulation 8 when every micro-batch gets the global count."""
    g = torch.Generator().manual_seed(7)
    S0 = torch.randn(8, 5, 11, generator=g, dtype=torch.float64)
    T0 = torch.randn(8, 5, 11, generator=g, dtype=torch.float64)
    m0 = (torch.rand(8, 5, generator=g) > 0.4).to(torch.float64)
    m0[:, 0] = 1.0
    lab = torch.randint(0, 11, (8, 5), generator=g)
    lab[m0 == 0] = -100

    def loss(s, rows, normalizer=None):
        kw = {} if normalizer is None else dict(normalizer=normalizer)
        if name == "cross_entropy":
            return dt.cross_entropy(s, lab[rows], **kw)
        out = getattr(dt, name)(s, T0[rows], m0[rows], **kw)
        return out.loss if name == "dpkd_token_loss" else out

    full = S0.clone().requires_grad_(True)
    loss(full, slice(None)).backward()

    micro = S0.clone().requires_grad_(True)
    total_tokens = float(m0.sum())
    accumulated = 0.0
    for i in range(8):
        step = loss(micro[i:i + 1], slice(i, i + 1), normalizer=total_tokens)
        step.backward()
        accumulated += step.item()
    assert accumulated == pytest.approx(loss(S0, slice(None)).item(), rel=1e-13)
    torch.testing.assert_close(micro.grad, full.grad, rtol=1e-12, atol=1e-16)
    # without the global count each micro-batch would average on its own: not equal
    naive = sum(loss(S0[i:i + 1], slice(i, i + 1)).item() for i in range(8)) / 8
    assert naive != pytest.approx(loss(S0, slice(None)).item(), rel=1e-6)


def test_normalizer_accepts_a_zero_dim_tensor_eagerly() -> None:
    s = torch.randn(1, 4, 3)
    m = torch.ones(1, 4)
    torch.testing.assert_close(dt.forward_kl(s, s.flip(-1), m, normalizer=torch.tensor(8)),
                               dt.forward_kl(s, s.flip(-1), m, normalizer=8.0))
