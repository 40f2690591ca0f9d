"""`dpkd distill` / `dpkd generate` refuse bad paths before anything is loaded, trained or written, naming the
flag (was: "Repo id must be in the form ..." for a missing --teacher, a 1-token tokenizer for a folder without
tokenizer files, an unwritable --out only after generating)."""

import json

import pytest
from dpkd.integrations.cli import main


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "teacher" / "tokenizer.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "data.jsonl").write_text("")
    return tmp_path


_DISTILL = [
    (["--teacher", "{t}/missing"], "--teacher {t}/missing: no such folder"),
    (["--teacher", "{t}/no_config"], "--teacher {t}/no_config: no config.json"),
    (["--teacher", "{t}/no_tokenizer"], "--teacher {t}/no_tokenizer: no tokenizer files"),
    (["--student", "{t}/missing"], "--student {t}/missing: no such folder"),
    (["--train-data", "{t}/data.jsonl"], "--train-data and --test-data go together"),
    (["--train-data", "{t}/nope.jsonl", "--test-data", "{t}/data.jsonl"], "--train-data {t}/nope.jsonl: no such file"),
    (["--train-data", "{t}/data.jsonl", "--test-data", "{t}/nope.jsonl"], "--test-data {t}/nope.jsonl: no such file"),
    (["--results-dir", "{t}/a_file"], "--results-dir {t}/a_file: is a file"),
    (["--results-dir", "{t}/a_file/sub"], "--results-dir {t}/a_file/sub: cannot write there"),
    (["--cache-dir", "{t}/a_file/sub"], "--cache-dir {t}/a_file/sub: cannot write there"),
]


@pytest.mark.parametrize(("flags", "words"), _DISTILL)
def test_distill_refuses_bad_paths_up_front(folders, flags, words):
    base = {"--results-dir": str(folders / "res"), "--cache-dir": str(folders / "cache")}
    given = [f.format(t=folders) for f in flags]
    argv = ["distill", "--preset", "ci", *given]
    for k, v in base.items():
        if k not in given:
            argv += [k, v]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert words.format(t=folders) in str(e.value)
    assert not (folders / "res").exists() and not (folders / "cache").exists()  # nothing written


@pytest.mark.parametrize(("flags", "words"), [
    (["--teacher", "{t}/missing", "--data", "{t}/data.jsonl", "--out", "{t}/o.jsonl"], "--teacher {t}/missing"),
    (["--teacher", "{t}/teacher", "--data", "{t}/nope.jsonl", "--out", "{t}/o.jsonl"],
     "--data {t}/nope.jsonl: no such file"),
    (["--teacher", "{t}/teacher", "--data", "{t}/data.jsonl", "--out", "{t}/a_file/o.jsonl"],
     "--out {t}/a_file/o.jsonl: cannot write there"),
    (["--teacher", "{t}/teacher", "--data", "{t}/data.jsonl", "--out", "{t}/teacher"],
     "--out {t}/teacher: is a folder"),
])
def test_generate_refuses_bad_paths_before_loading_the_teacher(folders, flags, words):
    # the teacher folder holds no weights: reaching the model load would fail differently
    with pytest.raises(SystemExit) as e:
        main(["generate", *(f.format(t=folders) for f in flags)])
    assert words.format(t=folders) in str(e.value)
