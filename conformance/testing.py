"""Shipped test helpers: Hypothesis strategies, the one tolerance table, and ``assert_close``.

Third parties testing their own backend (``pytest conformance/ --dpkd-backend=my.module``), or their own
code on top of dpkd, import these::

    from hypothesis import given
    from dpkd.spec import registry
    from dpkd.conformance import testing

    spec = registry.get("dpkd_loss")
    @given(testing.calls(spec, spec.variant("eq9")))
    def test_mine(call): ...

Requires ``hypothesis`` (the ``test`` extra); imports neither torch nor jax.

The tolerance table
-------------------
One entry per input dtype. A comparison passes when, elementwise,
``|actual − expected| ≤ rtol·|expected| + atol·scale`` where ``scale`` is, for values, the largest
magnitude among the float inputs (at least 1) — rounding errors of log-softmax, logsumexp and log-ratios
are absolute errors proportional to the magnitude of the logits / log-probs fed in — and, for gradients,
the largest magnitude of the expected gradient, at least 1 (a norm-wise bound: cancellations such as
q − p or σ(βh) − 1 carry the absolute error of their O(1) operands, not a relative error of their
difference, so a saturated entry of 1e-15 is only known to ~eps64 absolutely). ``expected`` is always
the float64 spec evaluated on the inputs as the backend saw them (rounded to its dtype).

* float64 — rtol 1e-10, atol 1e-12, both quantities. Two independent float64 implementations differ by
  summation order and the choice of stable formula: a few hundred ulps (eps = 2.2e-16) at most, on
  shapes this suite uses (V ≤ 8, ≤ 100 tokens). 1e-10 leaves ~4·10^5 ulps of headroom and still catches
  any mathematical slip (a missing term is ≥ 1e-6 relative on these draws).
* float32 — values rtol 1e-5, atol 1e-6; gradients rtol 1e-4, atol 1e-5. eps32 = 1.19e-7; a loss is
  ~10–20 roundings deep (log-softmax, gathers, softplus, a masked mean), so its error is ≲ 20·eps32 ≈
  2.4e-6 relative plus ≲ 10·eps32 per unit of input magnitude. Gradients go one level deeper (softmax,
  σ, a scatter) and amplify by β ≤ 3 and 1/τ ≤ 2, hence the 10× wider bound.
* bfloat16 — inputs rounded to bf16 and the spec run on those rounded values; the backend computes in
  float32 and returns the loss in float32 (CONVENTIONS.md), so values use the float32 numbers unchanged.
  Gradients come back in bf16 (autograd casts the float32 gradient to the input dtype): that rounding
  alone is up to u = 2^-8 = 3.9e-3 relative, plus the float32 part: rtol 2^-8 + 1e-4, atol 1e-5.
  (Any output a backend returns in bf16 rather than float32 gets the same 2^-8 added, stated in the
  failure message.)

``margin`` is the distance to a discontinuity (argmax tie, AKL head-set edge, DPOP's c = a kink) within
which a draw is ill-conditioned for that dtype and is filtered with ``assume``: the value of a
discontinuous function, or its gradient, legitimately differs across such an edge between float32 and
float64 arithmetic.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dpkd.spec import registry as reg
from dpkd.spec.registry import Call, Draw, FunctionSpec, Variant

from .adapters import map_out, scalar_of

__all__ = [
    "Tolerance",
    "DtypeTolerance",
    "TOLERANCES",
    "FINITE_DIFFERENCE",
    "BF16_UNIT_ROUNDOFF",
    "Case",
    "cases",
    "assert_close",
    "assert_outputs_close",
    "input_scale",
    "central_difference",
    "BACKEND_SHAPES",
    "round_call",
    "require",
    "NOT_RUN",
    "FUSED_BACKENDS",
    "spec_functions",
    "spec_function",
    "fused_functions",
    "has_fused_path",
    "fused_reference",
    "signature_problems",
    "scalar_of",
    "is_reference",
    "spec_output",
    "run_backend",
    "well_conditioned",
    "batch_shapes",
    "draws",
    "calls",
    "betas",
    "masks",
    "lengths",
    "logits",
    "labels",
]

BF16_UNIT_ROUNDOFF = 2.0**-8


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


@dataclass(frozen=True)
class DtypeTolerance:
    dtype: str
    values: Tolerance
    gradients: Tolerance
    margin: float


TOLERANCES: Mapping[str, DtypeTolerance] = {
    "float64": DtypeTolerance("float64", Tolerance(1e-10, 1e-12), Tolerance(1e-10, 1e-12), 1e-9),
    "float32": DtypeTolerance("float32", Tolerance(1e-5, 1e-6), Tolerance(1e-4, 1e-5), 1e-4),
    "bfloat16": DtypeTolerance("bfloat16", Tolerance(1e-5, 1e-6), Tolerance(BF16_UNIT_ROUNDOFF + 1e-4, 1e-5), 1e-4),
}

# Central differences of the float64 spec, step h: truncation h²·|f'''|/6 plus rounding eps64·|f|/h.
# With h = 1e-6 and the draws' |f'''| ≲ 30: ≲ 5e-12 + 2.2e-10·|f|; so rtol 1e-6 and atol 1e-7·max(1, |f|)
# leave a 100× margin over the error model and are still 1e4× tighter than any wrong term. Draws within
# FINITE_DIFFERENCE.margin = 1e-4 (100 steps) of a discontinuity are filtered.
FINITE_DIFFERENCE = DtypeTolerance("float64", Tolerance(1e-6, 1e-7), Tolerance(1e-6, 1e-7), 1e-4)
FD_STEP = 1e-6


# --------------------------------------------------------------------------------------------------
# Parametrization over the registry


@dataclass(frozen=True)
class Case:
    """One (function, variant) of the registry; ``str`` is the test id, e.g. ``dpkd_loss[eq9]``."""

    spec: FunctionSpec
    variant: Variant

    def __str__(self) -> str:
        return f"{self.spec.name}[{self.variant.name}]"

    def __repr__(self) -> str:
        return f"Case({self})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' falsifying-example printer
        printer.text(repr(self))


def cases(predicate: Callable[[FunctionSpec], bool] = lambda s: True) -> list[Case]:
    return [Case(s, v) for s in reg.REGISTRY if predicate(s) for v in s.variants]


# --------------------------------------------------------------------------------------------------
# Comparison


def input_scale(call: Call) -> float:
    """The largest magnitude among the float inputs of ``call`` (at least 1)."""
    m = 1.0
    for x in list(call.args) + list(call.kwargs.values()):
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating) and x.size:
            m = max(m, float(np.max(np.abs(x))))
    return m


def assert_close(
    actual: Any,
    expected: Any,
    *,
    dtype: str,
    quantity: str,
    what: str,
    call: Call | None = None,
    backend: str = "",
    scale: float | None = None,
    extra_rtol: float = 0.0,
    extra_atol: float = 0.0,
) -> None:
    """Assert ``actual`` equals ``expected`` within the tolerance table for ``dtype`` and ``quantity``
    ("values", "gradients" or "finite_difference"); on failure the message carries a runnable call."""
    tol_entry = FINITE_DIFFERENCE if quantity == "finite_difference" else TOLERANCES[dtype]
    tol = tol_entry.gradients if quantity == "gradients" else tol_entry.values
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    header = f"{what} ({quantity}, {dtype}{', backend ' + backend if backend else ''})"
    if a.shape != e.shape:
        raise AssertionError(f"{header}: shape {a.shape} != expected {e.shape}\n{_repro(call)}")
    if scale is None:
        if quantity == "gradients":
            scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        elif quantity == "finite_difference":
            scale = 1.0
        else:
            scale = input_scale(call) if call is not None else 1.0
    rtol = tol.rtol + extra_rtol
    bound = rtol * np.abs(e) + tol.atol * scale + extra_atol
    err = np.abs(a - e)
    bad = ~(err <= bound) | (np.isnan(a) != np.isnan(e))
    if np.any(bad):
        idx = np.unravel_index(int(np.argmax(np.where(bad, err - bound, -np.inf))), e.shape) if e.ndim else ()
        raise AssertionError(
            f"{header}: {int(np.sum(bad))} of {e.size} entries outside |a − e| ≤ {rtol:g}·|e| + "
            f"{tol.atol:g}·{scale:g}{f' + {extra_atol:g}' if extra_atol else ''}\n"
            f"  worst at {idx}: actual {a[idx]!r}, expected {e[idx]!r}, error {err[idx]:.3e}\n"
            f"  actual   = {np.array2string(a, precision=17)}\n"
            f"  expected = {np.array2string(e, precision=17)}\n{_repro(call)}"
        )


def _repro(call: Call | None) -> str:
    if call is None:
        return ""
    return f"  reproduce (float64 inputs; cast to the dtype above for the backend):\n    {call}"


def _fields(out: Any) -> list[tuple[str, Any]]:
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return list(zip(out._fields, out))
    if isinstance(out, tuple):
        return [(f"[{i}]", o) for i, o in enumerate(out)]
    if isinstance(out, dict):
        return sorted(out.items())
    return [("value", out)]


def assert_outputs_close(
    actual: Any, expected: Any, *, dtype: str, call: Call, backend: str = "", bf16_fields: Sequence[str] = (),
    extra_atol: float = 0.0, scale: float | None = None,
) -> None:
    """Compare every field of a dpkd result (named tuple, tuple, dict or array) with the spec's."""
    fa, fe = _fields(actual), _fields(expected)
    assert [n for n, _ in fa] == [n for n, _ in fe], (
        f"{call.function}: output fields {[n for n, _ in fa]} != spec's {[n for n, _ in fe]}\n{_repro(call)}"
    )
    for (name, a), (_, e) in zip(fa, fe):
        e_arr = np.asarray(e)
        if e_arr.dtype.kind in "iub":  # counts and flags: exact
            if not np.array_equal(np.asarray(a), e_arr):
                raise AssertionError(f"{call.function}.{name}: {a!r} != expected {e!r} (exact)\n{_repro(call)}")
            continue
        assert_close(a, e, dtype=dtype, quantity="values", what=f"{call.function}.{name}", call=call,
                     backend=backend, extra_rtol=BF16_UNIT_ROUNDOFF if name in bf16_fields else 0.0,
                     extra_atol=extra_atol, scale=scale)


