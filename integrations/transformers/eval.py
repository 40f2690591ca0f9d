"""Evaluation by generation: Rouge-L and exact match, overall and per golden-response-length bucket.

Metrics as in the MiniLLM/DPKD evaluation (spec/README.md §10, D20): Rouge-L F-measure from ``rouge-score``
with the Porter stemmer, and exact match after SQuAD-style normalisation (lower-case, drop punctuation and
the articles a/an/the, collapse whitespace); each is the maximum over an example's references, ×100, then
averaged. Buckets (Sec. 4.6, Tables 4–5) by the golden response's word count: ``0-30`` (≤ 30 words),
``30-70`` (31–70), ``>70`` (the paper leaves units and boundaries open; words and these edges are our
choice). Also the first-response-token KLD/rKLD to a teacher (Sec. 4.5).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .batching import forward_logits, generate, pad_pairs
from .data import Example, word_count

__all__ = [
    "normalize_answer",
    "exact_match",
    "rouge_l",
    "length_bucket",
    "BUCKETS",
    "score_predictions",
    "evaluate_model",
    "predict",
    "first_token_kl",
    "results_markdown",
    "write_results",
]

BUCKETS = ("0-30", "30-70", ">70")
_SCORER = None


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, remove punctuation, articles and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    pred = normalize_answer(prediction)
    return 100.0 * max(float(pred == normalize_answer(r)) for r in references)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max over references of the Rouge-L F-measure (rouge-score, stemmer), ×100."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(_SCORER.score(r, prediction)["rougeL"].fmeasure for r in references)


def length_bucket(golden: str) -> str:
    n = word_count(golden)
    return BUCKETS[0] if n <= 30 else BUCKETS[1] if n <= 70 else BUCKETS[2]


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      bucket_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall and per-bucket mean Rouge-L / exact match; the bucket is taken from ``bucket_texts`` (the
    golden responses) or else the first reference."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("score_predictions: need one non-empty reference list per prediction")
    keys = bucket_texts if bucket_texts is not None else [refs[0] for refs in references]
    rows = [(length_bucket(k), rouge_l(p, refs), exact_match(p, refs))
            for p, refs, k in zip(predictions, references, keys, strict=True)]

    def agg(sel: list[tuple[str, float, float]]) -> dict[str, float]:
        if not sel:
            return {"n": 0, "rougeL": float("nan"), "exact_match": float("nan")}
        return {"n": len(sel), "rougeL": sum(r for _, r, _ in sel) / len(sel),
                "exact_match": sum(e for _, _, e in sel) / len(sel)}

    return {"overall": agg(rows), "buckets": {b: agg([r for r in rows if r[0] == b]) for b in BUCKETS}}


@torch.no_grad()
def first_token_kl(student: Any, teacher: Any, examples: Sequence[Example], *, pad_id: int) -> dict[str, float]:
    """Mean KL(p‖q) and KL(q‖p) of the next-token distributions at the first response position."""
    from .methods import backend

    prompts = [ex.prompt_ids for ex in examples]
    batch = pad_pairs(prompts, [ex.response_ids[:1] for ex in examples], pad_id)
    pos = torch.tensor([len(p) - 1 for p in prompts])
    rows = torch.arange(len(prompts))
    student.eval()
    teacher.eval()
    s = forward_logits(student, batch)[rows, pos]
    t = forward_logits(teacher, batch)[rows, pos]
    d = backend().first_token_divergence(s, t)
    return {"kld": float(d["kld"]), "rkld": float(d["rkld"])}


def predict(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int,
            do_sample: bool = False, temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """The decoded response of ``model`` to each example's prompt: greedy, or sampled at ``temperature``
    (top_k = 0, top_p = 1) with a seeded RNG isolated from the caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        outs = generate(model, [ex.prompt_ids for ex in examples], pad_id=tokenizer.pad_token_id,
                        eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, batch_size=batch_size)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    teacher: Any = None,
    references: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Generate a response to each held-out prompt and score it (greedy unless ``do_sample``; sampling is
    seeded and isolated from the caller's RNG) against the golden references, or ``references`` when given
    (e.g. the teacher's own outputs). With ``teacher``, adds first-token KLD/rKLD."""
    preds = predict(model, tokenizer, examples, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, seed=seed, batch_size=batch_size)
    refs = references if references is not None else [ex.record.all_references for ex in examples]
    result = score_predictions(preds, refs, [ex.record.response for ex in examples])
    if teacher is not None and teacher is not model:
        result["first_token"] = first_token_kl(model, teacher, examples, pad_id=tokenizer.pad_token_id)
    result["samples"] = [{"prompt": ex.record.instruction, "context": ex.record.context,
                          "reference": ex.record.response, "prediction": p}
                         for ex, p in zip(examples[:5], preds[:5], strict=False)]
    return result


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per model, Rouge-L and EM overall and per bucket."""
    head = "| model | Rouge-L | EM | " + " | ".join(f"R-L {b}" for b in BUCKETS) + " | " + \
        " | ".join(f"EM {b}" for b in BUCKETS) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(BUCKETS))]
    for name, r in results.items():
        cells = [f"{r['overall']['rougeL']:.2f}", f"{r['overall']['exact_match']:.2f}"]
        cells += [f"{r['buckets'][b]['rougeL']:.2f}" for b in BUCKETS]
        cells += [f"{r['buckets'][b]['exact_match']:.2f}" for b in BUCKETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, dict[str, Any]], folder: str | Path) -> None:
    """``eval_results.json`` and ``eval_results.md`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_results.json").write_text(json.dumps(results, indent=1))
    (folder / "eval_results.md").write_text(results_markdown(results))
