"""The job's caches know what produced them: teacher outputs y_t (and their log-probs) of a `--teacher` folder
are keyed by a fingerprint of its files, so another teacher in the same results and cache folders is never
served the first one's outputs."""

from dataclasses import replace

import pytest
from dpkd.integrations.identity import source_fingerprint
from dpkd.integrations.transformers.data import format_prompt
from dpkd.integrations.transformers.experiment import Experiment
from dpkd.integrations.transformers.job import PRESETS
from dpkd.integrations.transformers.models import build_word_tokenizer, tiny_causal_lm
from dpkd.integrations.transformers.toy_task import make_task

CFG = replace(PRESETS["ci"], n_train=12, n_valid=2, n_test=2, n_pretrain=4, max_new_tokens=6)


def _teacher_folder(path, seed):
    task = make_task(CFG.n_train, CFG.n_valid, CFG.n_test, seed=0)
    tok = build_word_tokenizer([format_prompt(r) + " " + r.response for s in task.values() for r in s])
    model = tiny_causal_lm("gpt2", len(tok), d_model=16, n_layers=1, n_heads=2, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _y_t(tmp_path, teacher):
    exp = Experiment(CFG, tmp_path / "res", tmp_path / "cache", quiet=True, show_progress=False)
    exp.load_data(None, None)
    exp.load_teacher(str(teacher))
    exp.teacher_outputs()
    return [ex.teacher_ids for ex in exp.train_ex], [ex.teacher_logp for ex in exp.train_ex], exp.teacher_key


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two teacher folders: the same config and tokenizer, other weights."""
    root = tmp_path_factory.mktemp("teachers")
    return _teacher_folder(root / "t1", 0), _teacher_folder(root / "t2", 1)


def test_another_teacher_in_the_same_folders_gets_its_own_outputs(tmp_path, teachers):
    ids_a, c_a, key_a = _y_t(tmp_path, teachers[0])
    ids_b, c_b, key_b = _y_t(tmp_path, teachers[1])
    assert key_a != key_b and source_fingerprint(teachers[0]) != source_fingerprint(teachers[1])
    assert ids_a != ids_b and c_a != c_b  # sampled from, and scored by, the second teacher
    again, c_again, _ = _y_t(tmp_path, teachers[0])  # the first teacher's cache is still there and reused
    assert again == ids_a and c_again == c_a
    assert len(list((tmp_path / "cache").glob("teacher-y_t-*.jsonl"))) == 2
