"""Padding, generation and log-probability scoring of (prompt, response) pairs for causal LMs.

Training sequences are right-padded ``prompt + response`` with labels ``-100`` on the prompt and the
padding (so only response tokens, including the final EOS, are scored). Generation prompts are left-padded
(decoder-only models continue from the last position).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SequenceBatch", "pad_pairs", "left_pad", "generate", "forward_logits", "TeacherMixture", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """Right-padded ``prompt + response`` sequences: input_ids, attention_mask, labels — all [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_response_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def pad_pairs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> SequenceBatch:
    """Right-pad ``prompt + response`` rows; labels are the response tokens (not shifted), -100 elsewhere."""
    if len(prompts) != len(responses):
        raise ValueError("pad_pairs: `responses` must have one entry per prompt")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if len(r) == 0:
            raise ValueError(f"pad_pairs: `responses` row {i} is empty (every response ends with EOS)")
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor([*p, *r])
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(list(r))
    return SequenceBatch(ids, mask, labels)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask [B, P] for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    mix_teacher: Any = None,
    mix_alpha: float = 0.0,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Responses of ``model`` to ``prompts`` via ``model.generate`` (pure sampling at T = 1, top_k = 0,
    top_p = 1 by default, the MiniLLM/DPKD setting; ``do_sample=False``: greedy). Each response is cut after
    its first EOS (kept) and is never empty. Sampling draws from torch's global RNG (seed it for
    reproducibility) — or, with ``row_seeds`` (one per prompt), each response from its own keyed stream,
    independent of the batch it shares (:mod:`.sampling`; what the distributed trainer uses). With
    ``mix_teacher`` and ``mix_alpha`` > 0 each token is drawn from the teacher-mixed distribution
    α·p + (1 − α)·q (MiniLLM; :class:`TeacherMixture`)."""
    from transformers import LogitsProcessorList

    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError("generate: `row_seeds` must have one seed per prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = (t.to(device) for t in left_pad(chunk, pad_id))
        processors: list[Any] = []
        if mix_teacher is not None and mix_alpha > 0:
            processors.append(TeacherMixture(mix_teacher, mask, mix_alpha))
        kwargs: dict[str, Any] = {"do_sample": do_sample}
        if do_sample and row_seeds is not None:
            from .sampling import KeyedSampling

            # keyed Gumbel-max sampling on top of greedy decoding: the last processor draws the token
            processors.append(KeyedSampling(row_seeds[start : start + batch_size], temperature=temperature,
                                            top_k=top_k, top_p=top_p))
            kwargs["do_sample"] = False
        elif do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **kwargs,
        )
        for row in gen[:, ids.shape[1] :].tolist():
            resp = []
            for tok in row:
                resp.append(tok)
                if tok == eos_id:
                    break
            out.append(resp)
    model.train(was_training)
    return out


def forward_logits(model: Any, batch: SequenceBatch) -> torch.Tensor:
    """Logits [B, T, V] of a right-padded batch (positions are 0..T-1 from the left: no pad before tokens)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TeacherMixture:
    """A ``transformers`` logits processor that turns the student's next-token scores into
    log(α·p + (1 − α)·q): generation then samples from the teacher-mixed distribution (MiniLLM Sec. 2.2).

    The teacher runs incrementally with its own KV cache: the whole left-padded prompt on the first call,
    then one token per call, with explicit position ids (cumulative attention mask − 1) so left padding
    does not shift positions. ``generate`` applies custom processors before its temperature / top-k / top-p
    warpers, so those act on the mixture.
    """

    def __init__(self, teacher: Any, prompt_mask: torch.Tensor, alpha: float) -> None:
        if not 0.0 < alpha < 1.0 + 1e-12:
            raise ValueError(f"TeacherMixture: `alpha` must lie in (0, 1], got {alpha}")
        self.teacher = teacher
        self.mask = prompt_mask
        self.alpha = alpha
        self.cache: Any = None

    @torch.no_grad()
    def teacher_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """log p(·| input_ids) at the last position [B, V], reusing the cache of earlier calls."""
        width = input_ids.shape[1]
        grown = width - self.mask.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], grown))], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache()
            ids, pos = input_ids, positions
        else:
            ids, pos = input_ids[:, -1:], positions[:, -1:]
        out = self.teacher(input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True)
        self.cache = out.cache
        return torch.log_softmax(_at_least_float32(out.logits[:, -1]), dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_p = self.teacher_logprobs(input_ids)
        log_q = torch.log_softmax(_at_least_float32(scores), dim=-1)
        log_p = log_p.to(log_q.dtype)
        if self.alpha >= 1.0:
            return log_p.to(scores.dtype)
        mixed = torch.logaddexp(log_p + math.log(self.alpha), log_q + math.log1p(-self.alpha))
        return mixed.to(scores.dtype)
