"""Invariance properties, on every backend, in float64: permuting the batch permutes per-example losses;
padding with ignored tokens changes nothing; adding a constant to a logit row changes nothing; batch 8 ×
accumulation 1 equals batch 1 × accumulation 8 with the global ``normalizer``."""

import numpy as np
import pytest
from dpkd.conformance import testing as t
from dpkd.spec import registry
from hypothesis import assume, given, settings
from hypothesis import strategies as st

F64 = "float64"


def _roles(spec):
    return {a.role for a in spec.arrays}


def _permute_call(spec, call, perm):
    changes = {}
    for a in spec.arrays:
        x = call.arg(a.name)
        if isinstance(x, np.ndarray):
            changes[a.name] = x[perm]
    return call.with_args(**changes)


def _permute_out(out, perm):
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(o if np.ndim(o) == 0 else np.asarray(o)[perm] for o in out))
    if isinstance(out, tuple):
        return tuple(np.asarray(o)[perm] for o in out)
    return np.asarray(out)[perm]


PER_EXAMPLE = t.cases(lambda s: s.kind in ("logps", "sequence", "token") or s.name == "implicit_reward")


@pytest.mark.parametrize("case", PER_EXAMPLE, ids=str)
@given(data=st.data())
def test_batch_permutation_permutes_per_example_losses(backend, case, data):
    t.require(backend, case.spec.name)
    if case.variant.options.get("reduction", "none") != "none":
        pytest.skip(f"{case} fixes reduction={case.variant.options['reduction']!r}: no per-example output")
    call = data.draw(t.calls(case.spec, case.variant, reduction="none", shapes=t.BACKEND_SHAPES), label="call")
    assume(t.well_conditioned(case.spec, call, t.TOLERANCES[F64].margin))
    n = call.args[0].shape[0]
    perm = np.asarray(data.draw(st.permutations(range(n)), label="perm"))
    out, _ = t.run_backend(backend, call, F64)
    permuted, _ = t.run_backend(backend, _permute_call(case.spec, call, perm), F64)
    t.assert_outputs_close(permuted, _permute_out(out, perm), dtype=F64, call=call, backend=backend.name)


TOKEN_AXIS = t.cases(lambda s: "mask" in _roles(s) or "labels" in _roles(s))


def _pad(spec, call, rng, extra):
    """Append ``extra`` positions whose labels are ignored / mask is 0, with arbitrary logits."""
    changes = {}
    for a in spec.arrays:
        x = call.arg(a.name)
        if a.role == "logits":
            pad = rng.standard_normal(x.shape[:-2] + (extra, x.shape[-1])) * 3.0
            changes[a.name] = np.concatenate([x, pad], axis=-2)
        elif a.role == "mask":
            changes[a.name] = np.concatenate([x, np.zeros(x.shape[:-1] + (extra,), bool)], axis=-1)
        elif a.role == "labels":
            ignore = call.kwargs.get("ignore_index", -100)
            changes[a.name] = np.concatenate([x, np.full(x.shape[:-1] + (extra,), ignore, x.dtype)], axis=-1)
    return call.with_args(**changes)


def _unpad_out(out, tokens, token_ndim):
    """Per-token outputs (those shaped like the mask) restricted to the original positions."""
    def cut(o):
        return o[..., :tokens] if np.ndim(o) == token_ndim else o
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(cut(np.asarray(o)) if np.ndim(o) else o for o in out))
    if isinstance(out, tuple):
        return tuple(cut(np.asarray(o)) if np.ndim(o) else o for o in out)
    return cut(np.asarray(out)) if np.ndim(out) else out


@pytest.mark.parametrize("case", TOKEN_AXIS, ids=str)
@given(data=st.data())
def test_padding_with_ignored_tokens_changes_nothing(backend, case, data):
    extra = 2  # one padded shape per base shape (backends may compile per shape)
    t.require(backend, case.spec.name)
    call = data.draw(t.calls(case.spec, case.variant, shapes=t.BACKEND_SHAPES), label="call")
    assume(t.well_conditioned(case.spec, call, t.TOLERANCES[F64].margin))
    padded = _pad(case.spec, call, np.random.default_rng(data.draw(st.integers(0, 2**16), label="pad seed")), extra)
    out, _ = t.run_backend(backend, call, F64)
    out_padded, _ = t.run_backend(backend, padded, F64)
    token_array = call.arg("mask") if "mask" in _roles(case.spec) else call.arg("labels")
    tokens, token_ndim = token_array.shape[-1], token_array.ndim
    if case.spec.kind == "logps" and case.spec.output == "array":
        # token_logps: padded positions are exactly 0, the others unchanged
        np.testing.assert_array_equal(np.asarray(out_padded)[..., tokens:], 0.0)
    t.assert_outputs_close(_unpad_out(out_padded, tokens, token_ndim), out, dtype=F64, call=call, backend=backend.name)


