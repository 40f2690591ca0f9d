"""Dolly-style instruction data: loading, the paper's prompt template, filters and tokenisation.

A record has the Dolly-15k schema ``{"instruction", "context", "response", "category"}``. The MiniLLM/LMOps
preprocessed files name the same fields ``input`` and ``output``; both spellings are accepted.

The prompt template is the Alpaca-style one MiniLLM's ``process_data_dolly.py`` (and so the DPKD code) uses;
the filters are those of the paper's Sec. 4.1: instruction and response longer than 10 words,
prompt at most 256 tokens, prompt + response at most 512 tokens. Every dropped record is counted with its
reason (:class:`FilterReport`); nothing disappears silently.

Example::

    >>> records = load_records("dolly.jsonl")            # doctest: +SKIP
    >>> kept, report = filter_records(records)           # doctest: +SKIP
    >>> print(report.summary())                          # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "Record",
    "Example",
    "FilterReport",
    "PROMPT_WITH_CONTEXT",
    "PROMPT_NO_CONTEXT",
    "format_prompt",
    "load_records",
    "records_from_rows",
    "filter_records",
    "tokenize_records",
    "chat_message",
    "word_count",
]

# MiniLLM / LMOps dolly template (process_data_dolly.py).
PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_ALIASES = {"instruction": ("instruction",), "context": ("context", "input"), "response": ("response", "output")}


class DataError(ValueError):
    """A malformed data file or record; the message names the file and the line (or row)."""


@dataclass(frozen=True)
class Record:
    """One Dolly-schema example. ``references`` holds extra golden answers (eval only; may be empty)."""

    instruction: str
    response: str
    context: str = ""
    category: str = ""
    references: tuple[str, ...] = ()
    teacher_response: str | None = None  # a pre-generated teacher output (``dpkd generate``)

    @property
    def all_references(self) -> tuple[str, ...]:
        return (self.response, *self.references)


@dataclass
class Example:
    """A tokenised record: prompt ids, dataset-response ids (ending with EOS), the optional teacher output
    y_t and its cached teacher log-probability c = log p(y_t|x) (summed over y_t's tokens)."""

    record: Record
    prompt_ids: list[int]
    response_ids: list[int]
    teacher_ids: list[int] | None = None
    teacher_logp: float | None = None


@dataclass
class FilterReport:
    """How many records were kept and how many were dropped, per reason."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept} of {self.total} records (dropped — {reasons})"

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped)}


def word_count(text: str) -> int:
    """Number of whitespace-separated words (the unit of the paper's '> 10 words' filter)."""
    return len(text.split())


def format_prompt(record: Record) -> str:
    """The paper's (MiniLLM's) prompt for a record: with an ``### Input:`` block iff the context is non-empty."""
    if record.context.strip():
        return PROMPT_WITH_CONTEXT.format(instruction=record.instruction, context=record.context)
    return PROMPT_NO_CONTEXT.format(instruction=record.instruction)


def _field(row: dict, name: str, where: str, required: bool) -> str:
    for key in _ALIASES[name]:
        if key in row and row[key] is not None:
            value = row[key]
            if not isinstance(value, str):
                raise DataError(f"{where}: field `{key}` must be a string, got {type(value).__name__}")
            return value
    if required:
        names = " or ".join(f"`{k}`" for k in _ALIASES[name])
        raise DataError(f"{where}: missing required field {names}")
    return ""


def _record_from_row(row: object, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    category = row.get("category") or ""
    if not isinstance(category, str):
        raise DataError(f"{where}: field `category` must be a string, got {type(category).__name__}")
    refs = row.get("references") or ()
    if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: field `references` must be a list of strings")
    return Record(
        instruction=_field(row, "instruction", where, True),
        response=_field(row, "response", where, True),
        context=_field(row, "context", where, False),
        category=category,
        references=tuple(refs),
        teacher_response=_optional_str(row, "teacher_response", where),
    )


def _optional_str(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field `{key}` must be a string, got {type(value).__name__}")
    return value


def records_from_rows(rows: Iterable[object], source: str = "<rows>") -> list[Record]:
    """Validate rows (dicts) into records; errors name ``source`` and the 1-based row number."""
    return [_record_from_row(row, f"{source}: row {i}") for i, row in enumerate(rows, start=1)]


def _load_jsonl(path: Path) -> list[Record]:
    # Parsed line by line (not by `datasets`' JSON reader) so an error can name the exact line.
    records = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is named, not a bare UnicodeDecodeError
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(_record_from_row(row, where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_records(source: str | Path, *, split: str = "train") -> list[Record]:
    """Load Dolly-style records from a local ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` file, or from a
    Hugging Face hub dataset name (``split`` selects the split) through ``datasets``.

    Raises :class:`DataError` naming the file and line (row for Parquet / hub data) of a malformed record.
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return _load_jsonl(path)
    import datasets  # deferred: heavy import

    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        ds = datasets.Dataset.from_parquet(str(path))
        return records_from_rows(ds, str(path))
    if path.exists():
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    ds = datasets.load_dataset(str(source), split=split)
    return records_from_rows(ds, f"{source}[{split}]")


def filter_records(
    records: Sequence[Record],
    *,
    min_instruction_words: int = 11,
    min_response_words: int = 11,
    max_prompt_tokens: int | None = None,
    max_length: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[Record], FilterReport]:
    """The paper's Sec. 4.1 filters. Keeps a record iff its instruction has ≥ ``min_instruction_words``
    words and its response ≥ ``min_response_words`` (the paper's "more than 10 words" = 11), and — when a
    token counter is given — prompt tokens ≤ ``max_prompt_tokens`` (code: 256) and prompt + response
    tokens + EOS ≤ ``max_length`` (code: 512). Returns the kept records and a :class:`FilterReport`.
    """
    report = FilterReport(total=len(records))
    kept = []
    for rec in records:
        reason = None
        if word_count(rec.instruction) < min_instruction_words:
            reason = f"instruction_under_{min_instruction_words}_words"
        elif word_count(rec.response) < min_response_words:
            reason = f"response_under_{min_response_words}_words"
        elif count_tokens is not None and (max_prompt_tokens is not None or max_length is not None):
            n_prompt = count_tokens(format_prompt(rec))
            if max_prompt_tokens is not None and n_prompt > max_prompt_tokens:
                reason = f"prompt_over_{max_prompt_tokens}_tokens"
            elif max_length is not None and n_prompt + count_tokens(rec.response) + 1 > max_length:
                reason = f"total_over_{max_length}_tokens"
        if reason is None:
            kept.append(rec)
        else:
            report.dropped[reason] += 1
    report.kept = len(kept)
    return kept, report


def chat_message(record: Record) -> str:
    """The user turn of a record for a chat model: the instruction, then the context after a blank line."""
    return record.instruction + (f"\n\n{record.context}" if record.context.strip() else "")


def tokenize_records(records: Sequence[Record], tokenizer: Any, *, chat: bool = False) -> list[Example]:
    """Token ids of each record's prompt and response (and pre-generated teacher output, if any); responses
    end with ``tokenizer.eos_token_id``. The prompt is the paper's template (:func:`format_prompt`), or with
    ``chat`` the record's :func:`chat_message` through the tokenizer's chat template."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token_id; the response must end with EOS")
    out = []
    for rec in records:
        if chat:
            from .pretrained import chat_prompt_ids

            prompt = chat_prompt_ids(tokenizer, chat_message(rec))
        else:
            prompt = tokenizer(format_prompt(rec), add_special_tokens=False)["input_ids"]
        response = tokenizer(rec.response, add_special_tokens=False)["input_ids"]
        ex = Example(record=rec, prompt_ids=list(prompt), response_ids=[*response, eos])
        if rec.teacher_response is not None:
            ex.teacher_ids = [*tokenizer(rec.teacher_response, add_special_tokens=False)["input_ids"], eos]
        out.append(ex)
    return out
