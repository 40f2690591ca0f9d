"""Rouge-L, exact match (SQuAD normalisation), length buckets — against hand-computed values."""

import pytest
from dpkd.integrations.transformers.eval import (
    exact_match,
    length_bucket,
    normalize_answer,
    results_markdown,
    rouge_l,
    score_predictions,
)


def test_normalize_answer_squad():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"


def test_exact_match_max_over_references():
    assert exact_match("the answer is 42.", ["Answer is 42", "no"]) == 100.0
    assert exact_match("answer 41", ["answer 42", "no"]) == 0.0


def test_rouge_l_closed_form():
    # LCS("the cat sat on the mat", "the cat on mat") = 4: P = 4/4, R = 4/6, F = 2PR/(P+R) = 0.8
    assert rouge_l("the cat on mat", ["the cat sat on the mat"]) == pytest.approx(80.0)
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)  # Porter stemmer
    assert rouge_l("x y", ["z", "x y"]) == pytest.approx(100.0)  # max over references


def test_buckets_boundaries():
    assert length_bucket(" ".join(["w"] * 30)) == "0-30"
    assert length_bucket(" ".join(["w"] * 31)) == "30-70"
    assert length_bucket(" ".join(["w"] * 70)) == "30-70"
    assert length_bucket(" ".join(["w"] * 71)) == ">70"


def test_score_predictions_overall_and_buckets():
    long_ref = " ".join(["w"] * 40)
    res = score_predictions(["a b", "zz", long_ref], [["a b"], ["c d"], [long_ref]])
    assert res["overall"]["n"] == 3
    assert res["overall"]["exact_match"] == pytest.approx(200 / 3)
    assert res["buckets"]["0-30"] == {"n": 2, "rougeL": pytest.approx(50.0), "exact_match": pytest.approx(50.0)}
    assert res["buckets"]["30-70"]["rougeL"] == pytest.approx(100.0)
    assert res["buckets"][">70"]["n"] == 0
    md = results_markdown({"m": res})
    assert md.splitlines()[2].startswith("| m | 66.67 | 66.67 |")
