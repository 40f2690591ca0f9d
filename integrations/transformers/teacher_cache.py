"""The teacher log-prob cache: log p(y_t) of pre-generated teacher outputs, computed once and reused.

With the teacher's outputs y_t generated before training, every quantity the teacher contributes on y_t is
a constant of the example: the per-token log-probabilities log p(y_t,j | x, y_t,<j) (their sum is DPKD's
c = log p(y_t|x), so a step runs the teacher on the student's y_s only) and, for a token-level loss on y_t
(the released code's token-level DPKD), the teacher's next-token distribution at every position of y_t,
kept as its top-k entries (k configurable; the label's own log-prob is always kept exactly). A step then
reads the distribution back as

    log p̂_v = log p_v                              for v in top-k ∪ {label},
    log p̂_v = log((1 − Σ_{kept} p) / (V − |kept|))  otherwise (the remaining mass spread evenly),

which is a distribution, finite everywhere, and exactly p when k = V.

The cache is one safetensors file per (teacher fingerprint, tokenizer fingerprint, dtype, k) — a changed
teacher or tokenizer is a different file, so stale values are never read — holding the entries of every
example seen so far, keyed by an example id: the SHA-256 of its prompt and y_t token ids (the tokens the
teacher scored). Examples added later (another split, another job) are scored and appended; files are
written atomically (tmp, fsync, rename). The same cache serves every epoch, method and seed.

Example::

    >>> cache = TeacherLogpCache("~/.cache/dpkd/teacher-logps", teacher, tokenizer, top_k=64)  # doctest: +SKIP
    >>> entries = cache.entries(examples)         # scores the missing ones, then reads  # doctest: +SKIP
    >>> c = entries[0].token_logps.sum()          # log p(y_t | x)                        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..durable_files import fsync_path, unique_suffix
from .batching import IGNORE_INDEX, pad_pairs

__all__ = ["TeacherLogpCache", "CachedTeacher", "example_id", "model_fingerprint", "tokenizer_fingerprint",
           "dense_teacher_logps"]

_FORMAT = "dpkd-teacher-logps-v1"


def example_id(prompt_ids: Sequence[int], teacher_ids: Sequence[int]) -> str:
    """The cache key of an example: the SHA-256 (hex, 32 chars) of its prompt and y_t token ids."""
    h = hashlib.sha256(json.dumps([list(prompt_ids), list(teacher_ids)]).encode())
    return h.hexdigest()[:32]


def model_fingerprint(model: Any) -> str:
    """SHA-256 of a model's config and every weight (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's full definition (the fast tokenizer's JSON, else its vocabulary) and its
    special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + body + special).encode()).hexdigest()


@dataclass(frozen=True)
class CachedTeacher:
    """One example's cached teacher values on y_t (L = len(y_t)): ``token_logps`` [L]; with k > 0,
    ``topk_ids`` [L, k] (int64) and ``topk_logps`` [L, k] of the teacher distribution at each position."""

    token_logps: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None


