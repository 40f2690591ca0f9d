"""The fused lm_head path's edge cases, held to the materialised path's contract in every backend: an empty
batch (B = 0: 'mean' refused naming the argument, 'sum' 0 with zero gradients, 'none' empty), token losses
over zero rows (0, with their per-token outputs empty), small integer label dtypes (int8 / int16 / uint8
gather like int64), and length-normalised losses with a row of no labelled tokens (refused naming the
labels). Backends without a fused path skip."""

import numpy as np
import pytest
from dpkd.conformance import testing as t
from dpkd.spec.results import TeacherLogps
from dpkd.spec.validation import DPKDInputError

H, V = 4, 7


def _fused(backend):
    if t.is_reference(backend) or not t.has_fused_path(backend.module):
        pytest.skip(f"backend {backend.name} has no fused lm_head path")


def _sequence_args(b, rng, labels_dtype=np.int64):
    labels = rng.integers(0, V, (b, 3)).astype(labels_dtype)
    return [rng.standard_normal((b, 3, H)), rng.standard_normal((b, 3, H)), rng.standard_normal((V, H)), labels,
            labels[:, ::-1].copy()]


@pytest.mark.parametrize("func", ["fused_dpkd_loss", "fused_ipo_loss", "fused_simpo_loss"])
def test_an_empty_batch_follows_the_materialised_contract(backend, func):
    _fused(backend)
    t.require(backend, func)
    args = _sequence_args(0, np.random.default_rng(0))
    kw = {} if func == "fused_simpo_loss" else {"teacher": TeacherLogps(np.zeros(0), np.zeros(0))}
    with pytest.raises(DPKDInputError) as info:
        backend.call(func, args, kw, "float64")
    assert str(info.value).startswith(f"{func}: `chosen_hidden` holds no pairs (B = 0), so reduction='mean'")
    value, grads = backend.value_and_grad(func, args, {**kw, "reduction": "sum"}, (0, 1, 2), "float64")
    assert float(t.scalar_of(value)) == 0.0
    assert [g.shape for g in grads] == [(0, 3, H), (0, 3, H), (V, H)] and not np.any(grads[2])
    assert t.scalar_of(backend.call(func, args, {**kw, "reduction": "none"}, "float64")).shape == (0,)


@pytest.mark.parametrize("func", ["fused_forward_kl", "fused_akl", "fused_dpkd_token_loss"])
@pytest.mark.parametrize("rows", [0, 2])
def test_token_losses_over_no_rows_or_no_tokens(backend, func, rows):
    _fused(backend)
    t.require(backend, func)
    rng = np.random.default_rng(1)
    args = [rng.standard_normal((rows, 3, H)), rng.standard_normal((V, H)), rng.standard_normal((rows, 3, H)),
            rng.standard_normal((V, H)), np.zeros((rows, 3))]
    out = backend.call(func, args, {"reduction": "sum"}, "float64")
    assert float(t.scalar_of(out)) == 0.0
    if func == "fused_dpkd_token_loss":  # the per-token outputs exist (empty or zero), the agreement is 0
        assert float(out.agreement_rate) == 0.0 and out.chosen_rewards.shape == (rows, 3)
    assert t.scalar_of(backend.call(func, args, {"reduction": "none"}, "float64")).shape == (rows, 3)


@pytest.mark.parametrize("labels_dtype", [np.int8, np.int16, np.uint8, np.int32])
def test_small_integer_labels_gather_like_int64(backend, labels_dtype):
    _fused(backend)
    rng = np.random.default_rng(2)
    hidden, weight = rng.standard_normal((5, H)), rng.standard_normal((V, H))
    labels = rng.integers(0, V, 5)
    want = backend.call("linear_token_logps", [hidden, weight, labels], {}, "float64")
    got = backend.call("linear_token_logps", [hidden, weight, labels.astype(labels_dtype)], {}, "float64")
    np.testing.assert_array_equal(got, want)
    args = _sequence_args(2, rng)
    small = [*args[:3], args[3].astype(labels_dtype), args[4].astype(labels_dtype)]
    kw = {"teacher": TeacherLogps(-np.ones(2), -np.ones(2) * 2)}
    assert float(t.scalar_of(backend.call("fused_dpkd_loss", small, kw, "float64"))) == \
        float(t.scalar_of(backend.call("fused_dpkd_loss", args, kw, "float64")))
    ce = backend.call("fused_cross_entropy", [hidden, weight, labels.astype(labels_dtype)], {}, "float64")
    assert float(t.scalar_of(ce)) == float(t.scalar_of(
        backend.call("fused_cross_entropy", [hidden, weight, labels], {}, "float64")))


@pytest.mark.parametrize("func, kw", [("fused_simpo_loss", {}), ("fused_ipo_loss", {"teacher": None}),
                                      ("fused_dpkd_loss", {"teacher": None, "length_normalize": True})])
def test_a_length_normalised_row_without_tokens_is_refused(backend, func, kw):
    _fused(backend)
    t.require(backend, func)
    args = _sequence_args(2, np.random.default_rng(3))
    args[3][1] = -100  # pair 1's chosen response has no labelled token: its length is 0
    kw = {k: (TeacherLogps(-np.ones(2), -np.ones(2)) if k == "teacher" else x) for k, x in kw.items()}
    with pytest.raises(DPKDInputError) as info:
        backend.call(func, args, kw, "float64")
    assert str(info.value).startswith(f"{func}: `chosen_labels` has a row whose labels are all the ignore_index")
