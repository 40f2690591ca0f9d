"""The one method table: every distillation method the integrations run, declared once.

Each :class:`Method` names what it needs (the teacher output y_t, the student's own samples y_s, a teacher
forward during the step, the teacher log-probs log p(y_t) that can be cached with y_t), its
hyper-parameters (:class:`HyperParam`: default, range, the values of the validation grid) and the function
that builds its loss from them (:attr:`Method.build`). The Hugging Face trainer, the ``dpkd distill`` job,
the CLI (help text and choices), the experiment grid and the Megatron driver all read :data:`METHODS`;
adding a method is one entry here plus its loss.

A loss is one of four kinds, each a small frozen description the integration executes with its own
primitives (materialised logits, the fused lm_head path, vocab-parallel shards):

* :class:`CrossEntropy` — −log q on the dataset response (``on="data"``) or on y_t (``on="y_t"``);
* :class:`TokenDivergence` — a per-token divergence between teacher and student next-token distributions
  (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``akl``, ``dpkd_token``), teacher-forced on the
  data, on y_t, or — with probability ``on_policy_prob`` per step (GKD's λ) — on fresh student samples;
* :class:`PairLoss` — a sequence-level preference loss on (y_t = chosen, y_s = rejected):
  ``fn(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction)`` with a = log q(y_t), b = log q(y_s),
  c = log p(y_t), d = log p(y_s) (``dpkd.backends.torch`` losses; c, d are None for reference-free losses);
* :class:`PolicyGradient` — MiniLLM's sequence-level reverse-KL policy gradient on samples from the
  teacher-mixed distribution.

Naming: policy = student q_θ, reference = teacher p, chosen = y_t, rejected = y_s. This module imports
neither torch nor transformers (the pair losses import ``dpkd.backends.torch`` when they are built).

Example::

    >>> m = METHODS["dpkd"]
    >>> m.needs.student_samples, [h.name for h in m.hparams]
    (True, ['beta', 'label_smoothing'])
    >>> m.resolve({"beta": 0.5})
    {'beta': 0.5, 'label_smoothing': 0.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpkd.spec import distill as spec_distill
from dpkd.spec import sequence as spec_sequence
from dpkd.spec import token as spec_token
from dpkd.spec import validation as v

__all__ = ["HyperParam", "Needs", "Method", "CrossEntropy", "TokenDivergence", "PairLoss", "PolicyGradient",
           "METHODS", "TABLE1", "VARIANTS", "ABLATIONS", "Ablation", "OBJECTIVE_PRESETS", "method_names",
           "methods_help"]


@dataclass(frozen=True)
class HyperParam:
    """One hyper-parameter: its default, its valid range and the values the validation grid tries.

    ``low``/``high`` bound numbers (``open_low``/``open_high``: strict); ``choices`` lists valid strings;
    ``grid`` is empty when the parameter is not tuned. A parameter the loss itself takes is made with
    :meth:`from_option`, so its range is the spec's declaration, not a second copy of it.
    """

    name: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    grid: tuple[Any, ...] = ()

    @classmethod
    def from_option(cls, option: v.Option, help: str, *, default: Any = None, grid: tuple[Any, ...] = ()
                    ) -> HyperParam:
        """The hyper-parameter of a spec option: the same name and valid range (``default``: the method's own
        default where it is not the loss function's)."""
        return cls(option.name, option.default if default is None else default, help, low=option.low,
                   high=option.high, open_low=not option.low_inclusive, open_high=not option.high_inclusive,
                   choices=tuple(option.choices), grid=grid)

    def range_text(self) -> str:
        """The valid range in interval notation (``(0, ∞)``, ``[0, 1]``) or the choices."""
        if isinstance(self.default, bool):
            return "true | false"
        if self.choices:
            return " | ".join(self.choices)
        lo = "-∞" if self.low is None else f"{self.low:g}"
        hi = "∞" if self.high is None else f"{self.high:g}"
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, method: str, value: Any) -> Any:
        """``value`` converted to the default's type, or a ValueError naming the method and parameter."""
        where = f"method {method!r}: hyper-parameter `{self.name}`"
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            return value
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{where} must be one of {self.choices}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number in {self.range_text()}, got {value!r}")
        x = float(value)
        below = self.low is not None and (x <= self.low if self.open_low else x < self.low)
        above = self.high is not None and (x >= self.high if self.open_high else x > self.high)
        if below or above or not math.isfinite(x):
            raise ValueError(f"{where} must lie in {self.range_text()}, got {value!r}")
        return int(value) if isinstance(self.default, int) else x


