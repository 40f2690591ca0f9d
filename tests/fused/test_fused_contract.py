"""The fused lm_head path has one contract in both frameworks: the same named, hashable ``loss`` argument,
the same result (loss, rewards and the policy log-probs a, b), and errors raised inside a fused call that
name the fused function and the argument its caller passed. References are the float64 spec only."""

from __future__ import annotations

import numpy as np
import pytest
from dpkd import spec
from dpkd.spec.fused import NamedSequenceLoss, NamedTokenLoss
from dpkd.spec.validation import DPKDInputError

B, T_C, T_S, H, V = 3, 4, 5, 6, 11


def _framework(name):
    if name == "torch":
        torch = pytest.importorskip("torch")
        import dpkd.backends.torch as backend

        return backend, (lambda x: torch.from_numpy(np.ascontiguousarray(x)))
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import dpkd.backends.jax as backend
    import jax.numpy as jnp

    return backend, jnp.asarray


@pytest.fixture(params=["torch", "jax"])
def fw(request):
    return _framework(request.param)


def _case(seed=0):
    rng = np.random.default_rng(seed)
    chosen_labels = rng.integers(0, V, (B, T_C))
    rejected_labels = rng.integers(0, V, (B, T_S))
    chosen_labels[:, -1] = -100
    rejected_labels[1, :2] = -100
    return {
        "chosen_hidden": rng.standard_normal((B, T_C, H)), "rejected_hidden": rng.standard_normal((B, T_S, H)),
        "weight": rng.standard_normal((V, H)), "chosen_labels": chosen_labels, "rejected_labels": rejected_labels,
        "teacher_chosen": -rng.uniform(1.0, 9.0, B), "teacher_rejected": -rng.uniform(1.0, 9.0, B),
    }


def _args(case, to):
    return [to(case[k]) for k in ("chosen_hidden", "rejected_hidden", "weight", "chosen_labels", "rejected_labels")]


def _summed_logps(case):
    a, _ = spec.sequence_logps(case["chosen_hidden"] @ case["weight"].T, case["chosen_labels"])
    b, _ = spec.sequence_logps(case["rejected_hidden"] @ case["weight"].T, case["rejected_labels"])
    return a, b


@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
def test_fused_sequence_loss_returns_the_policy_logps_a_and_b(fw, mode):
    backend, to = fw
    case = _case()
    teacher = backend.TeacherLogps(to(case["teacher_chosen"]), to(case["teacher_rejected"]))
    out = backend.fused_dpkd_loss(*_args(case, to), beta=0.3, mode=mode, chunk_size=T_C + T_S, teacher=teacher)
    assert type(out).__name__ == "FusedPreferenceLoss"
    assert out._fields == ("loss", "chosen_rewards", "rejected_rewards", "policy_chosen_logps",
                           "policy_rejected_logps")
    a, b = _summed_logps(case)
    np.testing.assert_allclose(np.asarray(out.policy_chosen_logps), a, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out.policy_rejected_logps), b, rtol=1e-12)
    expected = spec.dpkd_loss(a, b, case["teacher_chosen"], case["teacher_rejected"], beta=0.3)
    np.testing.assert_allclose(float(out.loss), float(expected.loss), rtol=1e-12)


def test_named_losses_are_hashable_and_equal_by_value():
    one = NamedSequenceLoss("dpkd_loss", {"beta": 0.5, "label_smoothing": 0.1})
    other = NamedSequenceLoss("dpkd_loss", (("label_smoothing", 0.1), ("beta", 0.5)))
    assert one == other and hash(one) == hash(other) and one.kwargs == {"beta": 0.5, "label_smoothing": 0.1}
    assert hash(NamedTokenLoss("forward_kl", {"temperature": 2.0})) == hash(NamedTokenLoss("forward_kl",
                                                                                           {"temperature": 2.0}))


