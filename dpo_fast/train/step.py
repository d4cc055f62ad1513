"""One micro-batch through the policy: body forward -> fused head + preference loss.

No ``[tokens x vocab]`` logits exist: the body gives the last hidden states and
:func:`dpo_fast.fused_preference_loss` applies the LM head tile by tile, touching only response
positions (prompt positions have ``targets == -100`` and never reach the head).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..models import ModelParts
from ..ops.dpo_loss import (
    FusedPreferenceOutput,
    fused_preference_loss,
    fused_preference_loss_padded,
)
from .batching import IGNORE_INDEX, MicroBatch

#: The per-micro-batch sums :func:`batch_stats` returns (all detached float64 scalars).
STAT_KEYS = ("pairs", "loss", "chosen_rewards", "rejected_rewards", "margins", "accuracies",
             "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens",
             "entropy", "token_hits", "tokens")


@dataclass(frozen=True)
class HeadSpec:
    """How the fused op applies the head: ``softcap`` / ``temperature`` from the config
    (:func:`dpo_fast.models.head_settings`), compute dtype (None = the weight's), backend."""

    softcap: Optional[float]
    temperature: float
    compute_dtype: Optional[torch.dtype] = None
    impl: str = "auto"


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast of the body for ``precision == "bf16"``, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def body_forward(body: torch.nn.Module, batch: MicroBatch) -> Tensor:
    """Last hidden states: packed ``[L, D]`` or padded ``[2B, T, D]``."""
    out = body(**batch.model_inputs, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[0] if batch.layout == "packed" else h


def micro_batch_loss(parts: ModelParts, batch: MicroBatch, ref_logps: Optional[Tensor],
                     head: HeadSpec, loss_kwargs: Dict[str, Any], *,
                     precision: str = "fp32", body: Optional[torch.nn.Module] = None
                     ) -> FusedPreferenceOutput:
    """Preference loss of one micro-batch (B pairs; ``ref_logps [2B]`` or None)."""
    dev = parts.weight.device
    with autocast_context(precision, dev):
        hidden = body_forward(body if body is not None else parts.body, batch)
    if batch.hidden_index is not None:  # shared-prompt row: the rows that predict responses
        hidden = hidden.index_select(0, batch.hidden_index)
    w, bias = parts.weight, parts.bias
    dt = head.compute_dtype
    if dt is not None:
        hidden, w = hidden.to(dt), w.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif hidden.dtype != w.dtype:
        hidden = hidden.to(w.dtype)
    common = dict(bias=bias, softcap=head.softcap, temperature=head.temperature,
                  ignore_index=IGNORE_INDEX, impl=head.impl, **loss_kwargs)
    if batch.layout == "packed":
        return fused_preference_loss(hidden, w, batch.targets, batch.seq_index, ref_logps,
                                     num_pairs=batch.num_pairs, **common)
    return fused_preference_loss_padded(hidden, w, batch.targets, ref_logps, **common)


def batch_stats(out: FusedPreferenceOutput, batch: MicroBatch) -> Dict[str, Tensor]:
    """Detached sums over the micro-batch's pairs and response tokens (for TRL-named
    metrics: sums are added over micro-batches and steps, then divided once)."""
    b = batch.num_pairs
    with torch.no_grad():
        lc = out.lengths[:b].sum().double()
        lr = out.lengths[b:].sum().double()

        def wsum(x: Tensor, n: Tensor) -> Tensor:  # mean * count; a NaN mean over 0 tokens is 0
            return torch.nan_to_num(x.double() * n, nan=0.0)

        return {
            "pairs": torch.tensor(float(b), dtype=torch.float64),
            "loss": out.losses.detach().double().sum(),
            "chosen_rewards": out.chosen_rewards.double().sum(),
            "rejected_rewards": out.rejected_rewards.double().sum(),
            "margins": out.margins.double().sum(),
            "accuracies": out.accuracies.double().sum(),
            "chosen_logps": out.policy_logps[:b].double().sum(),
            "rejected_logps": out.policy_logps[b:].double().sum(),
            "chosen_tokens": lc,
            "rejected_tokens": lr,
            "entropy": wsum(out.chosen_entropy, lc) + wsum(out.rejected_entropy, lr),
            "token_hits": wsum(out.chosen_token_accuracy, lc)
            + wsum(out.rejected_token_accuracy, lr),
            "tokens": torch.tensor(float(batch.num_tokens), dtype=torch.float64),
        }


def summarize(sums: Dict[str, float], prefix: str = "") -> Dict[str, float]:
    """TRL-named means from accumulated :func:`batch_stats` sums."""
    n = max(sums.get("pairs", 0.0), 1.0)
    toks = max(sums.get("chosen_tokens", 0.0) + sums.get("rejected_tokens", 0.0), 1.0)
    out = {
        "loss": sums["loss"] / n,
        "rewards/chosen": sums["chosen_rewards"] / n,
        "rewards/rejected": sums["rejected_rewards"] / n,
        "rewards/margins": sums["margins"] / n,
        "rewards/accuracies": sums["accuracies"] / n,
        "logps/chosen": sums["chosen_logps"] / n,
        "logps/rejected": sums["rejected_logps"] / n,
        "entropy": sums["entropy"] / toks,
        "mean_token_accuracy": sums["token_hits"] / toks,
    }
    return {prefix + k: float(v) for k, v in out.items()}