def dense_teacher_logps(entries: Sequence[CachedTeacher], labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher log-distributions [B, T, V] read back from cached top-k entries (module docstring) at
    the labelled positions of the shifted ``labels`` [B, T] (row i's positions are y_t of entry i, in order);
    0-filled rows elsewhere (masked out by the losses)."""
    mask = labels != IGNORE_INDEX
    dtype = entries[0].token_logps.dtype
    out = torch.zeros((*labels.shape, vocab), dtype=dtype)
    ids = torch.cat([e.topk_ids for e in entries])  # [N, k]
    logps = torch.cat([e.topk_logps for e in entries])
    label = labels[mask]  # [N]
    label_logp = torch.cat([e.token_logps for e in entries])
    if ids.shape[0] != label.shape[0]:
        raise ValueError(f"dense_teacher_logps: {ids.shape[0]} cached positions for {label.shape[0]} labels")
    kept = torch.zeros((label.shape[0], vocab), dtype=torch.bool)
    kept.scatter_(1, ids, True)
    kept[torch.arange(label.shape[0]), label] = True
    dense = torch.full((label.shape[0], vocab), float("-inf"), dtype=dtype)
    dense.scatter_(1, ids, logps)
    dense[torch.arange(label.shape[0]), label] = label_logp
    n_kept = kept.sum(-1)
    rest = (1.0 - torch.where(kept, dense.exp(), 0.0).sum(-1)).clamp_min(torch.finfo(dtype).tiny)
    tail = torch.log(rest / (vocab - n_kept).clamp_min(1))
    out[mask] = torch.where(kept, dense, tail[:, None])
    return out


def _payload_crc(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the tensors' names and bytes (in name order), stored in the file's metadata."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensors[name].contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return f"{crc:08x}"


class TeacherLogpCache:
    """Cached teacher values on pre-generated y_t (module docstring).

    Args:
        folder: where the cache files live (created).
        teacher: the frozen teacher (``transformers`` causal LM); tokenizer: its tokenizer.
        dtype: storage (and scoring) dtype of the log-probs.
        top_k: entries of the per-position distribution to keep (0: only the y_t tokens' log-probs;
            the vocabulary size: exact distributions).
        batch_size: examples per teacher forward when scoring.
        teacher_fingerprint: a precomputed fingerprint (e.g. the checkpoint file's SHA-256) instead of
            hashing every weight.
        fused: score on the fused token-chunked lm_head path (never the [B, T, V] logits; in the teacher's
            dtype); only with ``top_k`` = 0.
    """

    def __init__(self, folder: str | Path, teacher: Any, tokenizer: Any, *, dtype: torch.dtype = torch.float32,
                 top_k: int = 0, batch_size: int = 32, teacher_fingerprint: str | None = None,
                 fused: bool = False) -> None:
        vocab = teacher.get_output_embeddings().weight.shape[0]
        if not 0 <= top_k <= vocab:
            raise ValueError(f"TeacherLogpCache: `top_k` must lie in [0, {vocab}] (the vocabulary), got {top_k}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"TeacherLogpCache: `dtype` must be torch.float32 or torch.float64, got {dtype}")
        if fused and top_k:
            raise ValueError("TeacherLogpCache: `fused` scoring keeps no distributions; use it with top_k = 0")
        self.fused = fused
        self.folder = Path(folder).expanduser()
        self.teacher, self.tokenizer = teacher, tokenizer
        self.dtype, self.top_k, self.vocab, self.batch_size = dtype, top_k, vocab, batch_size
        self.meta = {"format": _FORMAT, "teacher": teacher_fingerprint or model_fingerprint(teacher),
                     "tokenizer": tokenizer_fingerprint(tokenizer), "dtype": str(dtype).removeprefix("torch."),
                     "top_k": top_k, "vocab": vocab}
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.folder / f"teacher-logps-{key}.safetensors"
        self.scored = 0  # examples this instance ran the teacher on (0 on a warm cache)
        self.damaged = False  # the file was damaged when last read (it is rewritten whole on the next write)
        self._entries: dict[str, CachedTeacher] = self._read()

    # ------------------------------------------------------------------------------------------ file
    def _read(self) -> dict[str, CachedTeacher]:
        """The file's entries; a damaged file (unreadable, or its CRC-32 not the one written) is named on
        stderr and counts as empty: its examples are scored again and the file rewritten whole."""
        if not self.path.is_file():
            return {}
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata()
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)
            keys = json.loads(meta["keys"])
            crc = meta.get("crc32")  # None: a file of an older dpkd, written without one
        except Exception as e:  # noqa: BLE001 - whatever safetensors or JSON says of a damaged file
            return self._damaged(f"cannot be read ({type(e).__name__}: {str(e)[:200]})")
        if any(str(self.meta[k]) != meta.get(k) for k in self.meta):
            raise ValueError(f"{self.path}: written for another teacher/tokenizer/dtype/k; delete it")
        if crc is not None and crc != _payload_crc(tensors):
            return self._damaged("is damaged (its CRC-32 differs from the one written)")
        offsets = tensors["offsets"].tolist()
        logps = tensors["token_logps"]
        ids = tensors["topk_ids"].long() if self.top_k else None
        topk = tensors["topk_logps"] if self.top_k else None
        if len(offsets) != len(keys) + 1 or offsets[-1] != logps.shape[0]:
            return self._damaged(f"is damaged ({len(keys)} keys, {len(offsets)} offsets)")
        out = {}
        for i, k in enumerate(keys):
            a, b = offsets[i], offsets[i + 1]
            out[k] = CachedTeacher(logps[a:b], None if ids is None else ids[a:b], None if topk is None else topk[a:b])
        return out

    def _damaged(self, problem: str) -> dict[str, CachedTeacher]:
        print(f"TeacherLogpCache: {self.path} {problem}; scoring its examples again", file=sys.stderr, flush=True)
        self.damaged = True
        return {}

    def _write(self) -> None:
        from safetensors.torch import save_file

        keys = list(self._entries)
        entries = [self._entries[k] for k in keys]
        lengths = torch.tensor([0] + [e.token_logps.shape[0] for e in entries])
        tensors = {"offsets": lengths.cumsum(0), "token_logps": torch.cat([e.token_logps for e in entries])}
        if self.top_k:
            tensors["topk_ids"] = torch.cat([e.topk_ids for e in entries]).to(torch.int32)
            tensors["topk_logps"] = torch.cat([e.topk_logps for e in entries])
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{unique_suffix()}")
        metadata = {**{k: str(v) for k, v in self.meta.items()}, "keys": json.dumps(keys),
                    "crc32": _payload_crc(tensors)}
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            fsync_path(tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(self.folder)
        self.damaged = False

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, examples: Sequence[Any]) -> list[CachedTeacher]:
        from .heads import model_head, token_logps

        pad = self.tokenizer.pad_token_id
        out = []
        for i in range(0, len(examples), self.batch_size):
            chunk = examples[i : i + self.batch_size]
            batch = pad_pairs([ex.prompt_ids for ex in chunk], [ex.teacher_ids for ex in chunk], pad)
            head = model_head(self.teacher, batch, fused=self.fused)
            if self.fused:
                tok = token_logps(head)
                out += [CachedTeacher(tok[r][head.mask[r]].to(self.dtype).cpu()) for r in range(len(chunk))]
                continue
            logp = torch.log_softmax(head.logits.to(torch.promote_types(head.logits.dtype, self.dtype)), dim=-1)
            mask = head.mask
            tok = logp.gather(-1, head.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            if self.top_k:
                top_v, top_i = logp.topk(self.top_k, dim=-1)
            for r in range(len(chunk)):
                m = mask[r]
                out.append(CachedTeacher(tok[r][m].to(self.dtype).cpu(),
                                         top_i[r][m].cpu() if self.top_k else None,
                                         top_v[r][m].to(self.dtype).cpu() if self.top_k else None))
        return out

    def entries(self, examples: Sequence[Any]) -> list[CachedTeacher]:
        """The cached values of ``examples`` (each needs ``teacher_ids``): missing ones are scored with the
        teacher and written to the file first."""
        if any(ex.teacher_ids is None for ex in examples):
            raise ValueError("TeacherLogpCache: every example needs a pre-generated `teacher_ids` (y_t)")
        keys = [example_id(ex.prompt_ids, ex.teacher_ids) for ex in examples]
        if any(k not in self._entries for k in keys):
            self._entries.update(self._read())  # another process (rank 0, another job) may have scored them
        missing = {k: ex for k, ex in zip(keys, examples, strict=True) if k not in self._entries}
        if missing:
            for k, e in zip(missing, self._score(list(missing.values())), strict=True):
                self._entries[k] = e
            self.scored += len(missing)
            self._write()
        return [self._entries[k] for k in keys]
