"""The embedded instruction-following task of the main job (no hub needed).

Records in the Dolly schema, from seven instruction families whose answers are checkable (exact match is
meaningful) and whose golden responses fall into all three length buckets of the paper's Table 4/5:

* ``last_item``   (closed_qa)       — name the last word of a list;
* ``first_item``  (closed_qa)       — name the first word of a list;
* ``count``       (classification)  — how many words a list has (answer as a number word);
* ``contains``    (classification)  — whether a word occurs in a list (yes / no);
* ``reverse``     (generation)      — the list in reverse order;
* ``fact``        (open_qa, no context) — colour and home of an animal from a fixed, seed-determined table
  (knowledge the teacher must memorise);
* ``repeat``      (generation, long) — every word of a long list written twice (30–70 and > 70 words).

Every instruction and response is longer than 10 words, so the paper's filters keep them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .data import Record

__all__ = ["make_task", "make_pretraining_corpus", "write_jsonl", "FAMILIES"]

ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf", "deer", "hawk", "crow", "frog", "goat", "lamb",
           "mole", "seal", "swan", "toad"]
COLOURS = ["red", "blue", "green", "black", "white", "brown", "pink", "gray"]
PLACES = ["forest", "river", "meadow", "mountain", "desert", "swamp", "cave", "valley"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve"]
ITEMS = ANIMALS + COLOURS + PLACES
FAMILIES = ("last_item", "first_item", "count", "contains", "reverse", "fact", "repeat")
_WEIGHTS = (2, 2, 2, 2, 2, 2, 1)


def _facts(seed: int) -> dict[str, tuple[str, str]]:
    rng = random.Random(10_000 + seed)
    return {a: (rng.choice(COLOURS), rng.choice(PLACES)) for a in ANIMALS}


def _record(family: str, rng: random.Random, facts: dict[str, tuple[str, str]]) -> Record:
    words = [rng.choice(ITEMS) for _ in range(rng.randint(3, 8))]
    ctx = " ".join(words)
    if family == "last_item":
        return Record("Read the list of words given in the context and tell me which word comes last in it .",
                      f"The word that comes last in the list is {words[-1]} , so the answer is {words[-1]} .",
                      ctx, "closed_qa")
    if family == "first_item":
        return Record("Read the list of words given in the context and tell me which word comes first in it .",
                      f"The word that comes first in the list is {words[0]} , so the answer is {words[0]} .",
                      ctx, "closed_qa")
    if family == "count":
        return Record("Count how many words there are in the list given in the context and answer with a number .",
                      f"There are {NUMBERS[len(words)]} words in the list given in the context , the answer is "
                      f"{NUMBERS[len(words)]} .", ctx, "classification")
    if family == "contains":
        probe = rng.choice(words) if rng.random() < 0.5 else rng.choice(ITEMS)
        if probe in words:
            resp = f"Yes , the word {probe} does appear in the list that is given in the context ."
        else:
            resp = f"No , the word {probe} does not appear in the list that is given in the context ."
        return Record(f"Does the word {probe} appear in the list given in the context ? Answer yes or no please .",
                      resp, ctx, "classification")
    if family == "reverse":
        return Record("Write all the words of the list given in the context again but in reverse order please .",
                      "Here are the words of the list in reverse order : " + " ".join(reversed(words)) + " .",
                      ctx, "generation")
    if family == "fact":
        animal = rng.choice(ANIMALS)
        colour, place = facts[animal]
        return Record(f"Tell me what colour the {animal} is in the story world and where the {animal} lives .",
                      f"In the story world the {animal} is {colour} and the {animal} lives in the {place} .",
                      "", "open_qa")
    if family == "repeat":
        words = [rng.choice(ITEMS) for _ in range(rng.randint(12, 40))]
        return Record("Write every word of the list given in the context two times in a row , keeping the order .",
                      "Here is every word written twice : " + " ".join(w + " " + w for w in words) + " .",
                      " ".join(words), "generation")
    raise ValueError(f"unknown family {family!r}")


def make_task(n_train: int = 2000, n_valid: int = 100, n_test: int = 300, *, seed: int = 0) -> dict[str, list[Record]]:
    """Train / valid / test records (disjoint by construction of distinct RNG streams; test prompts that
    coincide with a training prompt are regenerated so the test measures generalisation, except ``fact``,
    whose prompts are a fixed set by design)."""
    facts = _facts(seed)
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[Record]] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        recs = []
        while len(recs) < n:
            fam = rng.choices(FAMILIES, weights=_WEIGHTS)[0]
            rec = _record(fam, rng, facts)
            key = (rec.instruction, rec.context)
            if split != "train" and fam != "fact" and key in seen:
                continue
            if split == "train":
                seen.add(key)
            recs.append(rec)
        out[split] = recs
    return out


def make_pretraining_corpus(n: int, *, seed: int = 0) -> list[str]:
    """D_p of the embedded task: plain text about the same world (no instruction template) — the analogue of
    the paper's OpenWebText for the λ·L_PT term. Each document states facts of the story world and
    describes a random list (its first and last word, its length)."""
    facts = _facts(seed)
    rng = random.Random(20_000 + seed)
    docs = []
    for _ in range(n):
        animal = rng.choice(ANIMALS)
        colour, place = facts[animal]
        words = [rng.choice(ITEMS) for _ in range(rng.randint(3, 8))]
        docs.append(f"In the story world the {animal} is {colour} and the {animal} lives in the {place} . "
                    f"The list {' '.join(words)} has {NUMBERS[len(words)]} words , it starts with {words[0]} "
                    f"and ends with {words[-1]} .")
    return docs


def write_jsonl(records: list[Record], path: str | Path) -> None:
    """Dolly-schema JSON lines (instruction, context, response, category)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"instruction": r.instruction, "context": r.context, "response": r.response,
                                "category": r.category}) + "\n")
