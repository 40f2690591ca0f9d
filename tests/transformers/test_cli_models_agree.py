"""`dpkd distill --teacher T --student S` refuses, before loading any weights, a student whose vocabulary or
tokenizer is not the teacher's (was: a student with the teacher's vocabulary size but another tokenizer trained
and exited 0)."""

import pytest
from dpkd.integrations.cli import main
from dpkd.integrations.transformers.models import build_word_tokenizer
from transformers import GPT2Config


def _folder(path, words, *, vocab=None, tokenizer=True):
    tok = build_word_tokenizer([" ".join(words)])
    GPT2Config(vocab_size=vocab or len(tok), n_embd=8, n_layer=1, n_head=1).save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path


def _distill(tmp_path, teacher, student, *extra):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--preset", "ci", "--teacher", str(teacher), "--student", str(student), "--results-dir",
              str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"), *extra])
    assert not (tmp_path / "res").exists()
    return str(e.value)


def test_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    teacher = _folder(tmp_path / "t", ["alpha", "beta", "gamma"])
    student = _folder(tmp_path / "s", ["delta", "epsilon", "zeta"])  # 3 other words: the same vocabulary size
    msg = _distill(tmp_path, teacher, student)
    assert f"--student {student} has another tokenizer than --teacher {teacher}" in msg


def test_another_vocabulary_size_is_refused(tmp_path):
    teacher = _folder(tmp_path / "t", ["alpha", "beta", "gamma"])
    student = _folder(tmp_path / "s", ["alpha", "beta", "gamma"], vocab=64, tokenizer=False)
    msg = _distill(tmp_path, teacher, student)
    assert f"--student {student}: vocabulary of 64 tokens, --teacher {teacher}: 6" in msg


def test_a_matching_student_passes_the_check(tmp_path):
    teacher = _folder(tmp_path / "t", ["alpha", "beta", "gamma"])
    student = _folder(tmp_path / "s", ["alpha", "beta", "gamma"])
    # refused only by the next check, for what is really missing: the data file
    msg = _distill(tmp_path, teacher, student, "--train-data", str(tmp_path / "no.jsonl"), "--test-data",
                   str(tmp_path / "no.jsonl"))
    assert f"--train-data {tmp_path / 'no.jsonl'}: no such file" in msg
