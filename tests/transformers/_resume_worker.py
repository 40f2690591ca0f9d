"""Worker for test_hf_resume.py: a small on-policy DPKD run (online teacher outputs, sampled student)."""

import sys
import time

import torch
from dpkd.integrations.transformers.data import format_prompt, tokenize_records
from dpkd.integrations.transformers.models import build_word_tokenizer, tiny_causal_lm
from dpkd.integrations.transformers.toy_task import make_task
from dpkd.integrations.transformers.trainer import DistillConfig, DistillTrainer

mode, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
task = make_task(64, 8, 8, seed=0)
tok = build_word_tokenizer([format_prompt(r) + " " + r.response for s in task.values() for r in s])
train, probe = tokenize_records(task["train"], tok), tokenize_records(task["valid"], tok)


def model(seed):
    return tiny_causal_lm("gpt2", len(tok), d_model=16, n_layers=1, n_heads=2, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, seed=seed)


cfg = DistillConfig(output_dir=out, method="dpkd", max_steps=12, per_device_train_batch_size=4, logging_steps=2,
                    save_steps=2, eval_steps=4, save_total_limit=2, max_new_tokens=12, disable_tqdm=True,
                    report_to="none", teacher_outputs="online", lr_scheduler_type="cosine", warmup_steps=2,
                    objective="half")
slow = [lambda trainer, step, logs: time.sleep(0.3)] if mode == "slow" else []
student, teacher = model(0), model(1)
DistillTrainer(student, teacher, train, cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               probe_examples=probe, callbacks=slow).train(resume_from_checkpoint=mode == "resume")