@dataclass(frozen=True)
class Needs:
    """What a method reads during a step."""

    teacher_outputs: bool = False  # y_t (pre-generated once, or sampled from the teacher online)
    student_samples: bool = False  # y_s, sampled from the current student every step
    teacher_forward: bool = False  # the teacher runs inside the step
    teacher_logps: bool = False  # c = log p(y_t): cacheable with y_t, so only d = log p(y_s) needs the teacher


@dataclass(frozen=True)
class CrossEntropy:
    on: str  # "data" | "y_t"


@dataclass(frozen=True)
class TokenDivergence:
    divergence: str  # forward_kl | reverse_kl | generalized_jsd | akl | dpkd_token
    on: str  # "data" | "y_t"
    options: Mapping[str, Any] = field(default_factory=dict)
    on_policy_prob: float = 0.0  # per step, the chance the batch is the student's own samples instead (GKD λ)


@dataclass(frozen=True)
class PairLoss:
    fn: Callable[..., Any]  # (a, b, c, d, *, chosen_lengths, rejected_lengths, reduction) -> PreferenceLoss
    reference_free: bool = False


@dataclass(frozen=True)
class PolicyGradient:
    mix_alpha: float  # teacher-mixed sampling p̃ = α·p + (1 − α)·q_θ
    length_norm: bool  # R_{t+1} divided by the number of future tokens
    single_step: bool  # the exact per-step reverse KL term of the single-step decomposition


LossSpec = CrossEntropy | TokenDivergence | PairLoss | PolicyGradient


