"""The one mechanism behind every atomic write and damaged-file check (dpkd.integrations.durable_files): a
write that fails half way (a full disk, simulated with RLIMIT_FSIZE) leaves the old content and no
temporary; a folder published over an old one replaces it whole; a manifest tells every kind of damage
apart and names the file."""

import json

import pytest
from dpkd.integrations.durable_files import atomic_write_text, publish_folder, verify_manifest, write_manifest


def test_a_write_that_fills_the_disk_leaves_the_old_content(tmp_path, full_disk):
    path = tmp_path / "latest"
    atomic_write_text(path, "7")
    with full_disk(1000), pytest.raises(OSError, match="File too large"):
        atomic_write_text(path, "x" * 5000)
    assert path.read_text() == "7" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_publish_replaces_a_folder_whole(tmp_path):
    final, new = tmp_path / "cache", tmp_path / ".cache.tmp"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "a.txt").write_text(text)
    (final / "only-old.txt").write_text("old")
    assert publish_folder(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"] and (final / "a.txt").read_text() == "new"
    kept = tmp_path / ".other.tmp"
    kept.mkdir()
    assert not publish_folder(kept, final, keep=lambda f: (f / "a.txt").read_text() == "new") and kept.exists()


def _folder(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "engine").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (folder / "engine" / "shard.bin").write_bytes(b"\x01" * 100)
    write_manifest(folder, "manifest.json", step=3)
    return folder


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "weights.bin").write_bytes(b"\x00" * 10),
     "weights.bin is truncated or extended (10 bytes, 2048 written)"),
    (lambda f: (f / "weights.bin").write_bytes(bytes(range(256))[::-1] * 8), "weights.bin is damaged (its CRC-32"),
    (lambda f: (f / "engine" / "shard.bin").unlink(), "engine/shard.bin is missing"),
    (lambda f: (f / "manifest.json").write_text("{"), "manifest.json is garbled"),
    (lambda f: (f / "manifest.json").write_text('{"files": {"weights.bin": "big"}}'), "manifest.json is garbled"),
    (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
])
def test_a_manifest_names_every_kind_of_damage(tmp_path, damage, problem):
    folder = _folder(tmp_path)
    manifest, none = verify_manifest(folder, "manifest.json")
    assert none is None and manifest["step"] == 3 and sorted(manifest["files"]) == ["engine/shard.bin", "weights.bin"]
    damage(folder)
    manifest, found = verify_manifest(folder, "manifest.json")
    assert manifest is None and found.startswith(f"{folder}/{problem}")


def test_an_older_size_only_manifest_still_verifies(tmp_path):
    folder = _folder(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({"files": {k: v[0] for k, v in manifest["files"].items()}}))
    assert verify_manifest(folder, "manifest.json")[1] is None
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    assert "weights.bin is truncated" in verify_manifest(folder, "manifest.json")[1]
