"""The Llama converter on real weights: SmolLM2-135M-Instruct (9 query heads in 3 groups; TP=2 pads to 4
groups) in the 2-process gloo world.

* examples/megatron_llama.sh runs end to end (one step per mode); the distributed checkpoint its converter
  CLI wrote at TP=2 is the one the tests below read.
* Logits of a chat prompt and answer equal transformers' own at TP=1 and TP=2, loaded from the Hugging Face
  folder and from that distributed checkpoint (also read at TP=1: a TP change); the vocab-parallel token
  log-probs equal ``dpkd.backends.torch.token_logps`` on transformers' logits.
* One driver step with SmolLM2 as teacher (from that checkpoint) and a small Llama student gives the same
  losses and gradient norm at TP=2 as at TP=1 × DP=2, in token and in sequence mode.
"""

import json
import math

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
pytest.importorskip("transformers", reason="transformers is not installed")

MESSAGE = "Give three tips for staying healthy."
ANSWER = "Eat plenty of vegetables, sleep seven to nine hours a night, and walk for half an hour every day."


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """(token ids [1, S], transformers' float32 logits [1, S, V]) of the chat prompt followed by the answer."""
    from dpkd.integrations.transformers.pretrained import chat_prompt_ids, load_pretrained

    model, tok = load_pretrained(smollm2_dir)
    ids = chat_prompt_ids(tok, MESSAGE) + tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return ids, logits


@pytest.fixture(scope="module")
def llama_example(smollm2_dir, tmp_path_factory):
    """examples/megatron_llama.sh run once, one step per mode (its default runs 4 + 2 steps): it converts
    SmolLM2 into a distributed checkpoint at TP=2 with the converter's CLI, cuts the student from it and trains
    it in both modes. Returns (its output folder, the finished process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("megatron_llama")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DPKD_CACHE=str(smollm2_dir.parents[1]))
    result = subprocess.run(["bash", str(root / "examples" / "megatron_llama.sh"), "--steps", "1"], env=env,
                            capture_output=True, text=True, timeout=600)
    return out, result


@pytest.fixture(scope="module")
def smollm2_ckpt(llama_example):
    """SmolLM2 as the example converted it: a distributed checkpoint written by 2 ranks at TP=2."""
    out, result = llama_example
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "teacher_megatron"


def body_logits(source, ids):
    """This rank's logits shard, the replicated token log-probs, the query groups and the bytes it read."""
    from dpkd.integrations.megatron import dist_checkpoint, models, vocab_parallel_token_logps
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    src = models.resolve(source)
    model = models.build(src, tp_size=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                         load_weights=src.kind == "hf").eval()
    strategy = dist_checkpoint.SafeTorchDistLoadStrategy()
    if src.kind == "megatron":
        models.load_model_weights(model, src.path, strategy)
    with torch.no_grad():
        shard = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        logps = vocab_parallel_token_logps(shard[:, :-1], ids[:, 1:], vocab_size=src.shape.vocab_size)
    return {"shard": shard, "logps": logps, "groups": model.config.num_query_groups, "bytes": strategy.bytes_read,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank()}


@pytest.mark.parametrize("tp,where", [(1, "hf"), (2, "hf"), (2, "megatron"), (1, "megatron")])
def test_logits_match_transformers(gloo_pool, smollm2_dir, smollm2_ckpt, reference, tp, where):
    from dpkd.backends.torch import token_logps

    ids, logits = reference
    vocab = logits.shape[-1]
    want_logps = token_logps(logits[:, :-1], ids[:, 1:])
    source = str(smollm2_dir if where == "hf" else smollm2_ckpt)
    results = gloo_pool.run(body_logits, source, ids, tp=tp)
    local = results[0]["shard"].shape[-1]
    padded = torch.cat([logits, logits.new_zeros(1, ids.shape[1], tp * local - vocab)], -1)
    assert [r["tp_rank"] for r in results] == ([0, 1] if tp == 2 else [0, 0])
    for r in results:
        # 3 groups: TP=2 pads to 4; a checkpoint converted at TP=2 keeps 4 at TP=1
        assert r["groups"] == (3 if where == "hf" and tp == 1 else 4)
        start = r["tp_rank"] * local
        real = min(local, vocab - start)  # columns past the true vocabulary are padding
        assert real > 0
        torch.testing.assert_close(r["shard"][..., :real], padded[..., start:start + real], rtol=0, atol=2e-4)
        torch.testing.assert_close(r["logps"], want_logps, rtol=0, atol=2e-5)
    if where == "megatron":
        total = sum(f.stat().st_size for f in smollm2_ckpt.glob("*.distcp"))
        read = [r["bytes"] for r in results]
        if tp == 2:  # each rank reads its own chunks (half the sharded bytes) plus the replicated norms
            assert all(0.45 * total < b < 0.55 * total for b in read), (read, total)
        else:  # TP=1 x DP=2: both ranks need everything
            assert all(0.99 * total < b <= total for b in read), (read, total)


def test_checkpoint_records_the_model(smollm2_ckpt, smollm2_dir):
    info = json.loads((smollm2_ckpt / "dpkd_model.json").read_text())
    assert info["query_groups"] == 4 and info["vocab_multiple"] == 128 and info["dtype"] == "float32"
    assert info["config"]["num_key_value_heads"] == 3 and info["config"]["tie_word_embeddings"] is True
    assert (smollm2_ckpt / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()


def body_run(argv):
    from dpkd.integrations.megatron import distill

    return distill.run(distill.parse_args(argv))


@pytest.mark.parametrize("mode,keys", [
    ("token", ["loss", "sft_loss", "distil_loss", "pt_lm_loss", "pt_kd_loss", "agreement", "grad_norm"]),
    ("sequence", ["loss", "distil_loss", "pt_lm_loss", "rewards/margins", "student_len", "grad_norm"]),
])
def test_driver_step_tp2_equals_tp1_dp2(gloo_pool, smollm2_ckpt, mode, keys):
    argv = ["--cpu", "--teacher", str(smollm2_ckpt), "--student", "tiny-llama-student", "--mode", mode,
            "--num-examples", "8", "--global-batch", "2", "--max-prompt", "64", "--max-length", "80",
            "--max-new-tokens", "4", "--steps", "2", "--lr", "1e-2", "--seed", "5"]
    tp2 = gloo_pool.run(body_run, argv + ["--tp", "2"], tp=2)
    tp1 = gloo_pool.run(body_run, argv + ["--tp", "1"], tp=1)
    assert [[h[k] for k in keys] for h in tp2[0]] == [[h[k] for k in keys] for h in tp2[1]]  # replicated
    for step, (a, b) in enumerate(zip(tp2[0], tp1[0], strict=True)):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), f"step {step + 1} {k}: {a[k]} vs {b[k]}"


def test_llama_example_script_completes(llama_example, smollm2_ckpt):
    """examples/megatron_llama.sh end to end: the teacher converted, the student cut, one step per mode."""
    out, result = llama_example
    assert "done:" in result.stdout and "teacher=llama:134.52M" in result.stdout
    assert json.loads((smollm2_ckpt / "dpkd_model.json").read_text())["query_groups"] == 4
    for mode in ("token", "sequence"):
        lines = [json.loads(line) for line in (out / f"{mode}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1] and all(map(math.isfinite, lines[0].values()))
        assert (out / mode / "latest").read_text() == "1"
        assert (out / mode / "step_0000001" / "dpkd_model.json").is_file()