@dataclass(frozen=True)
class Method:
    """A distillation method: what it needs, its hyper-parameters and the builder of its loss."""

    name: str
    title: str  # as in the paper's tables
    summary: str
    needs: Needs
    hparams: tuple[HyperParam, ...]
    build: Callable[[Mapping[str, Any]], LossSpec]
    reference: str

    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hparams}

    def resolve(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated by ``values`` (unknown names are an error), each value range-checked."""
        values = dict(values or {})
        known = {h.name: h for h in self.hparams}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyper-parameter {unknown[0]!r}; "
                             f"it has {sorted(known) or 'none'}")
        return {n: h.check(self.name, values.get(n, h.default)) for n, h in known.items()}

    def loss(self, values: Mapping[str, Any] | None = None) -> LossSpec:
        """The loss description for these hyper-parameter values (defaults for the rest)."""
        return self.build(self.resolve(values))

    def grid(self) -> list[dict[str, Any]]:
        """The validation grid: one point per value of each tuned parameter (one axis at a time around the
        defaults, so a method with k tuned values costs k runs), or just the defaults."""
        points = [self.defaults()]
        for h in self.hparams:
            for value in h.grid:
                p = {**self.defaults(), h.name: value}
                if p not in points:
                    points.append(p)
        return points


def _tb() -> Any:
    import dpkd.backends.torch as tb

    return tb


# ----------------------------------------------------------------------------------------------- builders
def _float_lengths(a: Any, chosen_lengths: Any, rejected_lengths: Any) -> tuple[Any, Any]:
    return chosen_lengths.to(a.dtype), rejected_lengths.to(a.dtype)


def _dpkd(length_normalize: bool) -> Callable[[Mapping[str, Any]], PairLoss]:
    def build(hp: Mapping[str, Any]) -> PairLoss:
        def fn(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction):
            lt, ls = _float_lengths(a, chosen_lengths, rejected_lengths)
            return _tb().dpkd_loss(a, b, c, d, chosen_lengths=lt if length_normalize else None,
                                   rejected_lengths=ls if length_normalize else None, beta=hp["beta"],
                                   label_smoothing=hp["label_smoothing"], reduction=reduction)

        return PairLoss(fn)

    return build


def _ipo(hp: Mapping[str, Any]) -> PairLoss:
    ln = hp["length_normalize"]

    def fn(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction):
        lt, ls = _float_lengths(a, chosen_lengths, rejected_lengths)
        return _tb().ipo_loss(a, b, c, d, tau=hp["tau"], chosen_lengths=lt if ln else None,
                              rejected_lengths=ls if ln else None, length_normalize=ln, reduction=reduction)

    return PairLoss(fn)


def _cpo(hp: Mapping[str, Any]) -> PairLoss:
    def fn(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction):
        lt, _ = _float_lengths(a, chosen_lengths, rejected_lengths)
        return _tb().cpo_loss(a, b, beta=hp["beta"], nll_weight=hp["nll_weight"], chosen_lengths=lt,
                              reduction=reduction)

    return PairLoss(fn, reference_free=True)


def _simpo(hp: Mapping[str, Any]) -> PairLoss:
    def fn(a, b, c, d, *, chosen_lengths, rejected_lengths, reduction):
        lt, ls = _float_lengths(a, chosen_lengths, rejected_lengths)
        return _tb().simpo_loss(a, b, chosen_lengths=lt, rejected_lengths=ls, beta=hp["beta"], gamma=hp["gamma"],
                                reduction=reduction)

    return PairLoss(fn, reference_free=True)


# ----------------------------------------------------------------------------------------------- the table
# Parameters the loss functions take are declared once, in the spec (their ranges come from there).
def _beta(default: float, grid: tuple[float, ...], what: str = "inverse temperature β of the implicit reward"
          ) -> HyperParam:
    return HyperParam.from_option(v.BETA, what, default=default, grid=grid)


_SMOOTH = HyperParam.from_option(v.LABEL_SMOOTHING, "cDPO label smoothing ε")
_KD_T = HyperParam.from_option(v.TEMPERATURE, "softmax temperature τ of both distributions", grid=(2.0,))

_ALL = [
    Method("sft", "SFT", "cross-entropy on the dataset response", Needs(), (),
           lambda hp: CrossEntropy("data"), "supervised fine-tuning"),
    Method("kd", "KD", "word-level forward KL(p‖q), teacher-forced on the dataset response",
           Needs(teacher_forward=True), (_KD_T,),
           lambda hp: TokenDivergence("forward_kl", "data", {"temperature": hp["temperature"]}),
           "Hinton et al. 2015; the MiniLLM/DPKD KD baseline"),
    Method("seqkd", "SeqKD", "cross-entropy on the teacher output y_t", Needs(teacher_outputs=True), (),
           lambda hp: CrossEntropy("y_t"), "Kim & Rush 2016"),
    Method("minillm", "MiniLLM",
           "sequence-level reverse KL(q‖p) by policy gradient on teacher-mixed samples (single-step "
           "decomposition, length-normalised returns)",
           Needs(teacher_forward=True),
           (HyperParam("mix_alpha", 0.2, "teacher share α of the sampling mixture α·p + (1−α)·q", low=0.0,
                       high=1.0, open_high=True, grid=(0.0, 0.5)),
            HyperParam("length_norm", True, "divide the return R_{t+1} by the number of future tokens"),
            HyperParam("single_step", True, "add the exact per-step reverse KL (single-step decomposition)")),
           lambda hp: PolicyGradient(hp["mix_alpha"], hp["length_norm"], hp["single_step"]),
           "Gu et al. 2024 (MiniLLM), LMOps minillm/"),
    Method("akl", "AKL", "adaptive head/tail mix of forward and reverse KL per token, teacher-forced on the data",
           Needs(teacher_forward=True),
           (HyperParam.from_option(spec_distill.MU, "head mass μ that splits head from tail", grid=(0.3, 0.7)),),
           lambda hp: TokenDivergence("akl", "data", {"mu": hp["mu"]}), "Wu et al. 2024 (AKL)"),
    Method("gkd", "GKD", "generalised JSD per token on the student's own samples with probability λ, else on "
           "the data", Needs(teacher_forward=True, student_samples=True),
           (HyperParam.from_option(spec_distill.JSD_BETA, "JSD interpolation β (0: forward KL, 1: reverse KL)",
                                   grid=(0.1, 0.9)),
            HyperParam("lmbda", 0.5, "per-step probability λ of on-policy student samples", low=0.0, high=1.0),
            HyperParam.from_option(v.TEMPERATURE, "softmax temperature of both distributions")),
           lambda hp: TokenDivergence("generalized_jsd", "data",
                                      {"beta": hp["beta"], "temperature": hp["temperature"]},
                                      on_policy_prob=hp["lmbda"]),
           "Agarwal et al. 2024 (GKD); TRL GKDTrainer lmbda/beta"),
    Method("dpkd_token", "DPKD (token, released code)",
           "per-position preference of the teacher's over the student's arg-max token, teacher-forced on y_t",
           Needs(teacher_outputs=True, teacher_forward=True),
           (_beta(0.1, (0.5, 2.0)), HyperParam.from_option(spec_token.FORM, "per-token loss form"), _SMOOTH),
           lambda hp: TokenDivergence("dpkd_token", "y_t", {"beta": hp["beta"], "form": hp["form"],
                                                           "label_smoothing": hp["label_smoothing"]}),
           "LMOps dpkd/main.py get_distil_loss"),
    Method("dpkd_eq8", "DPKD (Eq. 8)", "−log σ(β·h), h = log q(y_t)/p(y_t) − log q(y_s)/p(y_s)",
           Needs(teacher_outputs=True, student_samples=True, teacher_forward=True, teacher_logps=True),
           (_beta(0.1, (0.01, 0.5)), _SMOOTH), _dpkd(False), "Li et al. 2024 Eq. 8"),
    Method("dpkd", "DPKD (Eq. 9)", "−log σ(β·h_LN), each log-ratio divided by its response length",
           Needs(teacher_outputs=True, student_samples=True, teacher_forward=True, teacher_logps=True),
           (_beta(0.1, (0.5, 2.0)), _SMOOTH), _dpkd(True), "Li et al. 2024 Eq. 9, Algorithm 1"),
    Method("ipo", "IPO", "(h − 1/(2τ))², length-averaged log-ratios by default",
           Needs(teacher_outputs=True, student_samples=True, teacher_forward=True, teacher_logps=True),
           (HyperParam.from_option(spec_sequence.TAU, "IPO regulariser τ", grid=(0.5, 2.0)),
            HyperParam.from_option(spec_sequence.LENGTH_NORMALIZE,
                                   "length-averaged log-ratios (TRL) instead of sums")),
           _ipo, "Azar et al. 2024; DPKD Table 2"),
    Method("cpo", "CPO", "−log σ(β(log q(y_t) − log q(y_s))) + w·NLL(y_t), reference-free",
           Needs(teacher_outputs=True, student_samples=True),
           (_beta(0.1, (0.5, 2.0), "inverse temperature β"),
            HyperParam.from_option(spec_sequence.NLL_WEIGHT, "weight w of the NLL term on y_t")),
           _cpo, "Xu et al. 2024; DPKD Table 2"),
    Method("simpo", "SimPO", "−log σ(β·log q(y_t)/|y_t| − β·log q(y_s)/|y_s| − γ), reference-free",
           Needs(teacher_outputs=True, student_samples=True),
           (_beta(2.0, (0.5, 5.0), "inverse temperature β"),
            HyperParam.from_option(spec_sequence.GAMMA, "target margin γ")),
           _simpo, "Meng et al. 2024; DPKD Table 2"),
]

#: Every method by name.
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
#: The paper's Table 1 (its baselines, DPKD in both equations and the released code's token-level form).
TABLE1 = ("sft", "kd", "seqkd", "minillm", "akl", "gkd", "dpkd_token", "dpkd_eq8", "dpkd")
#: Table 2's preference forms (``--variants``).
VARIANTS = ("ipo", "cpo", "simpo")


@dataclass(frozen=True)
class Ablation:
    """A Table 3 row: a method run with some objective or hyper-parameter changes (``--ablations``)."""

    name: str
    title: str
    method: str
    objective: Mapping[str, float] = field(default_factory=dict)  # ObjectiveConfig fields to override


#: Table 3 (``--ablations``); "w/o length norm." is Eq. 8, already a Table 1 row.
ABLATIONS: dict[str, Ablation] = {
    "dpkd_no_lm": Ablation("dpkd_no_lm", "DPKD w/o LM loss", "dpkd", {"lm_coef": 0.0}),
}


#: Objective presets (``dpkd.integrations.transformers.trainer.objective_preset``): ``paper`` = Algorithm 1,
#: L_method + λ·L_PT (λ = 0.5); ``released`` = the LMOps runner, 0.5·CE_D + 0.5·L_method + 0.5·(0.5·CE_Dp +
#: 0.5·KD_Dp); ``half`` = 0.5·CE_D + 0.5·L_method (MiniLLM's KD mix, a named alternative); ``distil-only``.
OBJECTIVE_PRESETS = ("paper", "released", "half", "distil-only")


def method_names() -> list[str]:
    return list(METHODS)


def methods_help(names: tuple[str, ...] | list[str] | None = None) -> str:
    """One line per method: name, title, what it needs and its hyper-parameters with defaults and ranges
    (the text of the CLI's ``--methods`` help and of the README)."""
    lines = []
    for name in names or METHODS:
        m = METHODS[name]
        need = [k for k, on in (("y_t", m.needs.teacher_outputs), ("y_s", m.needs.student_samples),
                                ("teacher forward", m.needs.teacher_forward),
                                ("cached log p(y_t)", m.needs.teacher_logps)) if on]
        hps = ", ".join(f"{h.name}={h.default} " + (f"({h.range_text()})" if isinstance(h.default, (bool, str))
                                                     else f"in {h.range_text()}") for h in m.hparams)
        hps = hps or "no hyper-parameters"
        lines.append(f"{m.name}: {m.title} — {m.summary}; needs {', '.join(need) or 'nothing'}; {hps}")
    return "\n".join(lines)
