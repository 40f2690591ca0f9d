"""Data for the Megatron driver: Dolly-style records, a tiny built-in task, a character tokenizer, batching.

Records and the prompt template are the Hugging Face integration's (``dpkd.integrations.transformers.data``:
``instruction``/``context``/``response`` JSONL, MiniLLM's Alpaca-style prompt), so one data file serves both
integrations. With no data file the driver generates a small letter-manipulation task; with no tokenizer it
uses ``CharTokenizer`` (one id per character), which is enough for the tiny CI configuration.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dpkd.integrations.transformers.data import Record, format_prompt, load_records

__all__ = ["CharTokenizer", "HFTokenizer", "generate_records", "load_records", "Batch", "encode", "collate"]

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"#()-_/\n"


class CharTokenizer:
    """One id per character of a fixed alphabet; id 0 = padding, 1 = end of sequence, 2 = unknown."""

    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self) -> None:
        self._ids = {c: i + 3 for i, c in enumerate(_ALPHABET)}
        self._chars = {i: c for c, i in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        return len(self._ids) + 3

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._chars.get(int(i), "") for i in ids)


class HFTokenizer:
    """A Hugging Face tokenizer (``AutoTokenizer.from_pretrained(path)``) behind the same small interface."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def generate_records(n: int, *, seed: int = 0) -> list[Record]:
    """``n`` short letter-manipulation records (reverse / sort / repeat / count), deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        kind = rng.randrange(4)
        if kind == 0:
            out.append(Record(instruction="Reverse the letters.", context=word, response=word[::-1]))
        elif kind == 1:
            out.append(Record(instruction="Sort the letters.", context=word, response="".join(sorted(word))))
        elif kind == 2:
            out.append(Record(instruction="Repeat the word twice.", context=word, response=f"{word} {word}"))
        else:
            out.append(Record(instruction="How many letters?", context=word, response=str(len(word))))
    return out


@dataclass
class Batch:
    """Right-padded token sequences and their next-token labels (already shifted: labels[t] = token t+1).

    tokens [B, S]; labels [B, S] (−100 on prompt, padding and the last position); prompt_lengths [B]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != -100


def encode(records: Sequence[Record], tokenizer: Any, *, max_prompt: int, max_length: int
           ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per record; prompts cut to ``max_prompt`` tokens (keeping the end,
    where the ``### Response:`` cue is) and responses to fit ``max_length``."""
    out = []
    for r in records:
        prompt = tokenizer.encode(format_prompt(r))[-max_prompt:]
        response = (tokenizer.encode(r.response) + [tokenizer.eos_id])[: max(1, max_length - len(prompt))]
        out.append((prompt, response))
    return out


def collate(pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int, length: int | None = None) -> Batch:
    """Batch (prompt, response) id lists, right-padded to ``length`` (default: the longest)."""
    longest = max(len(p) + len(r) for p, r in pairs)
    s = longest if length is None else length
    tokens = torch.full((len(pairs), s), pad_id, dtype=torch.int64)
    labels = torch.full((len(pairs), s), -100, dtype=torch.int64)
    for i, (p, r) in enumerate(pairs):
        seq = (p + r)[:s]
        tokens[i, : len(seq)] = torch.tensor(seq)
        # position t predicts token t+1; only response tokens are loss targets
        for t in range(len(p) - 1, len(seq) - 1):
            labels[i, t] = seq[t + 1]
    return Batch(tokens, labels, torch.tensor([len(p) for p, _ in pairs]))