def test_the_generic_fused_sequence_loss_takes_a_named_loss_in_both_frameworks(fw):
    backend, to = fw
    case = _case(1)
    teacher = backend.TeacherLogps(to(case["teacher_chosen"]), to(case["teacher_rejected"]))
    named = backend.fused_sequence_loss(NamedSequenceLoss("dpop_loss", {"beta": 0.2, "lambda_": 3.0}),
                                        *_args(case, to), teacher=teacher)
    wrapper = backend.fused_dpop_loss(*_args(case, to), teacher=teacher, beta=0.2, lambda_=3.0)
    a, b = _summed_logps(case)
    expected = spec.dpop_loss(a, b, case["teacher_chosen"], case["teacher_rejected"], beta=0.2, lambda_=3.0)
    for out in (named, wrapper):
        np.testing.assert_allclose(float(out.loss), float(expected.loss), rtol=1e-12)


@pytest.mark.parametrize(("loss", "problem"), [
    (NamedSequenceLoss("no_such_loss"), "is NamedSequenceLoss('no_such_loss'), but this backend exports no"),
    (NamedSequenceLoss("dpkd_loss", {"bta": 0.1}), "has the option 'bta', which is not an option of dpkd_loss"),
    (NamedSequenceLoss("dpkd_loss", {"reduction": "sum"}), "has the option 'reduction'"),
    ({"name": "dpkd_loss"}, "must be a NamedSequenceLoss or a hashable callable"),
])
def test_a_bad_loss_argument_is_named(fw, loss, problem):
    backend, to = fw
    with pytest.raises(DPKDInputError, match=r"^fused_sequence_loss: `loss` " + problem.replace("(", r"\(")
                       .replace(")", r"\)")):
        backend.fused_sequence_loss(loss, *_args(_case(), to), teacher_required=False)


def test_length_normalised_all_ignored_row_names_the_fused_function_and_the_labels(fw):
    backend, to = fw
    case = _case(2)
    case["rejected_labels"][2] = -100
    teacher = backend.TeacherLogps(to(case["teacher_chosen"]), to(case["teacher_rejected"]))
    with pytest.raises(DPKDInputError, match=r"^fused_dpkd_loss: `rejected_labels` has a row whose labels are "
                                             r"all the ignore_index -100"):
        backend.fused_dpkd_loss(*_args(case, to), teacher=teacher, length_normalize=True)
    # summed log-probs (Eq. 8) have no length: the same row is fine
    backend.fused_dpkd_loss(*_args(case, to), teacher=teacher)


@pytest.mark.parametrize(("options", "argument", "problem"), [
    ({"beta": -1.0}, "beta", r"must be > 0\.0, got -1\.0"),
    ({"label_smoothing": 0.7}, "label_smoothing", r"must be <= 0\.5, got 0\.7"),
])
def test_an_option_error_inside_names_the_fused_function(fw, options, argument, problem):
    backend, to = fw
    case = _case(3)
    teacher = backend.TeacherLogps(to(case["teacher_chosen"]), to(case["teacher_rejected"]))
    for mode in ("single_pass", "two_pass"):
        with pytest.raises(DPKDInputError, match=rf"^fused_dpkd_loss: `{argument}` {problem}$"):
            backend.fused_dpkd_loss(*_args(case, to), teacher=teacher, mode=mode, **options)


def test_token_option_errors_and_hidden_names_follow_the_caller(fw):
    backend, to = fw
    rng = np.random.default_rng(4)
    h, w = rng.standard_normal((7, H)), rng.standard_normal((V, H))
    mask = np.ones(7, bool)
    with pytest.raises(DPKDInputError, match=r"^fused_forward_kl: `temperature` must be > 0"):
        backend.fused_forward_kl(to(h), to(w), to(h), to(w), to(mask), temperature=-2.0)
    with pytest.raises(DPKDInputError, match=r"^fused_dpkd_token_loss: `form` must be one of"):
        backend.fused_dpkd_token_loss(to(h), to(w), to(h), to(w), to(mask), form="hinge")
    bad = h.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DPKDInputError, match=r"^fused_cross_entropy: `hidden` contains NaN"):
        backend.fused_cross_entropy(to(bad), to(w), to(np.zeros(7, np.int64)))
    with pytest.raises(DPKDInputError, match=r"^fused_token_loss: `row_loss` has the option 'mu'"):
        backend.fused_token_loss(NamedTokenLoss("forward_kl", {"mu": 0.5}), to(h), to(w), to(mask),
                                 teacher_hidden=to(h), teacher_weight=to(w))
