"""A TRL 1.16 DPO script as users write it (nothing of dpo_fast in it), for
tests/test_trl_dropin.py: trains 3 steps on the tiny model and, after every optimizer step,
writes a digest of every parameter and of the batch this rank trained on to OUT/rank{R}.jsonl
(rank 0: the losses to OUT/losses.json). Run:
[torchrun ... | accelerate launch ...] [-m dpo_fast.trl] trl_ddp_script.py MODEL OUT [packed] [precompute]."""

import hashlib
import json
import os
import sys
from pathlib import Path

import datasets
import torch
import transformers
from tiny import word_rows
from trl import DPOConfig, DPOTrainer

model_dir, out = sys.argv[1], Path(sys.argv[2])
packed = "packed" in sys.argv[3:]
precompute = "precompute" in sys.argv[3:]
out.mkdir(parents=True, exist_ok=True)


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class Record(transformers.TrainerCallback):
    def __init__(self):
        self.batch = None
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_step_end(self, args, state, control, model=None, **kw):
        rank = args.process_index
        model = trainer.accelerator.unwrap_model(trainer.model)
        with open(out / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": state.global_step, "params": digest(model.parameters()),
                                "batch": self.batch, "trainer": DPOTrainer.__module__,
                                "slow_reason": getattr(trainer, "dpo_fast_slow_reason", "-"),
                                "attention": getattr(trainer, "dpo_fast_attention", "-"),
                                "wrapped": type(trainer.model_wrapped).__name__}) + "\n")


rec = Record()


class Spy(DPOTrainer):  # only records the batch each rank trained on
    def compute_loss(self, model, inputs, *a, **k):
        rec.batch = digest([inputs["input_ids"].float()])
        return super().compute_loss(model, inputs, *a, **k)


args = DPOConfig(output_dir=str(out / "run"), per_device_train_batch_size=2, max_steps=3,
                 learning_rate=5e-3, logging_steps=1, report_to="none", save_strategy="no",
                 seed=0, use_cpu=True, bf16=False, ddp_backend="gloo", padding_free=packed,
                 precompute_ref_log_probs=precompute)
trainer = Spy(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
              args=args, processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
              train_dataset=datasets.Dataset.from_list(word_rows(16, seed=5)), callbacks=[rec])
trainer.train()
if args.process_index == 0:
    (out / "losses.json").write_text(json.dumps(rec.losses))
# Exit without interpreter finalization: gloo's worker threads can outlive it under torchrun
# and abort a finished run ("terminate called without an active exception", SIGABRT; seen in
# CI on TRL's own run of this script). The same race dpo_fast.train.distributed.end_process
# sidesteps for dpo-fast train.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