def central_difference(f: Callable[..., float], arrays: Sequence[np.ndarray], index: int,
                       step: float = FD_STEP) -> np.ndarray:
    """∂f/∂arrays[index] by central differences, in float64, one element at a time."""
    base = [np.array(a, dtype=np.float64, copy=True) for a in arrays]
    x = base[index]
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        orig = x[i]
        x[i] = orig + step
        up = f(*base)
        x[i] = orig - step
        down = f(*base)
        x[i] = orig
        grad[i] = (up - down) / (2.0 * step)
    return grad


def round_call(call: Call, rounder: Callable[[np.ndarray, str], np.ndarray], dtype: str) -> Call:
    """``call`` with every float array replaced by what a backend of ``dtype`` sees (back in float64)."""

    def r(x: Any) -> Any:
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            return np.asarray(rounder(x, dtype), dtype=np.float64)
        return x

    return Call(call.function, tuple(r(a) for a in call.args), {k: r(v) for k, v in call.kwargs.items()},
                call.variant)


def well_conditioned(spec: FunctionSpec, call: Call, margin: float) -> bool:
    """False when ``call`` lies within ``margin`` of a discontinuity of ``spec`` (see the registry)."""
    return spec.conditioning is None or spec.conditioning(call, margin)


# --------------------------------------------------------------------------------------------------
# Hypothesis strategies (imported lazily so that ``dpkd.spec.registry`` never needs hypothesis)


