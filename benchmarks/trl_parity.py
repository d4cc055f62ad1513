"""Parity of dpo_fast's trainer with TRL 1.16's ``DPOTrainer``: same pairs, same order, same
optimizer, per-step numbers side by side.

What is compared, per optimizer step: the exact training loss and TRL's metrics
``rewards/{chosen,rejected,margins,accuracies}`` and ``logps/{chosen,rejected}`` (plus, for
information only, ``grad_norm``, ``learning_rate`` and ``entropy``), the token ids each trainer
saw, the tokens per step, the step wall times, the peak RSS of the loop and, for TRL's
``precompute_ref_log_probs=True``, its one-off precompute time.

How the two runs are made to see the same thing:

- Order. dpo_fast decides the order (length-bucketed steps of ``batch_size`` pairs,
  ``dpo_fast.train.batching.epoch_steps`` on the trainer's own pair lengths).
  :func:`visit_order` builds a :class:`dpo_fast.train.Trainer`, runs its ``prepare_data()`` and
  ``plan()`` and asks its ``epoch_steps(epoch)`` for the steps (what the training loop
  runs), so a change of the length or cost functions is followed automatically.
  :func:`run_dpo_fast` records the indices each step really received (the
  ``on_step_begin`` callback), and
  :func:`compare` fails if they differ from the planned order.
- TRL gets exactly the visited rows, already in that order, and a ``SequentialSampler``
  (``_get_train_sampler`` overridden) with ``per_device_train_batch_size = batch_size`` and no
  gradient accumulation, so its step ``s`` is dpo_fast's step ``s``, pairs in the same order.
- Token ids. dpo_fast tokenizes like TRL 1.16 (``dpo_fast/data.py``). Both runs return the ids
  they trained on -- TRL's ``prompt_ids / chosen_ids / rejected_ids`` from its
  ``_prepare_dataset`` with its collator's ``(prompt + response)[:max_length]`` applied, and
  dpo_fast's tokenized examples of the visited steps -- and :func:`compare` requires them to be
  identical, pair by pair, in order. (They are, on the Rotten Tomatoes pairs; if they ever were
  not, ``run_trl(token_ids=...)`` feeds TRL dpo_fast's ids instead of its own tokenization.)
- Settings. fp32 (``bf16=False``), CPU, AdamW (TRL's default ``adamw_torch_fused``; dpo_fast's
  own ``torch.optim.AdamW``), betas 0.9 / 0.999, eps 1e-8, no weight decay, linear decay to 0
  without warm-up, gradient clipping at 1.0, dropout off, the same seed. TRL loads the policy
  from the model folder given as a path string and builds its reference from the same folder
  (what most TRL users do); with ``precompute_ref_log_probs=True`` TRL keeps no reference model
  and precomputes with the initial policy.

Exact per-step numbers: the loss is read in an overridden ``compute_loss`` (the float32 value
of the step's loss; transformers 5.24 logs ``tr_loss / steps`` unrounded, checked here against
the logged value), TRL's metrics from ``state.log_history`` with ``logging_steps=1`` (each is
the ``.item()`` of one step's value), dpo_fast's from ``metrics.jsonl``.

Tokens per step (both): prompt + response (EOS included) of the chosen and of the rejected
sequence, after truncation, padding excluded -- TRL's ``attention_mask.sum()`` of the batch;
for dpo_fast the same count from its token ids (whatever its packing shares).

    python benchmarks/trl_parity.py                  # 6 configs x 20 steps (~15 minutes)
    python benchmarks/trl_parity.py --steps 3 --configs sigmoid hinge
    python benchmarks/trl_parity.py --dropin         # TRL vs dpo_fast.trl, 10 configs x 20 steps

``--dropin`` compares TRL's ``DPOTrainer`` with ``dpo_fast.trl.DPOTrainer`` instead (the same
run of TRL's own data preparation and collator, one changed import): :data:`DROPIN_CONFIGS`
covers sigmoid, ipo, a weighted ``loss_type`` list, an f-divergence, LD-DPO, WPO,
``precompute_ref_log_probs`` (dpo_fast's cache, filled by the run), ``padding_free`` (packed
rows) and LoRA, with the same tolerances.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import harness

COLUMNS = ("prompt", "chosen", "rejected")
#: Metrics that must agree step by step (TRL's names, also dpo_fast's metrics.jsonl names).
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected")
#: Logged by both and reported, not asserted (grad norms amplify fp32 noise; entropy is a
#: diagnostic). TRL's ``mean_token_accuracy`` is over chosen tokens only, dpo_fast's over
#: chosen + rejected, so it is not compared.
INFO = ("grad_norm", "learning_rate", "entropy")
#: The configurations of the comparison: name -> loss_type, TRL's reference handling and the
#: modifiers both trainers take by TRL's names (``ld_alpha``: LD-DPO, ``use_weighting``: WPO).
CONFIGS: Dict[str, Dict[str, Any]] = {
    "sigmoid": {"loss_type": "sigmoid", "precompute_ref_log_probs": False},
    "sigmoid_precompute": {"loss_type": "sigmoid", "precompute_ref_log_probs": True},
    "ipo": {"loss_type": "ipo", "precompute_ref_log_probs": False},
    "hinge": {"loss_type": "hinge", "precompute_ref_log_probs": False},
    "sigmoid_ld": {"loss_type": "sigmoid", "precompute_ref_log_probs": False, "ld_alpha": 0.5},
    "sigmoid_wpo": {"loss_type": "sigmoid", "precompute_ref_log_probs": False,
                    "use_weighting": True},
}
#: The keys of a config that are TRL's reference handling only (dpo_fast always caches).
_TRL_ONLY = ("precompute_ref_log_probs",)
#: The per-step loss when policy == reference (LOSSES.md known answers, beta = 0.1).
INITIAL_LOSS = {"sigmoid": math.log(2.0), "hinge": 1.0, "ipo": 25.0}
DEFAULTS = dict(steps=20, batch_size=4, lr=5e-5, beta=0.1, max_length=128, seed=42)


# ----------------------------------------------------------------------------- data order


@dataclass
class VisitOrder:
    """The pairs dpo_fast's trainer visits in its first ``len(steps)`` optimizer steps.

    Attributes:
        steps: per step, the indices of the trainer's tokenized examples, in order.
        row_index: per visited pair (steps flattened), its index in the input rows.
        rows: the visited rows themselves (``prompt / chosen / rejected``), steps flattened.
        ids: per visited pair, ``[prompt_ids, chosen_ids, rejected_ids]`` as dpo_fast trains
            them (responses with EOS, truncated to ``max_length`` with the prompt).
        tokens_per_step: prompt + response tokens of chosen and rejected per step.
    """

    steps: List[List[int]]
    row_index: List[int]
    rows: List[Dict[str, Any]]
    ids: List[List[List[int]]]
    tokens_per_step: List[int]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _example_ids(ex) -> List[List[int]]:
    return [ex.prompt_ids.tolist(), ex.chosen_ids.tolist(), ex.rejected_ids.tolist()]


def pair_token_count(ids: Sequence[Sequence[int]]) -> int:
    p, c, r = ids
    return 2 * len(p) + len(c) + len(r)


def _row_positions(row_names: Sequence[str]) -> List[int]:
    """Input-row index of each tokenized example, from the trainer's row names
    (``"train_data row 17"`` for in-memory rows)."""
    out = []
    for name in row_names:
        m = re.search(r" row (\d+)$", name)
        if m is None:
            raise ValueError(f"cannot map the trainer's example {name!r} back to an input row")
        out.append(int(m.group(1)))
    return out


def visit_order(rows: Sequence[Dict[str, Any]], tokenizer=None, *, batch_size: int, seed: int,
                max_length: Optional[int], steps: int, model_dir: Optional[str] = None,
                data_cache_dir: str = "") -> VisitOrder:
    """The pairs dpo_fast's :class:`~dpo_fast.train.Trainer` visits in its first ``steps``
    optimizer steps, in order, derived from a Trainer object (no model is loaded).

    ``prepare_data()`` tokenizes and checks ``rows`` exactly as training does, ``plan()``
    computes the per-pair lengths, and the steps come from ``trainer.epoch_steps(epoch)``
    epoch after epoch, as in ``Trainer.train``. Raises ValueError if a
    visited step holds fewer than ``batch_size`` pairs (an epoch's short step): TRL's DataLoader
    cuts fixed-size batches, so such a run cannot be replayed in TRL.
    """
    from dpo_fast.train import TrainConfig, Trainer

    if tokenizer is None and model_dir is None:
        raise ValueError("visit_order needs a tokenizer or model_dir")
    cfg = TrainConfig(model=model_dir or "<tokenizer only>", train_data=list(rows),
                      tokenizer=model_dir, batch_size=batch_size, seed=seed,
                      max_length=max_length, max_steps=steps, data_cache_dir=data_cache_dir,
                      output_dir=tempfile.gettempdir())
    trainer = Trainer(cfg, tokenizer=tokenizer)
    trainer.prepare_data()
    trainer.plan()
    planned: List[List[int]] = []
    epoch = 0
    while len(planned) < steps:
        planned += [[int(i) for i in s] for s in
                    trainer.epoch_steps(epoch)]
        epoch += 1
    planned = planned[:steps]
    short = [k + 1 for k, s in enumerate(planned) if len(s) != batch_size]
    if short:
        raise ValueError(f"step(s) {short} of dpo_fast's order hold fewer than {batch_size} "
                         "pairs (an epoch's last, short step); TRL's fixed-size batches cannot "
                         "replay that: change seed or steps")
    examples = trainer.train_data.examples
    positions = _row_positions(trainer.train_data.row_names)
    flat = [i for s in planned for i in s]
    ids = [_example_ids(examples[i]) for i in flat]
    return VisitOrder(
        steps=planned, row_index=[positions[i] for i in flat],
        rows=[{k: rows[positions[i]][k] for k in COLUMNS} for i in flat], ids=ids,
        tokens_per_step=[sum(pair_token_count(_example_ids(examples[i])) for i in s)
                         for s in planned])


# ----------------------------------------------------------------------------------- TRL


def _median_after_first(times: Sequence[float]) -> Optional[float]:
    t = list(times[1:]) or list(times)
    return statistics.median(t) if t else None


@contextlib.contextmanager
def _quiet():
    """No datasets / transformers progress bars inside (their previous state is restored)."""
    import datasets
    from transformers.utils import logging as tf_logging

    ds_off, tf_on = datasets.are_progress_bars_disabled(), tf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not ds_off:
            datasets.enable_progress_bars()
        if tf_on:
            tf_logging.enable_progress_bar()


def run_trl(model_dir: str, rows_in_order: Sequence[Dict[str, Any]], *, steps: int,
            batch_size: int, lr: float, beta: float, loss_type: Union[str, Sequence[str]],
            max_length: Optional[int], seed: int, precompute_ref_log_probs: bool = False,
            gradient_checkpointing: bool = False, callbacks: Optional[list] = None,
            token_ids: Optional[Sequence[Sequence[Sequence[int]]]] = None,
            output_dir: Optional[str] = None, device: str = "cpu",
            precision: str = "fp32", dropin: bool = False,
            padding_free: bool = False, ref_cache_dir: Optional[str] = None,
            ld_alpha: Optional[float] = None, use_weighting: bool = False,
            lora: bool = False, **dpo_args) -> Dict[str, Any]:
    """Runs TRL's ``DPOTrainer`` for ``steps`` steps over ``rows_in_order`` without shuffling.

    ``dropin``: the same run through ``dpo_fast.trl``'s ``DPOTrainer`` / ``DPOConfig`` (the
    one-line change of a TRL script); ``padding_free``: TRL's ``padding_free`` argument (TRL
    1.16 switches it off, the drop-in packs); ``ref_cache_dir``: the drop-in's
    ``DPOConfig.ref_cache_dir`` (its ``precompute_ref_log_probs`` cache); ``ld_alpha`` /
    ``use_weighting``: TRL's LD-DPO / WPO arguments; ``lora``: a LoRA adapter (r 8 on the
    attention and MLP projections) through TRL's ``peft_config``; ``dpo_args``: any other
    ``DPOConfig`` field (``loss_weights``, ``f_divergence_type``, ...). ``loss_type``: a name or
    a list of names.

    ``device`` "cpu" (``use_cpu=True``) or "cuda"; ``precision`` "fp32" (``bf16=False``) or
    "bf16" (TRL's ``bf16=True``: autocast over fp32 weights, its default on a GPU). On CUDA the
    record also has ``peak_gpu_mb`` (``torch.cuda.max_memory_allocated`` since the loop
    started) and step times are taken after a synchronize.

    The policy is given as the path ``model_dir`` (TRL loads it in fp32 and, unless
    ``precompute_ref_log_probs``, loads its reference model from the same folder). Everything
    not named here is TRL's default; the defaults a fair comparison depends on are set
    explicitly. ``token_ids`` (per row ``[prompt, chosen, rejected]`` ids) replaces TRL's own
    tokenization when given. ``callbacks`` are transformers ``TrainerCallback`` objects.

    Returns a JSON-able dict: ``steps`` (per step: every :data:`COMPARED` and :data:`INFO`
    metric, ``logged_loss`` as transformers logged it, ``tokens``, ``time_s``), ``ids`` (the
    token ids of each pair of the prepared dataset after the collator's truncation),
    ``batches`` (per step, the unpadded sequences the model got: chosen rows, then rejected
    rows), ``peak_rss_mb`` (VmHWM
    since the loop started), ``precompute_s`` / ``precompute_pairs`` (TRL's
    ``_precompute_ref_logps``, run inside ``DPOTrainer.__init__``) and ``ref_hash_s`` (TRL's
    SHA-256 of the reference ``state_dict``, done at every start-up with precompute on).
    """
    import dataclasses

    import datasets
    import transformers
    import trl.trainer.dpo_trainer as dpo_mod
    from torch.utils.data import SequentialSampler

    if dropin:
        from dpo_fast.trl import DPOConfig, DPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

    n = steps * batch_size
    if len(rows_in_order) < n:
        raise ValueError(f"run_trl: {steps} steps of {batch_size} pairs need {n} rows, got "
                         f"{len(rows_in_order)}")
    rows = [{k: r[k] for k in COLUMNS} for r in rows_in_order[:n]]
    rec: Dict[str, Any] = {"trainer": "trl", "losses": [], "tokens": [], "times": [],
                           "batches": [],
                           "precompute_s": 0.0, "precompute_pairs": 0, "ref_hash_s": 0.0,
                           "peak_rss_mb": None}

    class ParityDPOTrainer(DPOTrainer):
        """DPOTrainer in the given row order, recording exact losses and precompute time."""

        def _get_train_sampler(self, train_dataset=None):  # transformers 5.x signature
            return SequentialSampler(self.train_dataset if train_dataset is None
                                     else train_dataset)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if token_ids is None:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            ids = [[list(map(int, x)) for x in t] for t in token_ids[:n]]
            return datasets.Dataset.from_dict({"prompt_ids": [t[0] for t in ids],
                                               "chosen_ids": [t[1] for t in ids],
                                               "rejected_ids": [t[2] for t in ids]})

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            rec["precompute_s"] += time.perf_counter() - t0
            rec["precompute_pairs"] += len(dataset)
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                loss = out[0] if return_outputs else out
                rec["losses"].append(float(loss.detach()))
                if "num_real_tokens" in inputs:  # the drop-in's packed row (padding_free)
                    rec["tokens"].append(int(inputs["num_real_tokens"]))
                    rec["batches"].append(None)
                else:
                    mask = inputs["attention_mask"].bool()
                    rec["tokens"].append(int(mask.sum()))
                    rec["batches"].append([row[m].tolist() for row, m in
                                           zip(inputs["input_ids"], mask)])
            return out

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            harness.reset_hwm()
            if device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            harness.sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            harness.sync(device)
            now = time.perf_counter()
            rec["times"].append(now - self.t)
            self.t = now

        def on_train_end(self, args, state, control, **kw):
            rec["peak_rss_mb"] = harness.hwm_bytes() / 2**20
            if device == "cuda":
                import torch

                rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20

    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields \
        else "gradient_checkpointing"  # renamed in transformers 5.2x
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=output_dir or tmp, use_cpu=device == "cpu", bf16=precision == "bf16",
            report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=steps,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            learning_rate=lr, beta=beta, max_length=max_length,
            loss_type=[loss_type] if isinstance(loss_type, str) else list(loss_type),
            seed=seed, precompute_ref_log_probs=precompute_ref_log_probs,
            padding_free=padding_free, ld_alpha=ld_alpha, use_weighting=use_weighting,
            **({"ref_cache_dir": ref_cache_dir} if ref_cache_dir else {}),
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            dataloader_num_workers=0, **{ckpt: gradient_checkpointing}, **dpo_args)
        peft_config = None
        if lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"])
        hash_module = dpo_mod.hash_module

        def timed_hash(module):
            t0 = time.perf_counter()
            try:
                return hash_module(module)
            finally:
                rec["ref_hash_s"] += time.perf_counter() - t0

        dpo_mod.hash_module = timed_hash
        try:
            with _quiet():
                trainer = ParityDPOTrainer(model=str(model_dir), args=args,
                                           peft_config=peft_config,
                                           train_dataset=datasets.Dataset.from_list(rows),
                                           callbacks=[Clock(), *(callbacks or [])])
        finally:
            dpo_mod.hash_module = hash_module
        trainer.remove_callback(transformers.PrinterCallback)  # no log dicts on stdout
        rec["optimizer"] = str(args.optim.value if hasattr(args.optim, "value") else args.optim)
        ref = trainer.ref_model
        rec["reference"] = "precomputed by the initial policy" if ref is None else \
            f"a second {type(ref).__name__} loaded from {ref.config._name_or_path}"
        ds = trainer.train_dataset
        rec["ids"] = []
        for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]):
            cut = len(p) + max(len(c), len(r)) if max_length is None else max_length
            rec["ids"].append([list(p), (list(p) + list(c))[:cut][len(p):],
                               (list(p) + list(r))[:cut][len(p):]])
        with _quiet():
            trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        del trainer
        gc.collect()
    if len(logs) != steps or len(rec["losses"]) != steps:
        raise RuntimeError(f"TRL ran {len(rec['losses'])} loss computations and logged "
                           f"{len(logs)} steps, expected {steps}")
    rec["steps"] = []
    for k, h in enumerate(logs):
        step = {"step": h["step"], "loss": rec["losses"][k], "logged_loss": float(h["loss"]),
                "tokens": rec["tokens"][k], "time_s": rec["times"][k]}
        step.update({m: float(h[m]) for m in COMPARED[1:] + INFO if m in h})
        rec["steps"].append(step)
    rec["median_step_s"] = _median_after_first(rec.pop("times"))
    del rec["losses"], rec["tokens"]
    return rec


# ------------------------------------------------------------------------------ dpo_fast


def dpo_fast_config(model_dir: str, rows: Sequence[Dict[str, Any]], *, output_dir: str,
                    ref_cache_dir: str, steps: int, batch_size: int, lr: float, beta: float,
                    loss_type: str, max_length: Optional[int], seed: int,
                    data_cache_dir: str = "", **kw):
    """The :class:`dpo_fast.train.TrainConfig` with the settings :func:`run_trl` gives TRL
    (AdamW, linear decay to 0 without warm-up, clipping at 1.0, no weight decay, a metrics
    line per step, no saving); ``kw`` sets any other field."""
    from dpo_fast.train import TrainConfig

    return TrainConfig(
        model=str(model_dir), train_data=list(rows), output_dir=str(output_dir),
        ref_cache_dir=str(ref_cache_dir), data_cache_dir=data_cache_dir,
        loss_type=loss_type, beta=beta, learning_rate=lr, batch_size=batch_size,
        max_length=max_length, seed=seed, max_steps=steps, logging_steps=1,
        save_steps=None, save_final_model=False, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=0, warmup_ratio=0.0, weight_decay=0.0, **kw)


def run_dpo_fast(model_dir: str, rows: Sequence[Dict[str, Any]], *, steps: int,
                 batch_size: int, lr: float, beta: float, loss_type: str,
                 max_length: Optional[int], seed: int, gradient_checkpointing: bool = False,
                 callbacks: Sequence[Any] = (), output_dir: Optional[str] = None,
                 data_cache_dir: str = "", ref_cache_dir: Optional[str] = None,
                 device: str = "cpu", precision: str = "fp32",
                 adaptive_threads: bool = True, **config) -> Dict[str, Any]:
    """Runs :class:`dpo_fast.train.Trainer` on all of ``rows`` for ``steps`` steps with the
    settings :func:`run_trl` gives TRL; its own order decides which pairs are visited;
    ``config`` sets other :class:`dpo_fast.train.TrainConfig` fields (e.g. ``attention``).

    Returns the same record as :func:`run_trl` (``steps`` read from ``metrics.jsonl``;
    ``tokens`` counted from the visited pairs' ids; ``precompute_s`` = the reference-cache fill
    of this run, ``precompute_pairs`` the pairs it covered), plus ``visited`` (the example
    indices each step received) and ``row_index`` (their input rows, flattened).
    ``ref_cache_dir`` (default: a fresh one in the output folder) lets a later run reuse the
    cache; ``device`` / ``precision`` as in :func:`run_trl` (``peak_gpu_mb`` on CUDA).
    ``adaptive_threads``: TrainConfig's (``cpu_threads`` in the record says what it did).
    """
    from dpo_fast.train import Trainer, TrainerCallback

    rec: Dict[str, Any] = {"trainer": "dpo_fast", "times": [], "visited": [],
                           "peak_rss_mb": None}

    class Clock(TrainerCallback):
        def on_train_begin(self, trainer, state):
            harness.reset_hwm()
            if device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            harness.sync(device)
            self.t = time.perf_counter()

        def on_step_begin(self, trainer, state, pairs):
            rec["visited"].append([int(i) for i in pairs])

        def on_step_end(self, trainer, state):
            harness.sync(device)
            now = time.perf_counter()
            rec["times"].append(now - self.t)
            self.t = now

        def on_train_end(self, trainer, state, result):
            rec["peak_rss_mb"] = harness.hwm_bytes() / 2**20
            if device == "cuda":
                import torch

                rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(output_dir or tmp)
        cfg = dpo_fast_config(
            model_dir, rows, output_dir=str(out),
            ref_cache_dir=ref_cache_dir or str(out / "ref_cache"),
            steps=steps, batch_size=batch_size, lr=lr, beta=beta, loss_type=loss_type,
            max_length=max_length, seed=seed, data_cache_dir=data_cache_dir,
            gradient_checkpointing=gradient_checkpointing, device=device, precision=precision,
            adaptive_threads=adaptive_threads, **config)
        trainer = Trainer(cfg, callbacks=[Clock(), *callbacks])
        res = trainer.train()
        rec["cpu_threads"] = res.cpu_threads
        logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
                if ln.strip()]
        examples = trainer.train_data.examples
        positions = _row_positions(trainer.train_data.row_names)
        del trainer
        gc.collect()
    logs = [m for m in logs if "loss" in m]
    if not rec["visited"]:
        raise RuntimeError("dpo_fast's Trainer never called on_step_begin: the hook that "
                           "records the visited pairs is gone; update run_dpo_fast")
    if len(logs) != steps or len(rec["visited"]) != steps:
        raise RuntimeError(f"dpo_fast logged {len(logs)} steps and ran {len(rec['visited'])}, "
                           f"expected {steps}")
    flat = [i for s in rec["visited"] for i in s]
    rec["ids"] = [_example_ids(examples[i]) for i in flat]
    rec["row_index"] = [positions[i] for i in flat]
    rec["steps"] = []
    for k, m in enumerate(logs):
        step = {"step": m["step"], "loss": float(m["loss"]), "time_s": rec["times"][k],
                "tokens": sum(pair_token_count(_example_ids(examples[i]))
                              for i in rec["visited"][k]),
                "logged_num_tokens": m.get("num_tokens")}
        step.update({x: float(m[x]) for x in COMPARED[1:] + INFO if x in m})
        rec["steps"].append(step)
    rec["median_step_s"] = _median_after_first(rec.pop("times"))
    rec["precompute_s"] = res.precompute_seconds
    rec["precompute_pairs"] = len(set(flat))
    rec["attention"] = res.attention
    return rec


# ---------------------------------------------------------------------------- comparison


def _first_id_mismatch(a: Sequence, b: Sequence) -> Optional[str]:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} pairs"
    for k, (x, y) in enumerate(zip(a, b)):
        for part, u, v in zip(COLUMNS, x, y):
            if list(u) != list(v):
                return f"pair {k} ({part}_ids): {list(u)[:12]}... vs {list(v)[:12]}..."
    return None


def compare(trl: Dict[str, Any], fast: Dict[str, Any], *,
            order: Optional[VisitOrder] = None, abs_tol: float = 1e-4,
            logps_rtol: float = 1e-5, loss_rtol: float = 0.0) -> Dict[str, Any]:
    """Step-by-step comparison of a :func:`run_trl` and a :func:`run_dpo_fast` record.

    Inputs: TRL's prepared ids must equal dpo_fast's visited examples' ids, pair by pair, and
    each TRL step's batch (unpadded sequences) must be dpo_fast's step: ``[prompt + chosen]``
    of its pairs, then ``[prompt + rejected]``, in its order.

    Tolerances: ``abs_tol`` on the loss and the reward metrics; ``logps/*`` are sums over
    30-60 response tokens of magnitude ~150, where the two trainers' fp32 differences (other
    kernels and summation orders, then weights drifting apart by that noise) are ~1e-5
    absolute at step 1 and ~2e-4 after 20 steps, i.e. ~1e-6 relative: they pass within
    ``max(abs_tol, logps_rtol * |value|)`` (rewards, differences of two such sums times beta,
    stay within ``abs_tol``); the loss within ``max(abs_tol, loss_rtol * |loss|)`` (0 by
    default: absolute only). ``rewards/accuracies`` counts
    ``chosen_reward > rejected_reward``; where TRL's rewards are exactly 0 (policy ==
    reference, i.e. step 1) it is a comparison of ties, decided by rounding noise in dpo_fast
    (whose reference values come from its cache, computed in other batches): such steps are
    reported, not failed. Returns ``ok``, ``failures`` (messages), ``same_ids``,
    ``same_order``, per metric the max absolute difference (``max_diff``) and per step the
    differences (``per_step``).
    """
    failures: List[str] = []
    mismatch = _first_id_mismatch(trl["ids"], fast["ids"])
    if mismatch:
        failures.append(f"token ids differ: {mismatch}")
    elif "visited" not in fast:  # another run_trl record (the drop-in): the same batches
        for k, (a, b) in enumerate(zip(trl["batches"], fast["batches"])):
            if a is not None and b is not None and a != b:  # None: a packed row
                failures.append(f"step {k + 1}: the two runs' batches differ")
                break
    else:
        bs = len(fast["visited"][0]) if fast.get("visited") else 0
        if len(trl["batches"]) != len(trl["steps"]):
            failures.append(f"TRL recorded {len(trl['batches'])} batches for "
                            f"{len(trl['steps'])} steps")
        for k, got in enumerate(trl["batches"]):
            pairs = fast["ids"][k * bs:(k + 1) * bs]
            want = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
            if got != want:
                mismatch = f"TRL's step {k + 1} batch is not dpo_fast's step {k + 1}"
                failures.append(mismatch)
                break
    same_order = None
    if order is not None:
        same_order = fast["visited"] == order.steps and fast["row_index"] == order.row_index
        if not same_order:
            failures.append("dpo_fast visited other pairs than visit_order planned")
        planned = _first_id_mismatch(order.ids, fast["ids"])
        if planned:
            failures.append(f"planned ids differ from dpo_fast's: {planned}")
    ts, fs = trl["steps"], fast["steps"]
    if len(ts) != len(fs):
        failures.append(f"{len(ts)} TRL steps vs {len(fs)} dpo_fast steps")
    max_diff = {m: 0.0 for m in COMPARED + INFO}
    per_step = []
    tie_steps = []
    for k, (t, f) in enumerate(zip(ts, fs)):
        if t["tokens"] != f["tokens"]:
            failures.append(f"step {k + 1}: {t['tokens']} tokens in TRL, {f['tokens']} in "
                            "dpo_fast")
        if abs(t["loss"] - t["logged_loss"]) > 0.0:
            failures.append(f"step {k + 1}: TRL logged loss {t['logged_loss']!r} is not the "
                            f"computed {t['loss']!r}")
        ties = t.get("rewards/chosen") == 0.0 and t.get("rewards/rejected") == 0.0
        row = {"step": k + 1}
        for m in COMPARED + INFO:
            if m not in t or m not in f:
                if m in COMPARED:
                    failures.append(f"step {k + 1}: metric {m} missing "
                                    f"({'TRL' if m not in t else 'dpo_fast'})")
                continue
            d = abs(t[m] - f[m])
            row[m] = d
            if m == "rewards/accuracies" and ties:
                tie_steps.append(k + 1)
                continue
            max_diff[m] = max(max_diff[m], d)
            if m not in COMPARED:
                continue
            tol = max(abs_tol, logps_rtol * abs(t[m])) if m.startswith("logps/") else (
                max(abs_tol, loss_rtol * abs(t[m])) if m == "loss" else abs_tol)
            if d > tol:
                failures.append(f"step {k + 1}: |{m} diff| = {d:.3g} > {tol:.3g} (TRL "
                                f"{t[m]!r}, dpo_fast {f[m]!r})")
        per_step.append(row)
    losses = [t["loss"] for t in ts]
    return {"ok": not failures, "failures": failures, "same_ids": mismatch is None,
            "same_order": same_order, "max_diff": max_diff, "per_step": per_step,
            "accuracy_tie_steps": tie_steps,
            "loss_range": (max(losses) - min(losses)) if losses else 0.0}


# ------------------------------------------------------------------------------- driving


def load_assets():
    """(model folder, train rows): SmolLM2-135M-Instruct fp32 and the Rotten Tomatoes train
    split (``eval_fraction=0.1, seed=0``)."""
    from dpo_fast.assets import rotten_tomatoes_pairs, smollm2_dir

    train, _ = rotten_tomatoes_pairs(eval_fraction=0.1, seed=0)
    return str(smollm2_dir()), train


def run_comparison(model_dir: str, rows: Sequence[Dict[str, Any]],
                   configs: Sequence[str] = tuple(CONFIGS), *, steps: int, batch_size: int,
                   lr: float, beta: float, max_length: Optional[int], seed: int,
                   gradient_checkpointing: bool = False, isolate: bool = False,
                   threads: int = 2, log=None) -> Dict[str, Any]:
    """Plans the order, runs dpo_fast once per loss type and TRL once per config, compares.

    ``isolate`` runs every training in a fresh process (``harness.run_worker``, ``threads``
    torch threads; needed for peak-RSS readings), else in this process one after the other.
    The rows are tokenized once into a temporary cache that every dpo_fast run reads. Returns
    ``order`` (the :class:`VisitOrder` as a dict) and, per config name, ``trl``, ``dpo_fast``
    and ``comparison`` (:func:`compare`).
    """
    from transformers import AutoTokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    common = dict(steps=steps, batch_size=batch_size, lr=lr, beta=beta, max_length=max_length,
                  seed=seed, gradient_checkpointing=gradient_checkpointing)
    with tempfile.TemporaryDirectory() as tmp:
        tok_cache = str(Path(tmp) / "tokenized")  # one tokenization of the rows for all runs
        order = visit_order(rows, AutoTokenizer.from_pretrained(model_dir),
                            batch_size=batch_size, seed=seed, max_length=max_length,
                            steps=steps, data_cache_dir=tok_cache)
        rows_file = Path(tmp) / "rows.json"
        if isolate:
            rows_file.write_text(json.dumps({"all": list(rows), "ordered": order.rows}))

        def run(trainer: str, **kw) -> Dict[str, Any]:
            t0 = time.perf_counter()
            if trainer == "dpo_fast":
                kw = {**kw, "data_cache_dir": tok_cache}
            if isolate:
                opts = {**common, **kw, "threads": threads, "model_dir": model_dir,
                        "rows_file": rows_file, "trainer": trainer}
                argv = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
                        for k, v in opts.items() if v is not False and v is not None]
                out = harness.run_worker(Path(__file__), argv, timeout=7200)
                if "error" in out:
                    raise RuntimeError(f"{trainer} worker failed: {out['error']}")
            elif trainer == "trl":
                out = run_trl(model_dir, order.rows, **common, **kw)
            else:
                out = run_dpo_fast(model_dir, rows, **common, **kw)
            # This machine may be shared: the load around each run qualifies its timings.
            out["loadavg_1min_after"] = os.getloadavg()[0]
            log(f"{trainer} {kw}: {time.perf_counter() - t0:.0f} s, load average "
                f"{out['loadavg_1min_after']:.1f}")
            return out

        fast_runs: Dict[str, Dict[str, Any]] = {}
        for c in configs:  # one dpo_fast run per setting it sees (reference handling aside)
            key = _fast_key(c)
            if key not in fast_runs:
                fast_runs[key] = run("dpo_fast", **{k: v for k, v in CONFIGS[c].items()
                                                     if k not in _TRL_ONLY})
        results: Dict[str, Any] = {"order": order.to_dict()}
        for name in configs:
            cfg = CONFIGS[name]
            t = run("trl", **cfg)
            f = fast_runs[_fast_key(name)]
            results[name] = {"trl": t, "dpo_fast": f, "comparison": compare(t, f, order=order)}
    return results


#: ``--dropin``: TRL's DPOTrainer vs dpo_fast.trl's on the same TRL run (run_trl arguments).
DROPIN_CONFIGS: Dict[str, Dict[str, Any]] = {
    "sigmoid": {"loss_type": "sigmoid"},
    "ipo": {"loss_type": "ipo"},
    "list_weighted": {"loss_type": ["sigmoid", "sft", "bco_pair"],
                      "loss_weights": [1.0, 0.5, 0.3]},
    # forward_kl's score 1 - exp(-u) multiplies the log-ratio's fp32 noise (~1e-6 relative of
    # sums ~150) by exp(-u): one step of lr 5e-5 moves u to -5.3 on this data (the step-2 loss
    # is 20), so its loss is compared within 1e-4 relative (the reward and logps metrics, not
    # amplified, keep the default tolerances)
    "forward_kl": {"loss_type": "sigmoid", "f_divergence_type": "forward_kl",
                   "_loss_rtol": 1e-4},
    "ld_alpha": {"loss_type": "sigmoid", "ld_alpha": 0.5},
    "use_weighting": {"loss_type": "sigmoid", "use_weighting": True},
    "precompute": {"loss_type": "sigmoid", "precompute_ref_log_probs": True},
    "padding_free": {"loss_type": "sigmoid", "padding_free": True},
    "lora": {"loss_type": "sigmoid", "lora": True, "lr": 5e-4},
    "padding_free_lora": {"loss_type": "sigmoid", "padding_free": True, "lora": True,
                          "lr": 5e-4},
}


def run_dropin_comparison(model_dir: str, rows: Sequence[Dict[str, Any]],
                          configs: Sequence[str] = tuple(DROPIN_CONFIGS), *, steps: int,
                          batch_size: int, lr: float, beta: float, max_length: Optional[int],
                          seed: int, gradient_checkpointing: bool = False,
                          log=None) -> Dict[str, Any]:
    """TRL's ``DPOTrainer`` and ``dpo_fast.trl.DPOTrainer`` on the same rows in the same order
    (dpo_fast's planned order, as :func:`run_comparison`), per config of
    :data:`DROPIN_CONFIGS`, in this process; each result has ``trl``, ``dpo_fast`` (the
    drop-in's record) and ``comparison`` (:func:`compare`)."""
    from transformers import AutoTokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory() as tmp:
        order = visit_order(rows, AutoTokenizer.from_pretrained(model_dir),
                            batch_size=batch_size, seed=seed, max_length=max_length,
                            steps=steps, data_cache_dir=str(Path(tmp) / "tokenized"))
        results: Dict[str, Any] = {"order": order.to_dict()}
        for name in configs:
            cfg = {"lr": lr, **DROPIN_CONFIGS[name]}
            loss_rtol = cfg.pop("_loss_rtol", 0.0)
            common = dict(steps=steps, batch_size=batch_size, beta=beta, max_length=max_length,
                          seed=seed, gradient_checkpointing=gradient_checkpointing, **cfg)
            runs = {}
            for who in ("trl", "dropin"):
                t0 = time.perf_counter()
                extra = ({"ref_cache_dir": str(Path(tmp) / f"cache_{name}")}
                         if who == "dropin" and cfg.get("precompute_ref_log_probs") else {})
                runs[who] = run_trl(model_dir, order.rows, dropin=who == "dropin", **common,
                                    **extra)
                runs[who]["loadavg_1min_after"] = os.getloadavg()[0]
                log(f"{name} {who}: {time.perf_counter() - t0:.0f} s")
            results[name] = {"trl": runs["trl"], "dpo_fast": runs["dropin"],
                             "comparison": compare(runs["trl"], runs["dropin"],
                                                   loss_rtol=loss_rtol)}
    return results


def _fast_key(name: str) -> str:
    """The dpo_fast run a config compares with: its settings other than TRL's reference
    handling."""
    return json.dumps({k: v for k, v in CONFIGS[name].items() if k not in _TRL_ONLY},
                      sort_keys=True)


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    harness.disable_thp()
    data = json.loads(Path(args.rows_file).read_text())
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
              loss_type=args.loss_type, max_length=args.max_length, seed=args.seed,
              gradient_checkpointing=args.gradient_checkpointing)
    if args.ld_alpha is not None:
        kw["ld_alpha"] = args.ld_alpha
    if args.use_weighting:
        kw["use_weighting"] = True
    if args.trainer == "trl":
        out = run_trl(args.model_dir, data["ordered"],
                      precompute_ref_log_probs=args.precompute_ref_log_probs, **kw)
    else:
        out = run_dpo_fast(args.model_dir, data["all"], data_cache_dir=args.data_cache_dir,
                           **kw)
    print(json.dumps(out))


def _compact(results: Dict[str, Any]) -> Dict[str, Any]:
    """``results`` without the token ids and texts (checked already; they would make the JSON
    file megabytes): the visited row indices, per-step records and comparisons stay."""
    bulky = ("ids", "batches", "rows")
    out: Dict[str, Any] = {}
    for name, r in results.items():
        if name == "order":
            out[name] = {k: v for k, v in r.items() if k not in bulky}
        else:
            out[name] = {k: ({x: y for x, y in v.items() if x not in bulky}
                             if k in ("trl", "dpo_fast") else v) for k, v in r.items()}
    return out


def _tokens_per_s(run: Dict[str, Any]) -> float:
    """Tokens per second over steps 2.. (all steps if there is one)."""
    steps = run["steps"][1:] or run["steps"]
    return sum(s["tokens"] for s in steps) / max(sum(s["time_s"] for s in steps), 1e-9)


def _summary_rows(results: Dict[str, Any], configs: Sequence[str]) -> List[List[str]]:
    out = []
    for name in configs:
        r = results[name]
        t, f, c = r["trl"], r["dpo_fast"], r["comparison"]
        reward_diff = max(c["max_diff"][m] for m in COMPARED[1:5])
        logps_diff = max(c["max_diff"][m] for m in COMPARED[5:])
        tok_t, tok_f = _tokens_per_s(t), _tokens_per_s(f)
        out.append([name, "yes" if c["same_ids"] and c["same_order"] in (True, None) else "NO",
                    f"{t['steps'][0]['loss']:.7f} -> {t['steps'][-1]['loss']:.5f}",
                    f"{c['max_diff']['loss']:.2e}", f"{reward_diff:.2e}", f"{logps_diff:.2e}",
                    f"{c['max_diff']['grad_norm']:.2e}",
                    harness.fmt(t["median_step_s"], ".2f") + " / "
                    + harness.fmt(f["median_step_s"], ".2f"),
                    f"{tok_t:.0f} / {tok_f:.0f}",
                    harness.fmt(t["peak_rss_mb"], ".0f") + " / "
                    + harness.fmt(f["peak_rss_mb"], ".0f"),
                    f"{t['precompute_s']:.1f} ({t['precompute_pairs']}"
                    + (f", +{t['ref_hash_s']:.1f} s hash" if t["ref_hash_s"] else "") + ") / "
                    f"{f['precompute_s']:.1f} ({f['precompute_pairs']})",
                    f"{t.get('loadavg_1min_after', math.nan):.1f} / "
                    f"{f.get('loadavg_1min_after', math.nan):.1f}",
                    "PASS" if c["ok"] else "FAIL"])
    return out


def _step_table(r: Dict[str, Any]) -> str:
    rows = []
    for t, f, d in zip(r["trl"]["steps"], r["dpo_fast"]["steps"], r["comparison"]["per_step"]):
        rows.append([str(d["step"]), f"{t['loss']:.7f}", f"{f['loss']:.7f}",
                     f"{d['loss']:.1e}",
                     f"{t['rewards/margins']:.5f}", f"{f['rewards/margins']:.5f}",
                     f"{max(d.get(m, 0.0) for m in COMPARED[1:4]):.1e}",
                     f"{t['rewards/accuracies']:.2f} / {f['rewards/accuracies']:.2f}",
                     f"{max(d.get(m, 0.0) for m in COMPARED[5:]):.1e}",
                     str(t["tokens"]), f"{t['time_s']:.2f} / {f['time_s']:.2f}"])
    return harness.md_table(["step", "TRL loss", "dpo_fast loss", "|dloss|", "TRL margin",
                             "dpo_fast margin", "max |d reward|", "reward acc TRL / dpo_fast",
                             "max |d logps|", "tokens", "step s TRL / dpo_fast"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--beta", type=float, default=DEFAULTS["beta"])
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--configs", nargs="+", choices=sorted(set(CONFIGS) | set(DROPIN_CONFIGS)),
                   help=f"default: {list(CONFIGS)}, with --dropin {list(DROPIN_CONFIGS)}")
    p.add_argument("--dropin", action="store_true",
                   help="TRL's DPOTrainer vs dpo_fast.trl's (one changed import) instead of "
                        "vs dpo-fast train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None, help="results name (default trl_parity, with "
                   "--dropin trl_dropin_parity)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every training in this process (faster; no RSS readings)")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=("trl", "dpo_fast"), help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--loss-type", help=argparse.SUPPRESS)
    p.add_argument("--precompute-ref-log-probs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ld-alpha", type=float, help=argparse.SUPPRESS)
    p.add_argument("--use-weighting", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-cache-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    table = DROPIN_CONFIGS if args.dropin else CONFIGS
    args.configs = args.configs or list(table)
    unknown = [c for c in args.configs if c not in table]
    if unknown:
        p.error(f"--configs {unknown}: not among {list(table)}"
                + (" (--dropin)" if args.dropin else ""))
    args.name = args.name or ("trl_dropin_parity" if args.dropin else "trl_parity")
    other = "dpo_fast.trl" if args.dropin else "dpo_fast"
    model_dir, rows = load_assets()
    t0 = time.perf_counter()
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                  max_length=args.max_length, seed=args.seed,
                  gradient_checkpointing=args.gradient_checkpointing)
    if args.dropin:
        results = run_dropin_comparison(model_dir, rows, args.configs, **common)
    else:
        results = run_comparison(model_dir, rows, args.configs, **common,
                                 isolate=not args.no_isolate, threads=args.threads)
    wall = time.perf_counter() - t0
    for name in args.configs:
        c = results[name]["comparison"]
        print(f"\n== {name} ({table[name]})")
        print(_step_table(results[name]), end="")
        print(f"max |loss diff| {c['max_diff']['loss']:.3e}; max |metric diff| "
              + ", ".join(f"{m} {c['max_diff'][m]:.3e}" for m in COMPARED[1:] + INFO))
        for msg in c["failures"]:
            print("  FAIL:", msg)
    info = harness.machine()
    trl_version = __import__("trl").__version__
    tf_version = __import__("transformers").__version__
    headers = ["config", "same ids + order", "TRL loss step 1 -> last", "max |dloss|",
               "max |d reward metric|", "max |d logps|", "max |d grad_norm| (info)",
               f"median step s TRL / {other}", f"tokens/s TRL / {other}",
               f"peak RSS MiB TRL / {other}", f"precompute s (pairs) TRL / {other}",
               f"load avg after TRL / {other}", "parity"]
    what = ("TRL's DPOTrainer and dpo_fast.trl's drop-in DPOTrainer, each on TRL's data "
            "preparation and collator (padding_free: the drop-in packs), in one process; "
            "configs: " + "; ".join(f"{n} {table[n]}" for n in args.configs) + ".\n"
            if args.dropin else
            "dpo_fast runs once per loss type and modifier (sigmoid_precompute reuses "
            "sigmoid's run: dpo_fast always uses its reference cache).\n")
    md = (f"# {other} vs TRL {trl_version} DPOTrainer: step-by-step parity ({info['date']})\n\n"
          f"SmolLM2-135M-Instruct fp32, Rotten Tomatoes train pairs, {args.steps} steps x "
          f"{args.batch_size} pairs in dpo_fast's order (TRL: the same rows, SequentialSampler),"
          f" max_length {args.max_length}, beta {args.beta}, lr {args.lr} (AdamW, linear decay,"
          f" no warm-up, clip 1.0), seed {args.seed}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'} in both; {info['host_cpu']}, "
          f"{info['threads']} threads, torch {info['torch']}, transformers {tf_version}.\n"
          "Tolerances: loss and rewards/* 1e-4 absolute (the loss max(1e-4, _loss_rtol x |loss|)"
          " where a config sets _loss_rtol), logps/* max(1e-4, 1e-5 relative); "
          "reward accuracy at steps where TRL's rewards are exactly 0 (ties) is not compared.\n"
          "Step time = wall time between the ends of consecutive steps (median of steps 2..); "
          "tokens = prompt + response of chosen and rejected, no padding; peak RSS = VmHWM "
          "from the start of the loop ("
          + ("each run in its own process" if not (args.dropin or args.no_isolate) else
             "the runs share one process, so a peak also holds what earlier runs left "
             "resident") + "); the 1-minute load "
          f"average after each run shows whether other work shared the {os.cpu_count()} "
          "cores. " + what + "\n"
          + harness.md_table(headers, _summary_rows(results, args.configs)))
    for name in args.configs:
        md += f"\n## {name}\n\n" + _step_table(results[name])
        for msg in results[name]["comparison"]["failures"]:
            md += f"- FAIL: {msg}\n"
    harness.write_results(args.name, {"machine": info, "args": vars(args), "trl": trl_version,
                                      "transformers": tf_version, "wall_s": wall,
                                      "results": _compact(results)}, md)
    print("\n" + md)
    if not all(results[n]["comparison"]["ok"] for n in args.configs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
