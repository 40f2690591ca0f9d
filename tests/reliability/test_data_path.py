"""The data path with messy files: bytes that are not UTF-8, and records longer than the models' positions."""

import json

import pytest

pytest.importorskip("transformers")

from dpkd.integrations.transformers.data import DataError, load_records  # noqa: E402


def _row(instruction, response, context=""):
    return json.dumps({"instruction": instruction, "context": context, "response": response},
                      ensure_ascii=False) + "\n"


def test_a_line_that_is_not_utf8_is_named_by_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(("\ufeff" + _row("say hi", "hi")).encode("utf-8")  # a BOM on line 1 is fine
                     + _row("café", "ok").encode("latin-1") + _row("x", "y").encode())
    with pytest.raises(DataError) as e:
        load_records(path)
    assert str(e.value) == f"{path}:2: not UTF-8 (byte 0xe9 at column 21); JSONL files must be UTF-8"
    path.write_bytes(("\ufeff" + _row("say hi", "hi")).encode("utf-8"))
    assert load_records(path)[0].instruction == "say hi"


def test_records_longer_than_the_models_positions_are_filtered_with_the_count(tmp_path):
    """Prompt ≤ 256 and total ≤ 512 tokens pass the paper's filter; a GPT-2-config student has 256 positions,
    so 257–512-token records used to reach its position embedding (IndexError)."""
    import torch
    from dpkd.integrations.transformers.experiment import Experiment
    from dpkd.integrations.transformers.job import JobConfig
    from dpkd.integrations.transformers.models import build_word_tokenizer, tiny_causal_lm

    words = " ".join(f"w{i}" for i in range(12))
    lengths = [20, 150, 300, 450, 12]  # response words: 2 of 5 records overflow 256 positions with any prompt
    train = tmp_path / "train.jsonl"
    train.write_text("".join(_row(f"please answer this question now {words}", " ".join(["w1"] * n)) for n in lengths))
    test = tmp_path / "test.jsonl"
    test.write_text(_row("a short question", "w2 w3") + _row("long", " ".join(["w3"] * 400)))
    tok = build_word_tokenizer([words, "please answer this question now a short long", "w1 w2 w3"])
    teacher = tmp_path / "teacher"
    tiny_causal_lm("gpt2", len(tok), d_model=16, n_layers=1, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id).save_pretrained(teacher)
    tok.save_pretrained(teacher)

    exp = Experiment(JobConfig(max_new_tokens=16, n_probe=1), tmp_path / "results", tmp_path / "cache", quiet=True,
                     show_progress=False)
    exp.load_data(str(train), str(test))
    exp.load_teacher(str(teacher))
    assert exp.train_report.dropped == {"total_over_256_tokens": 2} and exp.train_report.kept == 3
    assert exp.test_report.dropped == {"total_over_256_tokens": 1}
    student = tiny_causal_lm("gpt2", len(tok), d_model=16, n_layers=1)  # the job's default student: 256 positions
    for ex in exp.train_ex + exp.test_ex:
        ids = torch.tensor([ex.prompt_ids + ex.response_ids])
        assert ids.shape[1] <= 256 and len(ex.prompt_ids) + 16 <= 256  # room to generate 16 tokens
        student(input_ids=ids)
    with pytest.raises(ValueError, match="--max-new-tokens 300: leaves no room for a prompt in the models' 256"):
        Experiment(JobConfig(max_new_tokens=300), tmp_path / "r2", tmp_path / "cache", quiet=True,
                   show_progress=False)._length_limits([256])
