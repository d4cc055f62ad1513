"""Optimizer steps and held-out passes over pair indices: micro-batches of a step (dealt to
ranks), each through the policy (or its DDP / FSDP2 engine) and the fused head + loss,
backward weighted by the step's pair count, gradient clip, optimizer and scheduler step.

:class:`StepRunner` holds what :func:`dpo_fast.train.step.micro_batch_loss` needs for one
model (parts, compiled body, head settings, attention path, masks); it is built once the
policy is final (after LoRA) by :meth:`StepRunner.for_model`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import PreferenceExample
from ..models import ModelParts, head_settings, model_parts
from ..ops.dpo_loss import FusedPreferenceOutput
from ..ops.head_grad import WeightGradSink, weight_grad_sink
from . import batching, distributed, modeling, sharding
from .batching import PADDED, MicroBatch, make_micro_batch, pair_tokens, split_step
from .config import TrainConfig
from .step import STAT_KEYS, HeadSpec, batch_stats, micro_batch_loss, summarize

#: ``review(batch, out) -> out``: sees (and may replace) each micro-batch's loss output
#: before its backward (see :meth:`dpo_fast.train.TrainerCallback.on_micro_batch`).
Review = Callable[[MicroBatch, FusedPreferenceOutput], FusedPreferenceOutput]


@dataclass
class StepResult:
    """One optimizer step: ``sums`` (:data:`STAT_KEYS` -> float64 scalar, over all ranks),
    the gradient norm before clipping, the learning rate used, whether the step was applied
    (finite loss and gradient) and whether any rank asked to stop."""

    sums: Dict[str, torch.Tensor]
    grad_norm: float
    learning_rate: float
    finite: bool
    stop: bool


def stat_vector(stats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`batch_stats` as a float64 vector in ``STAT_KEYS`` order (one all-reduce)."""
    return torch.stack([stats[k].detach().double().cpu() for k in STAT_KEYS])


