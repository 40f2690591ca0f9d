"""The Torch fused lm_head path equals the float64 spec on materialised logits (values and gradients of
hidden, weight, bias), whatever the chunk size; and the single-pass and two-pass modes agree."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fused = pytest.importorskip("dpkd.backends.torch.fused")
fused_token = pytest.importorskip("dpkd.backends.torch.fused_token")
from dpkd.conformance.testing import assert_close  # noqa: E402
from dpkd.spec.validation import DPKDInputError  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}
ODD = (3, 47, 31, 123)  # (B, T, H, V): Liger-Kernel's awkward shape


def t(x, dtype, grad=False):
    if x is None:
        return None
    out = torch.from_numpy(np.ascontiguousarray(x))
    if out.is_floating_point():
        out = out.to(dtype)
    return out.requires_grad_(grad) if grad else out


def rounded(x, dtype):
    """What the backend sees of x in ``dtype``, back in float64 (the spec runs on that)."""
    return None if x is None else t(x, dtype).double().numpy()


def round_case(case, dtype):
    for name in ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias"):
        setattr(case, name, rounded(getattr(case, name), dtype))
    return case


def values_scale(*logits):
    return max(1.0, *(float(np.max(np.abs(x))) for x in logits))


# --------------------------------------------------------------------------------------------------
# linear_token_logps


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, None, "N"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_token_logps_equals_spec(refs, dtype, chunk_size, bias):
    b_, t_, h_, v_ = ODD
    case = round_case(refs.make_case(0, (b_, t_), h_, v_, bias=bias), DTYPES[dtype])
    upstream = np.random.default_rng(1).standard_normal((b_, t_))
    exp_value, exp_grads = refs.linear_token_logps(case, upstream)
    size = b_ * t_ if chunk_size == "N" else chunk_size
    dt = DTYPES[dtype]
    h, w, bb = t(case.hidden, dt, True), t(case.weight, dt, True), t(case.bias, dt, bias)
    out = fused.linear_token_logps(h, w, t(case.labels, None), bias=bb, chunk_size=size)
    assert out.dtype == DTYPES[dtype] and out.shape == (b_, t_)
    assert torch.all(out[torch.from_numpy(case.labels == refs.IGNORE)] == 0)
    params = [h, w] + ([bb] if bias else [])
    grads = torch.autograd.grad((out * t(upstream, DTYPES[dtype])).sum(), params)
    scale = values_scale(refs.logits_of(case.hidden, case.weight, case.bias))
    assert_close(out.detach().double(), exp_value, dtype=dtype, quantity="values", what="logps", scale=scale)
    for name, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
        assert_close(g.double(), e, dtype=dtype, quantity="gradients", what=f"grad {name}")


def test_linear_token_logps_chunk_size_invariant_float64(refs):
    case = refs.make_case(2, (123,), 31, 47)
    outs = []
    for size in (1, 7, 64, 123):
        h, w, bb = (t(x, torch.float64, True) for x in (case.hidden, case.weight, case.bias))
        out = fused.linear_token_logps(h, w, t(case.labels, None), bias=bb, chunk_size=size)
        outs.append([out.detach(), *torch.autograd.grad(out.sum(), (h, w, bb))])
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


def test_linear_token_logps_finite_differences():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 6, 1, 1, -100, 2, 5])
    assert torch.autograd.gradcheck(
        lambda h, w, bb: fused.linear_token_logps(h, w, labels, bias=bb, chunk_size=4), (h, w, bb))


def test_linear_token_logps_bfloat16_computes_in_float32(refs):
    case = round_case(refs.make_case(4, (20,), 16, 33), torch.bfloat16)
    h = t(case.hidden, torch.bfloat16, True)
    w = t(case.weight, torch.bfloat16, True)
    out = fused.linear_token_logps(h, w, t(case.labels, None), bias=t(case.bias, torch.bfloat16), chunk_size=6)
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    exp_value, exp_grads = refs.linear_token_logps(case, np.ones(20))
    scale = values_scale(refs.logits_of(case.hidden, case.weight, case.bias))
    assert_close(out.detach().double(), exp_value, dtype="bfloat16", quantity="values", what="logps", scale=scale)
    assert_close(gw.double(), exp_grads[1], dtype="bfloat16", quantity="gradients", what="grad weight")


def test_linear_token_logps_all_ignored_rows_give_zero_and_no_gradient(refs):
    case = refs.make_case(5, (6,), 4, 9)
    h, w = t(case.hidden, torch.float64, True), t(case.weight, torch.float64, True)
    out = fused.linear_token_logps(h, w, torch.full((6,), -100), chunk_size=4)
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    assert torch.all(out == 0) and torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize(("kwargs", "arg"), [
    ({"weight": torch.zeros(9, 5)}, "weight"),
    ({"labels": torch.zeros(5, dtype=torch.long)}, "labels"),
    ({"labels": torch.zeros(6)}, "labels"),
    ({"labels": torch.full((6,), 9)}, "labels"),
    ({"bias": torch.zeros(8)}, "bias"),
    ({"hidden": torch.full((6, 4), float("nan"))}, "hidden"),
    ({"weight": torch.zeros(9, 4, dtype=torch.float64)}, "weight"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_linear_token_logps_errors_name_the_argument(kwargs, arg):
    args = {"hidden": torch.zeros(6, 4), "weight": torch.zeros(9, 4), "labels": torch.zeros(6, dtype=torch.long)}
    args.update(kwargs)
    options = {k: args.pop(k) for k in ("bias", "chunk_size") if k in args}
    with pytest.raises(DPKDInputError, match=f"^linear_token_logps: `{arg}` "):
        fused.linear_token_logps(args["hidden"], args["weight"], args["labels"], **options)


# --------------------------------------------------------------------------------------------------
# Sequence-level losses

SEQUENCE_LOSSES = [
    ("dpkd_loss", fused.fused_dpkd_loss, {"beta": 0.7, "label_smoothing": 0.1}, {}, "lm_head"),
    ("dpkd_loss", fused.fused_dpkd_loss, {"beta": 0.5}, {"length_normalize": True}, "lm_head"),
    ("ipo_loss", fused.fused_ipo_loss, {"tau": 0.5, "length_normalize": True}, {}, "lm_head"),
    ("cpo_loss", fused.fused_cpo_loss, {"beta": 0.4, "nll_weight": 0.5}, {"length_normalize": True}, "none"),
    ("simpo_loss", fused.fused_simpo_loss, {"beta": 1.5, "gamma": 0.3}, {}, "none"),
    ("dpop_loss", fused.fused_dpop_loss, {"beta": 0.3, "lambda_": 2.0}, {}, "lm_head"),
]
LENGTH_KEYS = {"dpkd_loss": "length_normalize", "ipo_loss": "length_normalize", "cpo_loss": "length_normalize",
               "simpo_loss": None, "dpop_loss": None}


def _pair_cases(refs, seed, t_c=7, t_s=5, h=6, v=19, b_=3, bias=True):
    chosen = refs.make_case(seed, (b_, t_c), h, v, bias=bias)
    rejected = refs.make_case(seed + 100, (b_, t_s), h, v, bias=bias)
    rejected.weight, rejected.bias = chosen.weight, chosen.bias
    rejected.teacher_weight, rejected.teacher_bias = chosen.teacher_weight, chosen.teacher_bias
    teacher_size = chosen.teacher_hidden.shape[-1]
    rejected.teacher_hidden = np.random.default_rng(seed + 7).standard_normal((b_, t_s, teacher_size))
    chosen.labels[:, 0] = 3  # every sequence keeps at least one token (length-normalised losses need it)
    rejected.labels[:, 0] = 4
    return chosen, rejected


def _run_sequence(fn, extra, options, chosen, rejected, dtype, teacher_kind, **kw):
    dt = DTYPES[dtype]
    ch, rj = t(chosen.hidden, dt, True), t(rejected.hidden, dt, True)
    w, bb = t(chosen.weight, dt, True), t(chosen.bias, dt, chosen.bias is not None)
    teacher = {}
    if teacher_kind == "lm_head":
        teacher = {"teacher": fused.TeacherLMHead(t(chosen.teacher_hidden, dt), t(rejected.teacher_hidden, dt),
                                                  t(chosen.teacher_weight, dt), t(chosen.teacher_bias, dt))}
    options = {k: val for k, val in options.items() if not (k == "length_normalize" and "length_normalize" in extra)}
    out = fn(ch, rj, w, t(chosen.labels, None), t(rejected.labels, None), bias=bb, **teacher, **extra,
             **options, **kw)
    params = [ch, rj, w] + ([bb] if chosen.bias is not None else [])
    grads = torch.autograd.grad(out.loss.sum(), params)
    return out, grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["single_pass", "two_pass", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("name", "fn", "options", "extra", "teacher"), SEQUENCE_LOSSES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SEQUENCE_LOSSES)])
def test_fused_sequence_loss_equals_spec(refs, dtype, mode, reduction, name, fn, options, extra, teacher):
    if mode == "single_pass" and reduction == "none":
        pytest.skip("single_pass needs a reduced loss (tested as an error below)")
    chosen, rejected = _pair_cases(refs, 10)
    round_case(chosen, DTYPES[dtype])
    round_case(rejected, DTYPES[dtype])
    use_lengths = bool(extra.get("length_normalize", options.get("length_normalize", name == "simpo_loss")))
    spec_options = {k: val for k, val in options.items()}
    exp, exp_grads, _ = refs.sequence(name, spec_options, chosen, rejected, use_lengths=use_lengths,
                                      reduction=reduction, teacher=teacher)
    for size in (12, 25, 60):  # one pair per chunk, two pairs per chunk, all pairs; 12 < T_c + T_s → tokens
        out, grads = _run_sequence(fn, extra, options, chosen, rejected, dtype, teacher, reduction=reduction,
                                   mode=mode, chunk_size=size)
        scale = values_scale(refs.logits_of(chosen.hidden, chosen.weight, chosen.bias), exp.chosen_rewards)
        for field in ("loss", "chosen_rewards", "rejected_rewards"):
            assert_close(getattr(out, field).detach().double(), getattr(exp, field), dtype=dtype,
                         quantity="values", what=f"{name} {field} chunk {size}", scale=scale)
        for pname, g, e in zip(("chosen_hidden", "rejected_hidden", "weight", "bias"), grads, exp_grads):
            assert_close(g.double(), e, dtype=dtype, quantity="gradients", what=f"{name} grad {pname} chunk {size}")


def test_auto_mode_takes_single_pass_when_pairs_fit_else_two_pass(refs):
    chosen, rejected = _pair_cases(refs, 11)
    args = (fused.fused_dpkd_loss, {}, {"beta": 0.2}, chosen, rejected, "float64", "lm_head")
    fits, _ = _run_sequence(*args, chunk_size=12)  # T_c + T_s = 12 rows
    too_long, _ = _run_sequence(*args, chunk_size=11)
    unreduced, _ = _run_sequence(*args, chunk_size=64, reduction="none")
    assert "SinglePass" in type(fits.loss.grad_fn).__name__
    assert "SinglePass" not in type(too_long.loss.grad_fn).__name__
    assert "SinglePass" not in type(unreduced.loss.grad_fn).__name__
    assert torch.allclose(fits.loss, too_long.loss, rtol=1e-12, atol=0)


def test_precomputed_teacher_logps_equal_teacher_lm_head(refs):
    chosen, rejected = _pair_cases(refs, 12)
    exp, exp_grads, (c, d) = refs.sequence("dpkd_loss", {"beta": 0.3}, chosen, rejected, use_lengths=False,
                                           reduction="mean")
    ch, rj, w = (t(x, torch.float64, True) for x in (chosen.hidden, rejected.hidden, chosen.weight))
    for mode in ("single_pass", "two_pass"):
        out = fused.fused_dpkd_loss(ch, rj, w, t(chosen.labels, None), t(rejected.labels, None),
                                    bias=t(chosen.bias, torch.float64), beta=0.3, mode=mode,
                                    teacher=fused.TeacherLogps(t(c, torch.float64), t(d, torch.float64)))
        grads = torch.autograd.grad(out.loss, (ch, rj, w))
        assert_close(out.loss.detach(), exp.loss, dtype="float64", quantity="values", what="loss")
        for g, e in zip(grads, exp_grads):
            assert_close(g, e, dtype="float64", quantity="gradients", what="grad")


def test_teacher_gets_no_gradient_and_upstream_scales_gradient(refs):
    chosen, rejected = _pair_cases(refs, 13)
    dt = torch.float64
    th = t(chosen.teacher_hidden, dt, True)
    ch = t(chosen.hidden, dt, True)
    out = fused.fused_dpkd_loss(ch, t(rejected.hidden, dt), t(chosen.weight, dt), t(chosen.labels, None),
                                t(rejected.labels, None), mode="single_pass",
                                teacher=fused.TeacherLMHead(th, t(rejected.teacher_hidden, dt),
                                                            t(chosen.teacher_weight, dt)))
    (g1,) = torch.autograd.grad(out.loss, ch, retain_graph=True)
    # the second backward finds the forward's gradient handed out already and recomputes it
    (g3,) = torch.autograd.grad(3.0 * out.loss, ch)
    assert torch.allclose(g3, 3.0 * g1, rtol=1e-14, atol=0)
    assert not out.chosen_rewards.requires_grad


def test_fused_token_loss_second_backward_through_the_same_graph(refs):
    case = refs.make_case(22, (12,), 5, 13)
    dt = torch.float64
    h, w = t(case.hidden, dt, True), t(case.weight, dt, True)
    loss = fused_token.fused_forward_kl(h, w, t(case.teacher_hidden, dt), t(case.teacher_weight, dt),
                                  torch.ones(12, dtype=torch.bool), chunk_size=5)
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(2.0 * loss, (h, w))
    for g1, g2 in zip(first, second):
        assert torch.allclose(g2, 2.0 * g1, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("change", "arg"), [
    ({"teacher": None}, "teacher"),
    ({"mode": "single_pass", "reduction": "none"}, "mode"),
    ({"mode": "fast"}, "mode"),
    ({"rejected_labels": torch.zeros(3, 4, dtype=torch.long)}, "rejected_labels"),
    ({"teacher_weight": torch.zeros(18, 11)}, "teacher.weight"),
    ({"teacher_hidden_size": 10}, "teacher.weight"),
])
def test_fused_dpkd_loss_errors_name_the_argument(change, arg):
    b_, t_, h, v = 3, 5, 6, 19
    args = {"chosen_hidden": torch.zeros(b_, t_, h), "rejected_hidden": torch.zeros(b_, t_, h),
            "weight": torch.zeros(v, h), "chosen_labels": torch.zeros(b_, t_, dtype=torch.long),
            "rejected_labels": torch.zeros(b_, t_, dtype=torch.long)}
    teacher_weight = change.pop("teacher_weight", torch.zeros(v, 11))
    teacher_size = change.pop("teacher_hidden_size", 11)
    kwargs = {"teacher": fused.TeacherLMHead(torch.zeros(b_, t_, teacher_size), torch.zeros(b_, t_, teacher_size),
                                             teacher_weight)}
    for key, val in change.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(DPKDInputError, match=f"^fused_dpkd_loss: `{arg}` "):
        fused.fused_dpkd_loss(*args.values(), **kwargs)


# --------------------------------------------------------------------------------------------------
# Token-level losses (student and teacher logit chunks together)

TOKEN_LOSSES = [
    ("dpkd_token_loss", fused_token.fused_dpkd_token_loss, {"beta": 0.8}),
    ("dpkd_token_loss", fused_token.fused_dpkd_token_loss, {"beta": 0.5, "form": "ipo"}),
    ("forward_kl", fused_token.fused_forward_kl, {"temperature": 1.5}),
    ("reverse_kl", fused_token.fused_reverse_kl, {}),
    ("generalized_jsd", fused_token.fused_generalized_jsd, {"beta": 0.3}),
    ("akl", fused_token.fused_akl, {"mu": 0.4}),
    ("cross_entropy", fused_token.fused_cross_entropy, {}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("name", "fn", "options"), TOKEN_LOSSES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TOKEN_LOSSES)])
def test_fused_token_loss_equals_spec(refs, dtype, reduction, name, fn, options):
    b_, t_, h_, v_ = ODD
    case = round_case(refs.make_case(20, (b_, t_), h_, v_), DTYPES[dtype])
    mask = case.labels != refs.IGNORE
    exp, exp_grads = refs.token_loss(name, options, case, mask, reduction)
    dt = DTYPES[dtype]
    scale = values_scale(refs.logits_of(case.hidden, case.weight, case.bias),
                         refs.logits_of(case.teacher_hidden, case.teacher_weight, case.teacher_bias))
    for size in (1, 7, 64, b_ * t_):
        h, w, bb = t(case.hidden, dt, True), t(case.weight, dt, True), t(case.bias, dt, True)
        if name == "cross_entropy":
            out = fn(h, w, t(case.labels, None), bias=bb, reduction=reduction, chunk_size=size, **options)
        else:
            out = fn(h, w, t(case.teacher_hidden, dt), t(case.teacher_weight, dt), torch.from_numpy(mask), bias=bb,
                     teacher_bias=t(case.teacher_bias, dt), reduction=reduction, chunk_size=size, **options)
        loss = out.loss if isinstance(out, tuple) else out
        grads = torch.autograd.grad(loss.sum(), (h, w, bb))
        if isinstance(out, tuple):
            for field in out._fields:
                assert_close(getattr(out, field).detach().double(), getattr(exp, field), dtype=dtype,
                             quantity="values", what=f"{name} {field} chunk {size}", scale=scale)
        else:
            assert_close(loss.detach().double(), exp, dtype=dtype, quantity="values", what=f"{name} chunk {size}",
                         scale=scale)
        for pname, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
            assert_close(g.double(), e, dtype=dtype, quantity="gradients", what=f"{name} grad {pname} chunk {size}")


def test_fused_token_loss_normalizer_and_empty_mask(refs):
    case = refs.make_case(21, (10,), 5, 13)
    dt = torch.float64
    args = (t(case.hidden, dt), t(case.weight, dt), t(case.teacher_hidden, dt), t(case.teacher_weight, dt))
    with pytest.raises(DPKDInputError, match="^fused_forward_kl: `mask` "):
        fused_token.fused_forward_kl(*args, torch.zeros(10, dtype=torch.bool))
    mask = torch.ones(10, dtype=torch.bool)
    total = fused_token.fused_forward_kl(*args, mask, reduction="sum")
    assert torch.allclose(fused_token.fused_forward_kl(*args, mask, normalizer=40.0), total / 40.0, rtol=1e-14, atol=0)
