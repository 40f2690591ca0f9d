"""Megatron-Core distributed checkpoints: a model saved at TP=2 loads exactly at TP=2 and at TP=1 (and with
Megatron-Core's own torch_dist loader), metadata that names any other Python global is refused before
anything runs, pickled objects are never written, a driver run saved at TP=2 resumes at TP=1 × DP=2 with
the same losses, and a trained student converts back to a Hugging Face folder transformers loads."""

import os
import pickle
import shutil

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

# 6 heads in 3 groups: TP=2 pads to 4 groups, so the TP=1 load reads a padded layout
CONFIG = dict(model_type="llama", vocab_size=51, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=3, intermediate_size=32, max_position_embeddings=64, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_theta=10000.0)


def _state(model):
    return {k: t.detach().clone() for k, t in model.state_dict().items() if not k.endswith("._extra_state")}


def body_save(directory):
    from dpkd.integrations.megatron import models
    from megatron.core import parallel_state

    torch.manual_seed(11)
    source = models.ModelSource("preset", CONFIG)
    model = models.build(source, tp_size=2, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                         vocab_multiple=4)
    with torch.no_grad():  # RMSNorm weights start at 1: make them distinct so a mix-up shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p))
    models.save_model(model, directory, CONFIG, vocab_multiple=4)
    return _state(model)


def body_load(directory, megatron_loader=False):
    from dpkd.integrations.megatron import dist_checkpoint, models
    from megatron.core import dist_checkpointing, parallel_state

    source = models.resolve(directory)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = models.build(source, tp_size=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                         vocab_multiple=4, load_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)  # anything the load misses stays 7
    if megatron_loader:  # Megatron-Core's own torch_dist strategy (plain pickle.load of the metadata)
        loaded = dist_checkpointing.load(dist_checkpoint.model_sharded_state_dict(model), directory)
        model.load_state_dict(loaded, strict=False)
    else:
        models.load_model_weights(model, directory)
    return _state(model)


def _hf(shards):
    from dpkd.integrations.megatron.llama_convert import megatron_to_hf
    from dpkd.integrations.megatron.llama_model import llama_shape

    return megatron_to_hf(shards, llama_shape(CONFIG))


@pytest.fixture(scope="module")
def saved(gloo_pool, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    return directory, gloo_pool.run(body_save, str(directory), tp=2)


def test_files_and_format(saved):
    directory, _ = saved
    names = sorted(p.name for p in directory.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt", "dpkd_model.json", "metadata.json"]
    assert (directory / "metadata.json").read_text().startswith('{"sharded_backend": "torch_dist"')


@pytest.mark.parametrize("tp,megatron_loader", [(2, False), (1, False), (2, True)])
def test_load_exact(gloo_pool, saved, tp, megatron_loader):
    directory, shards = saved
    loaded = gloo_pool.run(body_load, str(directory), megatron_loader, tp=tp)
    if tp == 2:
        for want, got in zip(shards, loaded, strict=True):
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    else:  # TP=1 x DP=2: both ranks hold the whole model, equal to the two TP=2 shards put together
        want = _hf(shards)
        for got in loaded:
            got = _hf([got])
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + _Exploit.marker,))


def test_metadata_with_foreign_globals_refused(saved, tmp_path):
    from dpkd.integrations.megatron.dist_checkpoint import UnsafeCheckpointError, read_dcp_metadata

    directory, _ = saved
    assert read_dcp_metadata(directory).state_dict_metadata  # the real metadata passes the allowlist
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    _Exploit.marker = str(tmp_path / "ran")
    (bad / ".metadata").write_bytes(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        read_dcp_metadata(bad)
    assert not (tmp_path / "ran").exists()


def body_load_bad(directory):
    from dpkd.integrations.megatron.dist_checkpoint import UnsafeCheckpointError

    try:
        body_load(directory)
    except UnsafeCheckpointError as e:
        return str(e)
    return None


def test_loading_a_tampered_checkpoint_fails_before_unpickling(gloo_pool, saved, tmp_path):
    directory, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    _Exploit.marker = str(tmp_path / "ran")
    (bad / ".metadata").write_bytes(pickle.dumps({"x": _Exploit()}))
    errors = gloo_pool.run(body_load_bad, str(bad), tp=2)
    assert all(e and "refusing to load checkpoint metadata" in e for e in errors), errors
    assert not (tmp_path / "ran").exists()


def test_sharded_objects_are_refused():
    from dpkd.integrations.megatron.dist_checkpoint import _sharded_tensors
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    with pytest.raises(TypeError, match="ShardedObject"):
        _sharded_tensors({"rng": ShardedObject("rng_state", {"a": 1}, (1,), (0,))})


# --------------------------------------------------------------------------------------------------
# the driver: save at TP=2, resume at TP=1 x DP=2; the trained student back to Hugging Face

COMMON = ["--cpu", "--teacher", "tiny-llama-teacher", "--student", "tiny-llama-student", "--mode", "token",
          "--num-examples", "16", "--global-batch", "4", "--max-prompt", "100", "--max-length", "120",
          "--lr", "1e-2", "--seed", "3", "--steps", "4", "--save-interval", "2"]


def body_run(argv):
    from dpkd.integrations.megatron import distill

    return distill.run(distill.parse_args(argv))


def body_to_hf(step_dir, out, ids):
    """Write the HF folder (rank 0) and return the Megatron student's full logits at TP=1."""
    from dpkd.integrations.megatron import convert, models

    convert.to_hf(step_dir, out)
    source = models.resolve(step_dir)
    model = models.build(source, tp_size=1, tp_rank=0, vocab_multiple=source.vocab_multiple).eval()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., : source.shape.vocab_size]


def test_resume_at_another_tp_and_back_to_hf(gloo_pool, tmp_path):
    keys = ["loss", "sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss", "grad_norm", "lr"]
    save = tmp_path / "run"
    full = gloo_pool.run(body_run, COMMON + ["--tp", "2", "--save-dir", str(save)], tp=2)[0]
    assert sorted(p.name for p in save.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    (save / "latest").write_text("2")
    resumed = gloo_pool.run(body_run, COMMON + ["--tp", "1", "--save-dir", str(save), "--resume"], tp=1)[0]
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(resumed, full[2:], strict=True):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=2e-5, abs=2e-6), f"step {a['step']} {k}: {a[k]} vs {b[k]}"

    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "student_hf"
    megatron_logits = gloo_pool.run(body_to_hf, str(save / "step_0000004"), str(out), ids, tp=1)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, megatron_logits, rtol=1e-5, atol=1e-5)
