"""Every numeric field and choice of DistillConfig out of range is refused at construction, naming the field."""

import pytest
from dpkd.integrations.transformers.trainer import DistillConfig

_BAD = [
    ("eval_steps", -1), ("save_steps", -2), ("sample_top_k", -1), ("weight_decay", -0.1), ("adam_epsilon", -1e-8),
    ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("max_grad_norm", 0.0), ("sample_top_p", 0.0), ("sample_top_p", 1.5),
    ("save_total_limit", 0), ("report_to", "wandb"), ("weight_decay", float("nan")), ("max_grad_norm", float("nan")),
    ("max_steps", 0), ("learning_rate", 0.0), ("warmup_steps", 101), ("method", "dpko"), ("lr_scheduler_type", "cos"),
]


@pytest.mark.parametrize(("name", "value"), _BAD)
def test_out_of_range_is_refused_by_name(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"DistillConfig: `{name}`"):
        DistillConfig(output_dir=str(tmp_path), **{name: value})


def test_fsdp_config_without_fsdp_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`fsdp_config` is given but `fsdp` is empty"):
        DistillConfig(output_dir=str(tmp_path), fsdp_config={"fsdp_version": 2})


def test_the_edges_are_accepted(tmp_path):
    DistillConfig(output_dir=str(tmp_path), eval_steps=0, save_steps=0, sample_top_k=0, weight_decay=0.0,
                  adam_beta1=0.0, sample_top_p=1.0, save_total_limit=None, report_to="none", warmup_steps=100)
