"""Naive reference computations for the tests. Shares no code with any dpo_fast backend.

``naive_logprobs`` materializes the full logits: in float64 it is the truth; in the
input dtype it is "same-dtype torch", whose error sets the tolerance budget.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def naive_logits(h: Tensor, w: Tensor, b: Optional[Tensor] = None, *,
                 softcap: Optional[float] = None, temperature: float = 1.0) -> Tensor:
    """Full [N, V] logits: h @ w.T + b, then softcap * tanh(z / softcap), then / temperature."""
    z = h @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def naive_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
    grads: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Tensor]:
    """Full-logits log-probs computed in ``dtype``; returns outputs ("logp", "lse",
    "entropy", "log_sum_sq" = log sum_v p_v^2, each 0.0 at ignored positions) and, if ``grads``
    (upstream grads keyed "logp", "lse", "entropy", each shaped like targets) is
    given, the input gradients "d_hidden", "d_weight", "d_bias"."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    z = naive_logits(h, w, b, softcap=softcap, temperature=temperature)
    logsm = torch.log_softmax(z, dim=-1)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    lse = torch.logsumexp(z, dim=-1) * mask
    ent = -(logsm.exp() * logsm).sum(-1) * mask
    with torch.no_grad():  # log sum p^2 (WPO's weights): forward only, no graph kept
        log_sum_sq = torch.logsumexp(2 * logsm, -1) * mask
    out = {"logp": logp, "lse": lse, "entropy": ent, "log_sum_sq": log_sum_sq}
    if grads:
        total = sum((out[k].to(torch.float64) * g.to(torch.float64)).sum() for k, g in grads.items())
        total.backward()
        out["d_hidden"] = h.grad
        out["d_weight"] = w.grad
        if b is not None:
            out["d_bias"] = b.grad
    return {k: v.detach() for k, v in out.items()}


def assert_close_to_truth(name: str, got: Tensor, same_dtype: Tensor, truth: Tensor,
                          dtype: torch.dtype) -> None:
    """The project's tolerance rule: max|got - truth| <= max|same-dtype torch - truth| + tol."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    ref = (same_dtype.double() - truth).abs().max().item() if got.numel() else 0.0
    tol = TOL[dtype]
    assert err <= ref + tol, f"{name}: max err {err:.3g} > same-dtype torch err {ref:.3g} + {tol:g}"
