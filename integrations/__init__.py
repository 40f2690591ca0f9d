"""dpkd.integrations — training-stack integrations: ``megatron`` (Megatron-Core tensor parallelism) and
``transformers`` (Hugging Face trainer, generation, evaluation, the main job)."""
