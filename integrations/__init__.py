"""dpkd.integrations — training-stack integrations: ``megatron`` (Megatron-Core tensor parallelism) and
``transformers`` (Hugging Face trainer on accelerate, generation, evaluation, the main job, the teacher log-prob
cache) and ``trl`` (DPKD as the loss of TRL's DistillationTrainer / DPOTrainer; needs the ``trl`` extra)."""