LOGIT_CASES = t.cases(lambda s: bool(_roles(s) & {"logits", "vocab_logits"}))


@pytest.mark.parametrize("case", LOGIT_CASES, ids=str)
@given(data=st.data())
def test_adding_a_constant_to_a_logit_row_changes_nothing(backend, case, data):
    t.require(backend, case.spec.name)
    call = data.draw(t.calls(case.spec, case.variant, shapes=t.BACKEND_SHAPES), label="call")
    assume(t.well_conditioned(case.spec, call, t.TOLERANCES[F64].margin))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="shift seed"))
    changes = {}
    for a in case.spec.arrays:
        if a.role in ("logits", "vocab_logits"):
            x = call.arg(a.name)
            changes[a.name] = x + rng.uniform(-50.0, 50.0, size=x.shape[:-1] + (1,))
    shifted = call.with_args(**changes)
    out, _ = t.run_backend(backend, call, F64)
    out_shifted, _ = t.run_backend(backend, shifted, F64)
    # the shifted inputs are larger: their rounding errors scale with them (tolerance table)
    t.assert_outputs_close(out_shifted, out, dtype=F64, call=shifted, backend=backend.name)


ACCUMULATION = [c for c in t.cases(lambda s: any(p.name == "normalizer" for p in s.params))
                if c.variant.name == "normalizer" or c.variant == c.spec.variants[0]]


def _count(spec, call):
    if "mask" in _roles(spec):
        return float(np.sum(call.arg("mask")))
    return float(np.sum(call.arg("labels") != call.kwargs.get("ignore_index", -100)))


@pytest.mark.parametrize("case", ACCUMULATION, ids=str)
@settings(max_examples=max(1, settings().max_examples // 2))  # 9 backend calls with gradients per example
@given(data=st.data())
def test_batch_8_equals_8_accumulated_micro_batches_with_normalizer(backend, case, data):
    t.require(backend, case.spec.name)
    call = data.draw(t.calls(case.spec, case.variant, batch=(8,), reduction="mean", shapes=t.BACKEND_SHAPES[:1]),
                     label="call")
    assume(t.well_conditioned(case.spec, call, t.TOLERANCES[F64].margin))
    full = call.with_args(normalizer=None, reduction="mean") if "normalizer" not in case.variant.draw else call
    full = registry.Call(full.function, full.args, {k: v for k, v in full.kwargs.items() if v is not None})
    total = full.kwargs.get("normalizer", _count(case.spec, full))
    wrt = registry.differentiable_positions(case.spec, full)
    whole, whole_grads = backend.value_and_grad(case.spec.name, full.args, dict(full.kwargs), wrt, F64)
    acc_value, acc_grads = 0.0, [[] for _ in wrt]
    for i in range(8):
        micro = full.with_args(**{a.name: full.arg(a.name)[i:i + 1] for a in case.spec.arrays},
                               normalizer=total, reduction="mean")
        value, grads = backend.value_and_grad(case.spec.name, micro.args, dict(micro.kwargs), wrt, F64)
        acc_value += t._fields(value)[0][1]
        for k, g in enumerate(grads):
            acc_grads[k].append(g)
    t.assert_close(acc_value, t._fields(whole)[0][1], dtype=F64, quantity="values", call=full,
                   backend=backend.name, what=f"{case.spec.name}: Σ of 8 micro-batch losses vs the batch of 8")
    for k, i in enumerate(wrt):
        t.assert_close(np.concatenate(acc_grads[k], axis=0), whole_grads[k], dtype=F64, quantity="gradients",
                       call=full, backend=backend.name,
                       what=f"{case.spec.name}: accumulated d/d {case.spec.positional[i].name}")
