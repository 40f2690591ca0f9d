"""The concatenated calling layout of TRL and Liger (``fused_concatenated``, ``FusedLinearPreferenceLoss``):
one hidden tensor [2B, T, H] with the chosen rows first, one target tensor with ignore_index, the teacher in
the same layout. Its results equal the split layout's (and the float64 spec's), the policy log-probs come
back with the loss, and dpkd's module runs at a call site written for ``LigerFusedLinearDPOLoss``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from dpkd import spec  # noqa: E402
from dpkd.backends import jax as J  # noqa: E402
from dpkd.backends import torch as T  # noqa: E402
from dpkd.conformance.testing import assert_close  # noqa: E402
from dpkd.spec.validation import DPKDInputError  # noqa: E402

B, LEN, H, H_T, V = 3, 7, 6, 5, 29
IGNORE = -100


def _case(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, V, (2 * B, LEN))
    target[:, :2] = IGNORE  # the prompt
    target[1, 5:] = IGNORE  # padding
    return {"hidden": rng.standard_normal((2 * B, LEN, H)), "weight": rng.standard_normal((V, H)),
            "bias": rng.standard_normal(V), "target": target,
            "teacher_hidden": rng.standard_normal((2 * B, LEN, H_T)), "teacher_weight": rng.standard_normal((V, H_T)),
            "teacher_bias": rng.standard_normal(V), "teacher_logps": -rng.uniform(5.0, 15.0, 2 * B)}


LOSSES = {
    "dpkd": ("fused_dpkd_loss", {"beta": 0.3}),
    "dpkd_normalised": ("fused_dpkd_loss", {"beta": 0.3, "length_normalize": True, "label_smoothing": 0.1}),
    "ipo": ("fused_ipo_loss", {"tau": 0.5}),
    "cpo": ("fused_cpo_loss", {"beta": 0.2}),
    "simpo": ("fused_simpo_loss", {}),
    "dpop": ("fused_dpop_loss", {"lambda_": 5.0}),
}


def _torch_split_and_concatenated(name, options, case, teacher_kind):
    """((loss, rewards, logps), grads) of the split call and of the concatenated call, Torch, float64."""
    fn = getattr(T, LOSSES[name][0])
    results = []
    for layout in ("split", "concatenated"):
        x = {k: torch.from_numpy(np.array(v)) for k, v in case.items()}
        h, w, bb = (x[k].requires_grad_(True) for k in ("hidden", "weight", "bias"))
        reference = fn not in (T.fused_cpo_loss, T.fused_simpo_loss)
        kw = dict(options, bias=bb)
        if layout == "split":
            if reference and teacher_kind == "lm_head":
                kw["teacher"] = T.TeacherLMHead(x["teacher_hidden"][:B], x["teacher_hidden"][B:], x["teacher_weight"],
                                                x["teacher_bias"])
            elif reference:
                kw["teacher"] = T.TeacherLogps(x["teacher_logps"][:B], x["teacher_logps"][B:])
            out = fn(h[:B], h[B:], w, x["target"][:B], x["target"][B:], **kw)
        else:
            if reference and teacher_kind == "lm_head":
                kw.update(teacher_hidden=x["teacher_hidden"], teacher_weight=x["teacher_weight"],
                          teacher_bias=x["teacher_bias"])
            elif reference:
                kw["teacher_logps"] = x["teacher_logps"]
            out = T.fused_concatenated(fn, h, w, x["target"], **kw)
        grads = torch.autograd.grad(out.loss, (h, w, bb))
        results.append(([t.detach().numpy() for t in out], [g.numpy() for g in grads]))
    return results


@pytest.mark.parametrize("teacher_kind", ["lm_head", "logps"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_concatenated_equals_split(name, teacher_kind):
    (split, split_grads), (concat, concat_grads) = _torch_split_and_concatenated(name, LOSSES[name][1], _case(0),
                                                                                 teacher_kind)
    for a, e in zip(concat + concat_grads, split + split_grads):
        assert np.array_equal(a, e)  # the same computation on the same rows


def test_concatenated_dpkd_equals_spec_and_returns_the_policy_logps():
    case = _case(1)
    (_, _), (out, grads) = _torch_split_and_concatenated("dpkd", {"beta": 0.3}, case, "lm_head")
    logits = case["hidden"] @ case["weight"].T + case["bias"]
    t_logits = case["teacher_hidden"] @ case["teacher_weight"].T + case["teacher_bias"]
    a_all, _ = spec.sequence_logps(logits, case["target"], ignore_index=IGNORE)
    c_all, _ = spec.sequence_logps(t_logits, case["target"], ignore_index=IGNORE)
    a, b, c, d = a_all[:B], a_all[B:], c_all[:B], c_all[B:]
    expected = spec.dpkd_loss(a, b, c, d, beta=0.3)
    loss, chosen, rejected, policy_chosen, policy_rejected = out
    for got, want, what in ((loss, expected.loss, "loss"), (chosen, expected.chosen_rewards, "chosen_rewards"),
                            (rejected, expected.rejected_rewards, "rejected_rewards"),
                            (policy_chosen, a, "logps/chosen"), (policy_rejected, b, "logps/rejected")):
        assert_close(got, want, dtype="float64", quantity="values", what=what, scale=float(np.abs(logits).max()))
    # the gradient in the concatenated hidden states: the spec's through the projection
    g = spec.dpkd_loss_grad(a, b, c, d, beta=0.3)
    per_row = np.concatenate([g["policy_chosen_logps"], g["policy_rejected_logps"]])
    g_logits = per_row[:, None, None] * spec.sequence_logps_grad(logits, case["target"], ignore_index=IGNORE)["logits"]
    assert_close(grads[0], g_logits @ case["weight"], dtype="float64", quantity="gradients", what="grad hidden")
    assert_close(grads[1], np.einsum("btv,bth->vh", g_logits, case["hidden"]), dtype="float64",
                 quantity="gradients", what="grad weight")


@pytest.mark.parametrize("teacher_kind", ["lm_head", "logps"])
@pytest.mark.parametrize("name", ["dpkd", "simpo", "dpop"])
def test_jax_concatenated_equals_split_and_torch(name, teacher_kind):
    fn_name, options = LOSSES[name]
    case = _case(2)
    fn = getattr(J, fn_name)
    x = {k: jnp.asarray(v) for k, v in case.items()}
    reference = fn_name not in ("fused_cpo_loss", "fused_simpo_loss")

    def concatenated(h, w, bb):
        kw = dict(options, bias=bb)
        if reference and teacher_kind == "lm_head":
            kw.update(teacher_hidden=x["teacher_hidden"], teacher_weight=x["teacher_weight"],
                      teacher_bias=x["teacher_bias"])
        elif reference:
            kw["teacher_logps"] = x["teacher_logps"]
        return J.fused_concatenated(fn, h, w, x["target"], **kw)

    def split(h, w, bb):
        kw = dict(options, bias=bb)
        if reference and teacher_kind == "lm_head":
            kw["teacher"] = J.TeacherLMHead(x["teacher_hidden"][:B], x["teacher_hidden"][B:], x["teacher_weight"],
                                            x["teacher_bias"])
        elif reference:
            kw["teacher"] = J.TeacherLogps(x["teacher_logps"][:B], x["teacher_logps"][B:])
        return fn(h[:B], h[B:], w, x["target"][:B], x["target"][B:], **kw)

    args = (x["hidden"], x["weight"], x["bias"])
    results = []
    for f in (concatenated, split):
        def scalar(*p, f=f):
            out = f(*p)
            return out.loss, out

        (_, out), grads = jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True)(*args)  # one trace
        results.append([np.asarray(t) for t in (*out, *grads)])
    (torch_out, torch_grads), _ = _torch_split_and_concatenated(name, options, case, teacher_kind)
    for a, e, t in zip(results[0], results[1], torch_out + torch_grads):
        assert np.array_equal(a, e)
        np.testing.assert_allclose(a, t, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(t).max())))


def liger_dpo_call_site(loss_fn, lm_head: torch.nn.Linear, ref_lm_head: torch.nn.Linear, hidden: torch.Tensor,
                        ref_hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A training step as written for Liger-Kernel's ``LigerFusedLinearDPOLoss`` (its documented call:
    ``loss_fn(lin_weight, _input, target, bias, ref_input=, ref_weight=, ref_bias=)``, _input [2B, T, H]
    chosen first, the first output the loss)."""
    out = loss_fn(lm_head.weight, hidden, target, lm_head.bias, ref_input=ref_hidden, ref_weight=ref_lm_head.weight,
                  ref_bias=ref_lm_head.bias)
    loss = out[0]
    loss.backward()
    return loss