def _st() -> Any:
    from hypothesis import strategies as st

    return st


def batch_shapes(max_batch: int = 4) -> Any:
    """Leading shapes: [B] or [B1, B2] (never 0-d: batch permutation needs an axis)."""
    st = _st()
    return st.one_of(st.tuples(st.integers(1, max_batch)),
                     st.tuples(st.integers(1, 2), st.integers(1, max(1, max_batch // 2))))


def betas(low: float = 0.05, high: float = 3.0) -> Any:
    return _st().floats(low, high, allow_nan=False, allow_infinity=False)


def _from_seed(make: Callable[[np.random.Generator], np.ndarray]) -> Any:
    return _st().integers(0, 2**32 - 1).map(lambda seed: make(np.random.default_rng(seed)))


def masks(shape: tuple[int, ...]) -> Any:
    """Boolean loss masks of ``shape`` with at least one loss token."""
    return _from_seed(lambda rng: reg.random_mask(rng, shape))


def lengths(shape: tuple[int, ...]) -> Any:
    """Integer token counts ≥ 1."""
    return _from_seed(lambda rng: reg.random_lengths(rng, shape))


def logits(shape: tuple[int, ...], margin: float = 0.5, scale: float = 2.0) -> Any:
    """Float64 logits whose top entry beats the runner-up by ≥ ``margin`` in every row (no argmax ties)."""
    return _from_seed(lambda rng: reg.random_logits(rng, shape, scale, margin))


def labels(shape: tuple[int, ...], vocab: int, ignore_index: int = -100) -> Any:
    """Integer labels in [0, vocab), some equal to ``ignore_index``, at least one not ignored."""
    return _from_seed(lambda rng: reg.random_labels(rng, shape, vocab, ignore_index))


# The shapes backend tests draw from: (leading batch shape, T, V). Few on purpose — JAX (and torch.compile)
# compile each op per input shape, so a fresh random shape per example costs a compilation each time; one
# 1-D and one 2-D batch keep every code path (leading-dim flattening included) at a fraction of the cost.
# The spec's own finite-difference test draws shapes freely.
BACKEND_SHAPES: tuple[tuple[tuple[int, ...], int, int], ...] = (((3,), 4, 6), ((2, 2), 3, 5))


def draws(spec: FunctionSpec, variant: Variant, *, max_batch: int = 4, max_tokens: int = 5,
          max_vocab: int = 8, batch: tuple[int, ...] | None = None, reduction: str | None = None,
          shapes: Sequence[tuple[tuple[int, ...], int, int]] | None = None) -> Any:
    """:class:`Draw` s for ``spec`` under ``variant``: shapes (free, or one of ``shapes``), logit scale and
    margin, the options the variant draws (from their ``Param.draw`` ranges) and, unless fixed, the
    reduction."""
    st = _st()
    if shapes is not None:
        return st.sampled_from(list(shapes)).flatmap(
            lambda s: _draws(spec, variant, max_batch=1, batch=batch or s[0], reduction=reduction,
                             max_tokens=s[1], max_vocab=s[2], fixed=True))
    return _draws(spec, variant, max_batch=max_batch, max_tokens=max_tokens, max_vocab=max_vocab, batch=batch,
                  reduction=reduction, fixed=False)


def _draws(spec: FunctionSpec, variant: Variant, *, max_batch: int, max_tokens: int, max_vocab: int,
           batch: tuple[int, ...] | None, reduction: str | None, fixed: bool) -> Any:
    st = _st()
    option_strats: dict[str, Any] = {}
    for name in variant.draw:
        lo, hi = spec.param(name).draw  # type: ignore[misc]
        option_strats[name] = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if spec.reductions and "reduction" not in variant.options:
        option_strats["reduction"] = st.just(reduction) if reduction else st.sampled_from(spec.reductions)
    return st.builds(
        Draw,
        seed=st.integers(0, 2**32 - 1),
        batch=st.just(batch) if batch is not None else batch_shapes(max_batch),
        tokens=st.just(max_tokens) if fixed else st.integers(1, max_tokens),
        vocab=st.just(max_vocab) if fixed else st.integers(2, max_vocab),
        scale=st.floats(0.3, 5.0),
        margin=st.floats(0.05, 1.0),
        agree=st.sampled_from([0.0, 0.3, 0.8]),
        options=st.fixed_dictionaries(option_strats),
    )


def calls(spec: FunctionSpec, variant: Variant, **kwargs: Any) -> Any:
    """Valid float64 :class:`Call` s of ``spec`` under ``variant`` (see :func:`draws` for ``kwargs``)."""
    return draws(spec, variant, **kwargs).map(lambda d: reg.build_call(spec, variant, d))


# --------------------------------------------------------------------------------------------------
# Running a call on a backend adapter (``dpkd.conformance.adapters``)


def require(adapter: Any, name: str) -> None:
    """Fail, naming the function, when the backend does not export ``name``.

    A partial backend is an explicit opt-in: the functions the run allows (``--dpkd-allow-missing``, kept in
    ``adapter.allow_missing``) are skipped instead and recorded in ``NOT_RUN`` for the summary."""
    if hasattr(adapter.module, name):
        return
    import pytest

    if name in getattr(adapter, "allow_missing", ()):
        NOT_RUN.setdefault(adapter.name, set()).add(name)
        pytest.skip(f"backend {adapter.name} does not export {name} (allowed by --dpkd-allow-missing)")
    pytest.fail(f"backend {adapter.name} does not export {name}: every public function of dpkd.spec is required "
                f"(a partial backend runs with --dpkd-allow-missing={name})", pytrace=False)


def is_reference(adapter: Any) -> bool:
    """Whether ``adapter`` runs the float64 spec itself (comparing it with itself proves nothing)."""
    return getattr(adapter.module, "__name__", "") == "dpkd.spec"


def spec_output(call: Call) -> Any:
    return reg.get(call.function).reference_function()(*call.args, **call.kwargs)


def run_backend(adapter: Any, call: Call, dtype: str) -> tuple[Any, list[str]]:
    """The backend's result as float64 NumPy, and the names of the fields it returned in bfloat16."""
    fn = adapter.function(call.function)
    raw = fn(*adapter.convert_args(call.args, dtype), **adapter.convert_kwargs(dict(call.kwargs), dtype))
    bf16 = [name for name, x in _fields(raw) if "bfloat16" in str(getattr(x, "dtype", ""))]
    return map_out(raw, adapter.to_numpy), bf16


# --------------------------------------------------------------------------------------------------
# The API surface (conformance/test_api_surface.py) and the missing-function rule

#: The built-in backends that have a fused lm_head path; a backend's fused functions are compared with the
#: first of these (other than itself) that imports here.
FUSED_BACKENDS = ("dpkd.backends.torch", "dpkd.backends.jax")

#: backend name -> the functions ``require`` skipped because the run allowed them (the summary lists them)
NOT_RUN: dict[str, set[str]] = {}


def spec_functions() -> list[str]:
    """Every public function of ``dpkd.spec`` a backend must export (the analytic ``*_grad`` are spec-only)."""
    spec = importlib.import_module("dpkd.spec")
    return [n for n in spec.__all__ if n[0].islower() and callable(getattr(spec, n)) and not n.endswith("_grad")]


def spec_function(name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module("dpkd.spec"), name)


def fused_functions() -> list[str]:
    """The fused lm_head functions the registry describes: the generic ones and each function's named one."""
    return [*reg.GENERIC_FUSED, *(s.fused for s in reg.REGISTRY if s.fused)]


def has_fused_path(module: Any) -> bool:
    return any(hasattr(module, name) for name in fused_functions())


def fused_reference(module: Any) -> Any:
    """The built-in backend whose fused functions ``module``'s are compared with (None: none imports)."""
    for name in FUSED_BACKENDS:
        if name == getattr(module, "__name__", ""):
            continue
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _same_default(expected: Any, actual: Any) -> bool:
    if expected is inspect.Parameter.empty or actual is inspect.Parameter.empty:
        return expected is actual
    return expected == actual and isinstance(expected, bool) == isinstance(actual, bool)


def signature_problems(expected: Callable[..., Any], actual: Callable[..., Any]) -> list[str]:
    """How ``actual``'s parameters differ from ``expected``'s: names, kinds (positional or keyword-only),
    defaults and order (annotations are the frameworks' own and are not compared); [] when they agree."""
    want = list(inspect.signature(expected).parameters.values())
    have = {p.name: p for p in inspect.signature(actual).parameters.values()}
    names = [p.name for p in want]
    problems = []
    missing = [n for n in names if n not in have]
    extra = [n for n in have if n not in names]
    if missing:
        problems.append(f"missing parameter(s) {missing}")
    if extra:
        problems.append(f"unexpected parameter(s) {extra}")
    for p in want:
        q = have.get(p.name)
        if q is None:
            continue
        if q.kind is not p.kind:
            problems.append(f"`{p.name}` is {q.kind.description}, expected {p.kind.description}")
        if not _same_default(p.default, q.default):
            got = "no default" if q.default is inspect.Parameter.empty else f"defaults to {q.default!r}"
            problems.append(f"`{p.name}` {got}, expected " + (
                "no default" if p.default is inspect.Parameter.empty else f"{p.default!r}"))
    if not problems and names != list(have):
        problems.append(f"parameters in the order {list(have)}, expected {names}")
    return problems
