"""The large presets proven by simulation: one short-lived world of 8 gloo processes at TP=8 builds the
OPT-13B teacher and OPT-1.3B student shards and the Llama-3-8B teacher and Llama-3.2-1B student shards on
the meta device, checks every converted tensor's name and per-rank shape against the model's own, and
measures each rank's bytes; the README's memory plans are exactly what this run renders."""

from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
pytest.importorskip("transformers", reason="transformers is not installed")

README = Path(__file__).resolve().parents[2] / "integrations" / "megatron" / "README.md"
# Hugging Face parameter counts of the published checkpoints (tied embeddings counted once)
PUBLISHED = {"OPT-13B": 12_853_473_280, "OPT-1.3B": 1_315_758_080, "Llama-3-8B": 8_030_261_248,
             "Llama-3.2-1B": 1_235_814_400}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    from dpkd.integrations.megatron import memory_plan

    return memory_plan.simulate(tmp_path_factory.mktemp("plan") / "plan.json", tp=8)


def test_shards_add_up_to_the_full_models(plans):
    from dpkd.integrations.megatron.gpt_common import padded_vocab_size
    from dpkd.integrations.megatron.memory_plan import FULL_SIZE, VOCAB_MULTIPLE

    for ranks in plans.values():
        assert [r["rank"] for r in ranks] == list(range(8)) and all(r["tp"] == 8 for r in ranks)
        for who in ("teacher", "student"):
            name = ranks[0][who]
            cfg, facts = FULL_SIZE[name], [r[f"{who}_facts"] for r in ranks]
            assert all(f["hf_parameters"] == PUBLISHED[name] for f in facts)
            assert len({f["tensors"] for f in facts}) == 1 and len({f["parameters"] for f in facts}) == 1
            replicated = facts[0]["parameters"] - facts[0]["sharded_parameters"]
            total = sum(f["sharded_parameters"] for f in facts) + replicated
            h, vocab = cfg["hidden_size"], cfg["vocab_size"]
            embeddings = 1 if cfg.get("tie_word_embeddings", cfg["model_type"] == "opt") else 2
            padding = (padded_vocab_size(vocab, 8, VOCAB_MULTIPLE) - vocab) * h * embeddings
            offset_rows = 2 * h if cfg["model_type"] == "opt" else 0  # OPT's 2 unused position rows
            assert total == PUBLISHED[name] + padding - offset_rows, name


def test_bytes_follow_the_shards(plans):
    for ranks in plans.values():
        for r in ranks:
            assert r["student_grads_bytes"] == r["student_weights_bytes"] == r["adamw_bytes"] // 2
            assert r["student_weights_bytes"] == 2 * r["student_facts"]["parameters"]
            assert r["teacher_weights_bytes"] == 2 * r["teacher_facts"]["parameters"]
            assert min(r["model_activations_bytes"], r["loss_activations_bytes"], r["teacher_logits_bytes"]) > 0
            # the converted shard is the rank's parameters; the whole checkpoint is 8 of them and more
            assert r["teacher_facts"]["converted_shard_bytes"] == r["teacher_weights_bytes"]
            assert r["teacher_facts"]["hf_checkpoint_bytes"] > 7 * r["teacher_weights_bytes"]


def test_readme_memory_plans_are_generated(plans):
    from dpkd.integrations.megatron.memory_plan import readme_section, render_markdown

    assert readme_section(README.read_text()) == render_markdown(plans), (
        "integrations/megatron/README.md is stale: run `python scripts/megatron_memory_plan.py`")