def _heads(case):
    torch.manual_seed(0)
    lm_head, ref_lm_head = torch.nn.Linear(H, V).double(), torch.nn.Linear(H_T, V).double()
    with torch.no_grad():
        for module, w, bb in ((lm_head, "weight", "bias"), (ref_lm_head, "teacher_weight", "teacher_bias")):
            module.weight.copy_(torch.from_numpy(case[w]))
            module.bias.copy_(torch.from_numpy(case[bb]))
    ref_lm_head.requires_grad_(False)
    return lm_head, ref_lm_head


def test_dpkd_module_at_a_liger_call_site_equals_the_split_layout():
    case = _case(3)
    lm_head, ref_lm_head = _heads(case)
    hidden = torch.from_numpy(case["hidden"]).requires_grad_(True)
    target, ref_hidden = torch.from_numpy(case["target"]), torch.from_numpy(case["teacher_hidden"])
    loss_fn = T.FusedLinearPreferenceLoss(T.fused_dpkd_loss, beta=0.3)
    loss = liger_dpo_call_site(loss_fn, lm_head, ref_lm_head, hidden, ref_hidden, target)
    got = (loss.detach(), hidden.grad, lm_head.weight.grad, lm_head.bias.grad)

    h2 = torch.from_numpy(case["hidden"]).requires_grad_(True)
    w2, b2 = torch.from_numpy(case["weight"]).requires_grad_(True), torch.from_numpy(case["bias"]).requires_grad_(True)
    teacher = T.TeacherLMHead(ref_hidden[:B], ref_hidden[B:], ref_lm_head.weight, ref_lm_head.bias)
    out = T.fused_dpkd_loss(h2[:B], h2[B:], w2, target[:B], target[B:], teacher=teacher, bias=b2, beta=0.3)
    out.loss.backward()
    for a, e in zip(got, (out.loss.detach(), h2.grad, w2.grad, b2.grad)):
        assert torch.equal(a, e)
    assert ref_lm_head.weight.grad is None  # the teacher gets no gradient