@dataclass
class StepRunner:
    """Runs pairs of ``examples`` through ``model`` (see the module docstring)."""

    config: TrainConfig
    model: torch.nn.Module
    parts: ModelParts
    body: torch.nn.Module
    head: HeadSpec
    attention: str
    masks: Any
    share_prompt: bool
    dist: distributed.DistContext
    device: torch.device
    pad_id: int
    poll: Callable[[], None] = lambda: None
    review: Optional[Review] = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, cfg: TrainConfig, dist: distributed.DistContext,
                  device: torch.device, pad_id: int, **hooks) -> "StepRunner":
        """Body / head parts, head settings, attention path and masks of ``model``; a shared-
        prompt layout only where a check forward shows it is exact."""
        parts = model_parts(model)
        body = torch.compile(parts.body) if cfg.torch_compile else parts.body
        softcap, temperature = head_settings(model, None, 1.0)
        compute = torch.bfloat16 if cfg.precision == "bf16" else None
        attention = batching.attention_path(model, cfg.attention, device)
        share = cfg.share_prompt and attention in batching.SHARING_PATHS
        if share:
            ok, detail = batching.verify_packing(model, attention, device, share_prompt=True)
            if not ok:
                warnings.warn(f"{type(model).__name__}: prompts are not shared in packed "
                              f"rows (a shared-prompt forward differs: {detail})",
                              RuntimeWarning, stacklevel=2)
                share = False
        return cls(cfg, model, parts, body, HeadSpec(softcap, temperature, compute, cfg.impl),
                   attention, batching.mask_plan(model), share, dist, device, pad_id, **hooks)

    # -- micro-batches ------------------------------------------------------------------

    def micro_batches(self, examples: Sequence[PreferenceExample],
                      idx: Sequence[int]) -> List[List[int]]:
        """The pairs ``idx`` cut into micro-batches (token budget / pair count)."""
        cost = (batching.padded_cost(examples) if self.attention == PADDED
                else batching.packed_cost(examples, self.share_prompt))
        return split_step(idx, cost, self.config.max_tokens_per_micro_batch,
                          self.config.micro_batch_size)

    def rank_micro_batches(self, examples: Sequence[PreferenceExample],
                           idx: Sequence[int]) -> List[Optional[List[int]]]:
        """This rank's micro-batches of the pairs ``idx`` (None = a zero-weight stand-in), the
        same count on every rank (see :mod:`dpo_fast.train.distributed`)."""
        world = self.dist.world_size
        if world == 1:
            return self.micro_batches(examples, idx)
        share = distributed.deal_pairs(idx, lambda i: pair_tokens(examples[i]), world)
        per_rank = [self.micro_batches(examples, s) if s else [] for s in share]
        return distributed.equalize(per_rank)[self.dist.rank]

    @functools.cached_property
    def head_sink(self) -> Optional[sharding.ShardedHeadGrad]:
        """Under FSDP2, the sink that takes the head's weight gradient by vocabulary block
        (:class:`dpo_fast.train.sharding.ShardedHeadGrad`), made at the first training step
        from the sharded head parameter; None otherwise."""
        return sharding.head_grad_sink(model_parts(self.model).weight, self.dist)

    def run(self, examples: Sequence[PreferenceExample], table: Optional[np.ndarray],
            idx: Sequence[int], module: Optional[torch.nn.Module] = None,
            sink: Optional[WeightGradSink] = None) -> Tuple[MicroBatch, FusedPreferenceOutput]:
        """(micro-batch, loss output) of pairs ``idx``; ``table`` [n, 2] holds their reference
        log-probs (None: reference-free). Through ``module`` (the DDP / FSDP2 engine, or the
        plain :class:`PreferenceModule`) when given; ``sink`` takes the head's weight
        gradient in the backward (:mod:`dpo_fast.ops.head_grad`)."""
        self.poll()
        mb = make_micro_batch([examples[i] for i in idx], self.attention, self.pad_id,
                              masks=self.masks, share_prompt=self.share_prompt).to(self.device)
        ref = None
        if table is not None:
            sel = table[np.asarray(idx)]
            ref = torch.from_numpy(np.concatenate([sel[:, 0], sel[:, 1]])).to(self.device)
        cfg = self.config
        # Under FSDP2 the parameters are swapped for gathered ones during the forward: read
        # the head from the module then, not from the parts found at setup.
        gathered = module is not None and self.dist.strategy == "fsdp2"

        # A pair over the token budget runs alone: checkpoint as many layers as keep its
        # activations to those of a row of the budget's length (1 - budget / row of them).
        row = mb.model_inputs["input_ids"].numel()
        long = (cfg.checkpoint_long_pairs and self.model.training
                and row > cfg.max_tokens_per_micro_batch)

        def compute(lm):
            parts = model_parts(lm) if gathered else self.parts
            with weight_grad_sink(sink), \
                    modeling.checkpointing(self.model, 1 - cfg.max_tokens_per_micro_batch / row) \
                    if long else contextlib.nullcontext():
                return micro_batch_loss(parts, mb, ref, self.head, cfg.loss_kwargs(),
                                        precision=cfg.precision,
                                        body=None if gathered else self.body)

        out = compute(self.model) if module is None else module(compute)
        if self.review is not None:
            out = self.review(mb, out)
        return mb, out

    # -- passes -------------------------------------------------------------------------

    def train_step(self, examples: Sequence[PreferenceExample], table: Optional[np.ndarray],
                   idx: np.ndarray, engine: torch.nn.Module, params: List[torch.nn.Parameter],
                   optimizer: torch.optim.Optimizer, scheduler, stop: bool = False
                   ) -> StepResult:
        """One optimizer step over the pairs ``idx`` (all ranks' pairs): micro-batches,
        backward, gradient reduction, clip, step. ``stop``: this process got a stop signal;
        the result's ``stop`` is True if any rank did (so all ranks stop at the same step)."""
        n_pairs = len(idx)
        # DDP / FSDP2 average gradients over ranks; the loss is a mean over the step's pairs.
        scale = float(self.dist.world_size) if self.dist.active else 1.0
        sums = torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64)
        mbs = self.rank_micro_batches(examples, idx.tolist())
        ddp = self.dist.strategy == "ddp"
        sink = self.head_sink
        for j, mb_idx in enumerate(mbs):
            real = mb_idx is not None
            sync = ddp and j < len(mbs) - 1
            with engine.no_sync() if sync else contextlib.nullcontext():
                mb, out = self.run(examples, table, mb_idx if real else [int(idx[0])], engine,
                                   sink)
                # Normalized by the step's pair count: cutting a step into micro-batches
                # differently (or accumulating, or over ranks) gives the same gradient.
                w = mb.num_pairs / n_pairs * scale if real else 0.0
                (out.loss * w).backward()
            if real:
                sums[:-1] += stat_vector(batch_stats(out, mb))
        sums[-1] = float(stop)
        sums = self.dist.all_sum(sums)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        stats = dict(zip(STAT_KEYS, sums[:-1].unbind()))
        finite = bool(torch.isfinite(norm)) and math.isfinite(float(stats["loss"]))
        if finite:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(stats, float(norm), lr, finite, bool(sums[-1] > 0))

    @torch.no_grad()
    def held_out(self, examples: Sequence[PreferenceExample], table: Optional[np.ndarray],
                 module: Optional[torch.nn.Module]) -> Dict[str, float]:
        """``eval/``-prefixed TRL metrics of the pairs ``examples`` (shortest first), summed
        over ranks; the model's train / eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        order = np.argsort([pair_tokens(e) for e in examples], kind="stable")
        sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        for idx in self.rank_micro_batches(examples, order.tolist()):
            mb, out = self.run(examples, table, idx if idx is not None else [int(order[0])],
                               module)
            if idx is not None:
                sums += stat_vector(batch_stats(out, mb))
        sums = self.dist.all_sum(sums)
        self.model.train(was_training)
        return summarize(dict(zip(STAT_KEYS, sums.tolist())), "eval/")
