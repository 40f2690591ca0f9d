"""A damaged cache of the job — the teacher log-prob file, the pre-generated teacher outputs, the cached
trained teacher folder — is named (file, and line where there are lines) and rebuilt, never half-read: the
rebuilt values equal the ones first written."""

import copy
from types import SimpleNamespace

import pytest
import torch
from dpkd.integrations.transformers import job
from dpkd.integrations.transformers.experiment import Experiment
from dpkd.integrations.transformers.teacher_cache import TeacherLogpCache, example_id


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def examples(toy):
    tok, train, _ = toy
    exs = [copy.copy(ex) for ex in train[:12]]  # the session's examples stay as they are
    for n, ex in enumerate(exs):
        ex.teacher_ids = ex.response_ids[: 3 + n % 5]
    return exs


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte])
def test_a_damaged_logp_cache_is_named_and_rescored(tmp_path, toy, tiny, examples, damage, capsys):
    tok = toy[0]
    teacher = tiny("gpt2", tok, 1).eval()
    first = TeacherLogpCache(tmp_path, teacher, tok, top_k=4).entries(examples)
    damage(first_path := next(tmp_path.glob("*.safetensors")))
    cache = TeacherLogpCache(tmp_path, teacher, tok, top_k=4)
    assert cache.damaged and f"TeacherLogpCache: {first_path} " in capsys.readouterr().err
    again = cache.entries(examples)
    assert cache.scored == len({example_id(e.prompt_ids, e.teacher_ids) for e in examples})  # scored again
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.token_logps, b.token_logps) and torch.equal(a.topk_ids, b.topk_ids)
    assert not TeacherLogpCache(tmp_path, teacher, tok, top_k=4).damaged  # rewritten whole


def test_damaged_teacher_outputs_are_named_by_line_and_generated_again(tmp_path, toy, tiny, examples, capsys):
    tok = toy[0]
    me = SimpleNamespace(cfg=job.JobConfig(max_new_tokens=8), cache_dir=tmp_path, teacher_key="k",
                         teacher=tiny("gpt2", tok, 1).eval(), tok=tok)
    first = Experiment._teacher_responses(me, examples, tag="y_t", do_sample=True)
    (path,) = tmp_path.glob("teacher-y_t-*.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3][:5]] + lines[4:]) + "\n")
    rows, problem = job._read_lines(path, len(examples))
    assert rows is None and problem.startswith(f"{path} is damaged at line 4 (")
    assert Experiment._teacher_responses(me, examples, tag="y_t", do_sample=True) == first
    assert f"teacher outputs: {path} is damaged at line 4" in capsys.readouterr().out
    path.write_text("\n".join(lines[:-2]) + "\n")  # cut at a line boundary: rows missing
    assert job._read_lines(path, len(examples)) == (None, f"{path} is damaged ({len(examples) - 2} rows, "
                                                         f"{len(examples)} expected)")
    assert Experiment._teacher_responses(me, examples, tag="y_t", do_sample=True) == first
    assert job._read_lines(path, len(examples))[1] is None


def test_a_damaged_cached_folder_is_named(tmp_path, toy, tiny):
    tok = toy[0]
    model = tiny("gpt2", tok, 1)
    folder = tmp_path / "teacher-abc"
    job._atomic_dir(folder, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    assert job._cache_problem(folder) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    _truncate(folder / "model.safetensors")
    assert job._cache_problem(folder).startswith(f"{folder / 'model.safetensors'} is truncated")
    assert job._cache_problem(tmp_path / "absent") == f"{tmp_path / 'absent' / job.CACHE_MANIFEST} is missing"
