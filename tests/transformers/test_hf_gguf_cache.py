"""The GGUF → safetensors cache on real, tiny GGUF files written here (llama.cpp's layout, quantised MLP and
query weights): the conversion recovers the original model, a changed file gets its own folder, damaged
folders are rebuilt, a conversion killed with SIGKILL leaves nothing that counts, a concurrent conversion's
finished folder wins."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dpkd.integrations.transformers import pretrained
from dpkd.integrations.transformers.models import tiny_causal_lm
from dpkd.integrations.transformers.pretrained import (
    MANIFEST,
    chat_prompt_ids,
    folder_is_complete,
    gguf_fingerprint,
    load_pretrained,
    pretrained_folder,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_gguf import CHAT_TEMPLATE, expected_state_dict, vocabulary, write_tiny_llama_gguf  # noqa: E402


def _tiny_llama(seed=0):
    return tiny_causal_lm("llama", len(vocabulary()), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          pad_token_id=2, eos_token_id=2, seed=seed).eval()


@pytest.fixture
def tiny_gguf(tmp_path):
    """(original model, path of its GGUF file)."""
    model = _tiny_llama()
    return model, write_tiny_llama_gguf(model, tmp_path / "Tiny-Llama.Q8_0.gguf")


def _reference(model):
    """The original architecture holding the weights the file stores (quantised ones round-tripped)."""
    ref = _tiny_llama()
    ref.load_state_dict(expected_state_dict(model))
    return ref


def test_conversion_recovers_the_original_model(tiny_gguf, tmp_path):
    """HF model → GGUF (permuted q/k, Q8_0 / Q4_1 blocks) → dpkd's folder equals the HF model, exactly."""
    model, gguf = tiny_gguf
    folder = pretrained_folder(gguf, tmp_path / "cache")
    assert folder == tmp_path / "cache" / "pretrained" / f"tiny-llama.q8_0-{gguf_fingerprint(gguf)[:16]}"
    loaded, tok = load_pretrained(folder)
    want = expected_state_dict(model)
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.dtype == torch.float32
    x = torch.randint(0, len(vocabulary()), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, _reference(model)(x).logits, rtol=0, atol=0)
    assert tok.chat_template == CHAT_TEMPLATE and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "the sheep are in the meadow"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok(" the")["input_ids"]) == ["Ġthe"]  # the file's merges are applied
    ids = chat_prompt_ids(tok, "hi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.model_max_length == loaded.config.max_position_embeddings


def test_changed_file_gets_its_own_folder(tiny_gguf, tmp_path):
    model, gguf = tiny_gguf
    cache = tmp_path / "cache"
    first = pretrained_folder(gguf, cache)
    before = (first / "model.safetensors").stat().st_mtime_ns
    other_model = _tiny_llama(seed=1)
    write_tiny_llama_gguf(other_model, gguf)  # same path, new content
    second = pretrained_folder(gguf, cache)
    assert second != first and folder_is_complete(first) and folder_is_complete(second)
    assert (first / "model.safetensors").stat().st_mtime_ns == before
    loaded, _ = load_pretrained(second)
    want = expected_state_dict(other_model)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("damage", ["truncated weights", "missing manifest", "missing tokenizer",
                                    "manifest of another file", "unparsable manifest"])
def test_a_damaged_folder_is_rebuilt(tiny_gguf, tmp_path, damage):
    model, gguf = tiny_gguf
    folder = pretrained_folder(gguf, tmp_path / "cache")
    if damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing manifest":
        (folder / MANIFEST).unlink()
    elif damage == "missing tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "manifest of another file":
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    else:
        (folder / MANIFEST).write_text("{")
    assert not folder_is_complete(folder, gguf_fingerprint(gguf))
    assert pretrained_folder(gguf, tmp_path / "cache") == folder
    assert folder_is_complete(folder, gguf_fingerprint(gguf))
    loaded, _ = load_pretrained(folder)
    want = expected_state_dict(model)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # nothing left beside it


_KILLED_CONVERSION = """
import os, signal, sys
from dpkd.integrations.transformers import pretrained

def killed(tmp, final, fingerprint):  # every file written (manifest included), not yet renamed
    assert pretrained.folder_is_complete(tmp, fingerprint)
    os.kill(os.getpid(), signal.SIGKILL)

pretrained._publish = killed
pretrained.pretrained_folder(sys.argv[1], sys.argv[2])
"""

def test_a_conversion_killed_before_its_rename_leaves_nothing_that_counts(tiny_gguf, tmp_path):
    _, gguf = tiny_gguf
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _KILLED_CONVERSION, str(gguf), str(cache)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    leftovers = list((cache / "pretrained").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")  # only the temporary folder
    final = cache / "pretrained" / leftovers[0].name.split(".tmp-")[0][1:]
    assert not final.exists()
    assert pretrained_folder(gguf, cache) == final and folder_is_complete(final)
    assert [p.name for p in (cache / "pretrained").iterdir()] == [final.name]  # the dead one's folder is gone


def test_a_folder_another_process_finished_first_wins(tiny_gguf, tmp_path):
    """Two conversions of one file at once: the later rename finds the earlier one's complete folder, keeps
    it and drops its own (what ``_publish`` does when ``final`` appeared meanwhile)."""
    _, gguf = tiny_gguf
    final = pretrained_folder(gguf, tmp_path / "cache")
    first = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    mine = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    pretrained._convert(gguf, gguf_fingerprint(gguf), mine)
    pretrained._publish(mine, final, gguf_fingerprint(gguf))
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == first and folder_is_complete(final)


def test_bad_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="`gguf_path`"):
        pretrained_folder(tmp_path / "absent.gguf", tmp_path)