def test_against_liger_itself_when_it_is_installed():
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not a dpkd dependency")
    case = _case(4)
    results = []
    for loss_fn in (liger.LigerFusedLinearDPOLoss(beta=0.3, use_ref_model=True, compiled=False),
                    T.FusedLinearPreferenceLoss(T.fused_dpkd_loss, beta=0.3)):
        lm_head, ref_lm_head = _heads(case)
        hidden = torch.from_numpy(case["hidden"]).requires_grad_(True)
        loss = liger_dpo_call_site(loss_fn, lm_head, ref_lm_head, hidden, torch.from_numpy(case["teacher_hidden"]),
                                   torch.from_numpy(case["target"]))
        results.append((loss.detach(), hidden.grad, lm_head.weight.grad, lm_head.bias.grad))
    # Liger accumulates its loss in float32 whatever the input dtype: compare within the float32 table
    for what, a, e in zip(("loss", "grad hidden", "grad weight", "grad bias"), *results):
        assert_close(a.double().numpy(), e.double().numpy(), dtype="float32",
                     quantity="values" if what == "loss" else "gradients", what=f"Liger vs dpkd {what}")


@pytest.mark.parametrize(("change", "argument"), [
    ({"hidden": np.zeros((5, LEN, H))}, "hidden"),
    ({"hidden": np.zeros((2 * B, H))}, "hidden"),
    ({"target": np.zeros((2 * B, LEN + 1), np.int64)}, "target"),
    ({"teacher_hidden": np.zeros((2 * B, LEN - 1, H_T))}, "teacher_hidden"),
    ({"teacher_weight": None}, "teacher_weight"),
    ({"teacher_logps": np.zeros(2 * B)}, "teacher_logps"),
])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bad_layouts_name_the_argument(change, argument, backend):
    case = _case(5)
    case.update(change)
    to = (lambda a: None if a is None else torch.from_numpy(np.array(a))) if backend == "torch" else \
        (lambda a: None if a is None else jnp.asarray(a))
    module = T if backend == "torch" else J
    kw = {k: to(case[k]) for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    if "teacher_logps" in change:
        kw["teacher_logps"] = to(case["teacher_logps"])
    with pytest.raises(DPKDInputError, match=f"^fused_dpkd_loss: `{argument}` "):
        module.fused_concatenated(module.fused_dpkd_loss, to(case["hidden"]), to(case["weight"]), to(case["target"]),
                                  **kw)
