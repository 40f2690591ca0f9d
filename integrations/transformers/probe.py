"""The periodic probe on held-out prompts: the paper's curves (Figures 2–3, Table 3's columns).

On each held-out prompt x with the teacher's output y_t (the paper's "chosen"):

* **frozen pairs** — y_s sampled from the student once, when the run starts, and kept: the implicit rewards
  r̂(y) = β·log q_θ(y|x)/p(y|x) (Eq. 29) of (y_t, y_s) under the *current* student. Pairs with y_s = y_t
  (margin 0 whatever the student does) are left out of the accuracies (``eval/frozen/ties`` counts them).
  Because the reference is the teacher, the margin β[(log q(y_t) − log q(y_s)) − (log p(y_t) − log p(y_s))]
  starts at −β(KL + rKL) on average and is positive only where the student prefers y_t over y_s *more*
  than the teacher does: a student that matches the teacher has margin 0. The ``eval/frozen/gain/`` keys
  are DPO's own probe on the same pairs, the start student q_0 as reference: gain = margin − margin at the
  start = β[log q(y_t)/q_0(y_t) − log q(y_s)/q_0(y_s)], 0 at the start, positive where training moved the
  student toward y_t and away from its own earlier sample.
* **fresh pairs** — y_s sampled from the current student at every probe (what the training step sees).
  Their expected margin is E_{y_t∼p}[log q/p] − E_{y_s∼q}[log q/p] = −(KL(p‖q) + KL(q‖p)) ≤ 0 when y_t is a
  teacher sample: on-policy reward accuracy stays near 0 until the student reaches the teacher. The probe
  logs both sequence-KL estimates (``kl_seq`` = mean of c − a, ``rkl_seq`` = mean of b − d) next to it.
* first-token KLD / rKLD (Table 3, "based on the first token") and greedy Rouge-L against the golden
  response.

Keys: ``eval/frozen/rewards/{chosen,rejected,margins,accuracies}``, the same under ``eval/fresh/``, with
``accuracies_ln`` the length-normalised (Eq. 9) accuracy; ``eval/frozen/gain/{margins,accuracies}``;
``eval/{frozen,fresh}/ties``; ``eval/kld``, ``eval/rkld``, ``eval/rougeL``.
All sampling uses forked RNGs seeded from (seed, step): the training randomness is untouched, and every
method of one seed sees the same frozen pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import forward_logits, generate, pad_pairs
from .data import Example
from .heads import model_head, sequence_logps

__all__ = ["Probe", "ProbeOptions"]


@dataclass(frozen=True)
class ProbeOptions:
    beta: float = 0.1  # β of the implicit reward (accuracy does not depend on it)
    max_new_tokens: int = 64
    sample_temperature: float = 1.0  # y_s, as in training
    teacher_temperature: float = 1.0  # y_t when an example carries no pre-generated teacher output
    seed: int = 0
    fused: bool = False
    chunk_size: int | None = None


class Probe:
    """Held-out curves of one run (module docstring). ``tokenizer`` (optional) enables greedy Rouge-L."""

    def __init__(self, examples: Sequence[Example], teacher: Any, *, pad_id: int, eos_id: int,
                 options: ProbeOptions, tokenizer: Any = None) -> None:
        self.examples = list(examples)
        self.teacher = teacher
        self.pad_id, self.eos_id = pad_id, eos_id
        self.opt = options
        self.tokenizer = tokenizer
        self.prompts = [ex.prompt_ids for ex in self.examples]
        self.y_t: list[list[int]] = []
        self.frozen: tuple[list[list[int]], torch.Tensor, torch.Tensor] | None = None
        self.start_logps: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, b) of the start student

    def _sample(self, model: Any, salt: int, *, temperature: float, do_sample: bool = True) -> list[list[int]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.opt.seed * 1_000_003 + 104_729 + salt)
            return generate(model, self.prompts, pad_id=self.pad_id, eos_id=self.eos_id,
                            max_new_tokens=self.opt.max_new_tokens, temperature=temperature, do_sample=do_sample)

    def _logps(self, model: Any, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pad_pairs(self.prompts, responses, self.pad_id)
        logps, n = sequence_logps(model_head(model, batch, fused=self.opt.fused, chunk_size=self.opt.chunk_size))
        return logps.double(), n.double()

    @torch.no_grad()
    def start(self, student: Any) -> None:
        """Fix y_t (pre-generated, else sampled from the teacher) and the frozen y_s from ``student``."""
        if not self.examples or self.teacher is None:
            return
        missing = [ex.teacher_ids is None for ex in self.examples]
        sampled = self._sample(self.teacher, -1, temperature=self.opt.teacher_temperature) if any(missing) else []
        self.y_t = [sampled[i] if miss else ex.teacher_ids for i, (ex, miss) in enumerate(zip(self.examples, missing))]
        y_s = self._sample(student, -2, temperature=self.opt.sample_temperature)
        c, _ = self._logps(self.teacher, self.y_t)
        d, _ = self._logps(self.teacher, y_s)
        self.frozen = (y_s, c, d)
        self.start_logps = (self._logps(student, self.y_t)[0], self._logps(student, y_s)[0])

    def state(self) -> dict[str, Any] | None:
        """The frozen pairs as JSON-able values (saved in checkpoints so a resumed run keeps them)."""
        if self.frozen is None:
            return None
        y_s, c, d = self.frozen
        a0, b0 = self.start_logps
        return {"y_t": self.y_t, "y_s": y_s, "c": c.tolist(), "d": d.tolist(), "a0": a0.tolist(), "b0": b0.tolist()}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.y_t = [list(y) for y in state["y_t"]]
            self.frozen = ([list(y) for y in state["y_s"]], torch.tensor(state["c"], dtype=torch.float64),
                           torch.tensor(state["d"], dtype=torch.float64))
            self.start_logps = (torch.tensor(state["a0"], dtype=torch.float64),
                                torch.tensor(state["b0"], dtype=torch.float64))

    def _rewards(self, prefix: str, student: Any, y_s: list[list[int]], c: torch.Tensor, d: torch.Tensor,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        a, lt = self._logps(student, self.y_t)
        b, ls = self._logps(student, y_s)
        beta = self.opt.beta
        chosen, rejected = beta * (a - c), beta * (b - d)
        margin = chosen - rejected
        margin_ln = (a - c) / lt - (b - d) / ls
        # a pair with y_s = y_t has margin exactly 0 for every student: no preference to get right
        distinct = torch.tensor([list(t) != list(s) for t, s in zip(self.y_t, y_s, strict=True)])
        kept = distinct if bool(distinct.any()) else torch.ones_like(distinct)
        out = {f"{prefix}/rewards/chosen": float(chosen.mean()), f"{prefix}/rewards/rejected": float(rejected.mean()),
               f"{prefix}/rewards/margins": float(margin.mean()),
               f"{prefix}/rewards/accuracies": float((margin[kept] > 0).double().mean()),
               f"{prefix}/rewards/accuracies_ln": float((margin_ln[kept] > 0).double().mean()),
               f"{prefix}/kl_seq": float((c - a).mean()), f"{prefix}/rkl_seq": float((b - d).mean()),
               f"{prefix}/ties": float((~distinct).double().mean())}
        if start is not None:
            gain = beta * ((a - start[0]) - (b - start[1]))
            out[f"{prefix}/gain/margins"] = float(gain[kept].mean())
            out[f"{prefix}/gain/accuracies"] = float((gain[kept] > 0).double().mean())
        return out

    @torch.no_grad()
    def metrics(self, student: Any, step: int) -> dict[str, float]:
        """Every probe value of the current ``student`` (empty without examples or teacher)."""
        if self.frozen is None:
            return {}
        was_training = student.training
        student.eval()
        y_s, c, d = self.frozen
        out = self._rewards("eval/frozen", student, y_s, c, d, self.start_logps)
        fresh = self._sample(student, step, temperature=self.opt.sample_temperature)
        d_fresh, _ = self._logps(self.teacher, fresh)
        out.update(self._rewards("eval/fresh", student, fresh, c, d_fresh))
        out.update(self._first_token(student))
        if self.tokenizer is not None:
            out["eval/rougeL"] = self._rouge(student)
        student.train(was_training)
        return out

    def _first_token(self, student: Any) -> dict[str, float]:
        from .methods import backend

        first = pad_pairs(self.prompts, [ex.response_ids[:1] for ex in self.examples], self.pad_id)
        pos = torch.tensor([len(p) - 1 for p in self.prompts])
        rows = torch.arange(len(self.prompts))
        div = backend().first_token_divergence(forward_logits(student, first)[rows, pos],
                                               forward_logits(self.teacher, first)[rows, pos])
        return {"eval/kld": float(div["kld"]), "eval/rkld": float(div["rkld"])}

    def _rouge(self, student: Any) -> float:
        from .eval import rouge_l

        outs = generate(student, self.prompts, pad_id=self.pad_id, eos_id=self.eos_id,
                        max_new_tokens=self.opt.max_new_tokens, do_sample=False)
        preds = [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
        return sum(rouge_l(p, ex.record.all_references) for p, ex in zip(preds, self.examples)) / len(preds)
