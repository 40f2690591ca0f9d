"""Keyed sampling: every response drawn from its own random stream, keyed by (seed, purpose, step, example).

``model.generate(do_sample=True)`` draws all rows of a batch from one global generator, so a response depends
on which other prompts share its batch, on the batch size and on how many draws came before. A distributed
step splits the global batch over ranks and micro-batches, and a resumed run starts from the middle of the
stream: neither would reproduce a single-process run. Here each row has its own ``torch.Generator`` seeded
from a key, and the token at every position is the Gumbel-max sample

    y_t = argmax_v ( warp(s_t)_v + G_{t,v} ),   G_{t,v} = −log(−log U_{t,v}),  U ~ Uniform(0, 1) from the row's stream,

which is an exact draw from softmax(warp(s_t)) (Gumbel 1954; Maddison et al. 2014), where ``warp`` is
transformers' temperature / top-k / top-p warpers (filtered tokens get −∞ and are never drawn). The
processor is the last one of ``generate``'s list and decoding is then greedy, so a response depends only on
its prompt, the model and its key — not on the batch, the rank, the micro-batch or the history.

Example::

    >>> keys = [sample_key(0, "y_s", step=3, example=i) for i in (5, 9)]
    >>> len(set(keys)), keys[0] == sample_key(0, "y_s", step=3, example=5)
    (2, True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["KeyedSampling", "sample_key"]


def sample_key(seed: int, purpose: str, *, step: int, example: int) -> int:
    """A 63-bit seed for one response: ``purpose`` names the draw (``"y_s"``, ``"y_t"``, ``"gkd"``, ...)."""
    digest = hashlib.blake2b(f"{seed}|{purpose}|{step}|{example}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class KeyedSampling:
    """A ``transformers`` logits processor that turns greedy decoding into keyed sampling (module docstring).

    ``keys``: one seed per row of the batch; ``temperature`` > 0, ``top_k`` (0: off), ``top_p`` (1: off).
    One instance serves one ``generate`` call: its t-th call draws position t's token.
    """

    BLOCK = 16  # positions of noise drawn per row at once (torch draws them in order: the same stream)

    def __init__(self, keys: Sequence[int], *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if not temperature > 0:
            raise ValueError(f"KeyedSampling: `temperature` must be > 0, got {temperature}")
        self.generators = [torch.Generator().manual_seed(int(k)) for k in keys]
        self.calls = 0
        self.noise = torch.empty(0)
        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def _gumbel_block(self, vocab: int, device: torch.device) -> torch.Tensor:
        u = torch.stack([torch.rand(self.BLOCK, vocab, generator=g, dtype=torch.float64) for g in self.generators])
        return (-torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))).to(device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"KeyedSampling: {scores.shape[0]} rows but {len(self.generators)} keys")
        for w in self.warpers:
            scores = w(input_ids, scores)
        offset = self.calls % self.BLOCK
        if offset == 0:  # the next BLOCK positions' noise of every row at once (one draw per row, not per token)
            self.noise = self._gumbel_block(scores.shape[-1], scores.device)
        self.calls += 1
        return (scores.double() + self.noise[:, offset]).to(scores.dtype)
