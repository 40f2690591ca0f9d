"""Dolly data: parsing, aliases, errors with file and line, the paper's template and filters."""

import json

import pytest
from dpkd.integrations.transformers.data import (
    PROMPT_NO_CONTEXT,
    DataError,
    Record,
    filter_records,
    format_prompt,
    load_records,
    tokenize_records,
)

LONG_I = "Please explain in a few clear sentences why the sky looks blue during the day"  # 16 words
LONG_R = "Sunlight is scattered by the molecules of the air and blue light is scattered the most"  # 16 words


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_fields_and_aliases(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        {"instruction": LONG_I, "context": "ctx", "response": LONG_R, "category": "open_qa"},
        {"instruction": LONG_I, "input": "", "output": LONG_R},  # MiniLLM spelling
    ])
    recs = load_records(f)
    assert recs[0] == Record(LONG_I, LONG_R, "ctx", "open_qa")
    assert recs[1] == Record(LONG_I, LONG_R, "", "")


def test_parquet_through_datasets(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"instruction": LONG_I, "context": "", "response": LONG_R, "category": "x"}]
                               ).to_parquet(str(path))
    assert load_records(path) == [Record(LONG_I, LONG_R, "", "x")]


@pytest.mark.parametrize(("line", "message"), [
    ('{"instruction": "a", ', "invalid JSON"),
    ('{"context": "c", "response": "r"}', "missing required field `instruction`"),
    ('{"instruction": "a", "context": "c"}', "missing required field `response` or `output`"),
    ('{"instruction": 3, "response": "r"}', "field `instruction` must be a string"),
    ('["not", "an", "object"]', "a record must be a JSON object"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"instruction": LONG_I, "response": LONG_R})
    f = _write(tmp_path / "bad.jsonl", [good, "", good, line])
    with pytest.raises(DataError) as err:
        load_records(f)
    assert f"{f}:4:" in str(err.value)
    assert message in str(err.value)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "x.csv")


def test_template_is_minillm_dolly():
    with_ctx = format_prompt(Record("Do it", "r", "the input"))
    assert with_ctx.endswith("### Instruction:\nDo it\n\n### Input:\nthe input\n\n### Response:\n")
    assert with_ctx.startswith("Below is an instruction that describes a task, paired with an input")
    assert format_prompt(Record("Do it", "r", "  ")) == PROMPT_NO_CONTEXT.format(instruction="Do it")


def test_filters_count_every_drop():
    ten = " ".join(["w"] * 10)
    eleven = " ".join(["w"] * 11)
    recs = [Record(eleven, eleven), Record(ten, eleven), Record(eleven, ten), Record(eleven, eleven, "x " * 300)]
    kept, report = filter_records(recs, max_prompt_tokens=256, max_length=512, count_tokens=lambda t: len(t.split()))
    assert kept == [recs[0]]
    assert report.total == 4 and report.kept == 1
    assert dict(report.dropped) == {"instruction_under_11_words": 1, "response_under_11_words": 1,
                                    "prompt_over_256_tokens": 1}
    # total length: prompt + response + EOS > max_length
    kept, report = filter_records([recs[0]], max_length=30, count_tokens=lambda t: len(t.split()))
    assert kept == [] and dict(report.dropped) == {"total_over_30_tokens": 1}


def test_tokenize_appends_eos_and_teacher_output():
    from dpkd.integrations.transformers.models import build_word_tokenizer

    rec = Record(LONG_I, LONG_R, teacher_response="blue light")
    tok = build_word_tokenizer([format_prompt(rec), LONG_R, "blue light"])
    (ex,) = tokenize_records([rec], tok)
    assert ex.response_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.response_ids[:-1]) == LONG_R
    assert ex.teacher_ids == [*tok("blue light", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    spaced = format_prompt(rec)
    for mark in ",.:#":
        spaced = spaced.replace(mark, f" {mark} ")
    assert "".join(tok.decode(ex.prompt_ids).split()) == "".join(spaced.split())
