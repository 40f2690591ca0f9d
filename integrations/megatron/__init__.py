"""dpkd.integrations.megatron — DPKD under Megatron-Core tensor parallelism (``README.md`` beside this file).

* Vocab-parallel primitives (this module): each is ``dpkd.backends.torch``'s function of the same name with
  the prefix ``vocab_parallel_``; the logits (or lm_head weight) argument is this rank's vocabulary shard,
  labels and masks are global, the result is replicated and exact under TP in values and gradients.
  Keyword-only ``group=None`` (Megatron-Core's tensor-model-parallel group) and ``vocab_size=None`` (the
  true vocabulary when the sharded one is padded). The sequence-level family (``dpkd_loss``, ``ipo_loss``,
  …) acts on summed log-probs: use ``vocab_parallel_sequence_logps`` and then ``dpkd.backends.torch``.
* ``opt_model`` / ``llama_model`` — GPTModel for an OPT / a Llama-family configuration (``gpt_common``: what
  both share); ``opt_convert`` / ``llama_convert`` — Hugging Face state dict ↔ GPTModel, any TP size.
* ``models`` — where a model comes from (preset, Hugging Face folder read lazily by ``hf_weights``,
  distributed checkpoint) and building it; ``convert`` — the HF ↔ distributed-checkpoint command.
* ``dist_checkpoint`` — Megatron-Core distributed checkpoints without arbitrary unpickling; ``train_state``
  — the driver's training state in that format.
* ``distill`` — the torchrun-launched distillation driver; ``memory_plan`` — the meta-device simulation of
  the large presets that generates the README's memory plans.

Importing this module does not import megatron.core (only the default ``group`` resolution does).
"""

from .vocab_parallel import (
    vocab_parallel_argmax,
    vocab_parallel_log_softmax,
    vocab_parallel_logsumexp,
    vocab_parallel_sample,
    vocab_parallel_sequence_logps,
    vocab_parallel_token_logps,
)
from .vocab_parallel_fused import vocab_parallel_linear_token_logps
from .vocab_parallel_losses import (
    vocab_parallel_cross_entropy,
    vocab_parallel_dpkd_token_loss,
    vocab_parallel_forward_kl,
    vocab_parallel_generalized_jsd,
    vocab_parallel_reverse_kl,
)

__all__ = [
    "vocab_parallel_logsumexp",
    "vocab_parallel_log_softmax",
    "vocab_parallel_token_logps",
    "vocab_parallel_sequence_logps",
    "vocab_parallel_argmax",
    "vocab_parallel_sample",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_forward_kl",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_generalized_jsd",
    "vocab_parallel_dpkd_token_loss",
    "vocab_parallel_linear_token_logps",
]
