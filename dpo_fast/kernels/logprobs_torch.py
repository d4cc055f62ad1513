"""Pure-PyTorch twin of the fused linear -> per-token log-prob kernels.

This is the readable definition of the op, the fallback on any device, and the
contract every other backend (Triton, C++) implements with the same signature.

Math, per valid position i (``targets[i] != ignore_index``) with head weight W [V, D]:

    z0 = h_i @ W.T + b                      (fp32 accumulation)
    z1 = c * tanh(z0 / c)                   (only if softcap c is set)
    z  = z1 * inv_temperature
    lse_i  = logsumexp(z) = m + log(s)  (m: row max, s = sum exp(z - m));  p = exp(z - lse_i)
    logp_i = z[y_i] - lse_i             (computed as (z[y_i] - m) - log(s))
    H_i    = lse_i - sum_v p_v z_v           (entropy, optional; computed as
             log(s) - sum_v e_v (z_v - m) / s with e_v = exp(z_v - m), m the running max)
    LSQ_i  = log sum_v p_v^2                 (log_sum_sq, optional, forward only; computed as
             log(q) - 2 log(s) with q = sum_v e_v^2 = sum_v exp(2 (z_v - m)), rescaled by
             exp(2 (m_old - m_new)) when the running max moves)

The forward returns the row max ``m`` and ``log_s`` = log(s) separately, not their sum:
a rounded fp32 lse carries up to half an ulp of |lse| (~5e-4 at |z| ~ 1e4), which would
dominate p = exp(z - lse) near p = 1, while log p = (z - m) - log_s is fp32-accurate. The
caller forms lse = m + log_s. The pair also gives the token accuracy for free: the target
is the argmax exactly when z[y] == m, i.e. when logp == -log_s.

Backward with upstream grads g_lp, g_lse, g_H (each [N] or absent):

    dz = g_lp * onehot(y) - p * (g_lp - g_lse + g_H * (z - lse + H))
    dz1 = dz * inv_temperature;  dz0 = dz1 * (1 - tanh^2(z0 / c))
    dh = dz0 @ W;  dW = dz0.T @ h;  db = dz0.sum(0)

Only valid rows are touched (ignored positions cost nothing), and the logits exist
only as one [token_chunk, vocab_chunk] tile at a time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Tile sizes: a [TOKEN_CHUNK, VOCAB_CHUNK] fp32 tile is 1 MiB and stays in L2.
TOKEN_CHUNK = 256
VOCAB_CHUNK = 1024


def _logits_tile(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int,
    softcap: Optional[float], inv_temperature: float,
) -> Tuple[Tensor, Optional[Tensor]]:
    """[n, v1-v0] fp32 logits after bias, softcap and temperature; also tanh (for backward)."""
    w = weight[v0:v1].float()
    z = h @ w.T
    if bias is not None:
        z += bias[v0:v1].float()
    t = None
    if softcap is not None:  # in place where possible: tile-sized temporaries are the memory
        t = torch.tanh(z.div_(softcap))
        torch.mul(t, softcap, out=z)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z, t


def logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    *,
    ignore_index: int,
    softcap: Optional[float],
    inv_temperature: float,
    with_entropy: bool,
    with_sum_sq: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the fused op.

    Args:
        hidden: [N, D] fp32/fp16/bf16. weight: [V, D] same dtype. bias: [V] or None.
        targets: [N] int64; ``ignore_index`` marks skipped positions.
        with_sum_sq: also return log_sum_sq (forward only: it has no backward).
    Returns:
        logp [N] fp32, row_max [N] fp32 (max logit m), entropy [N] fp32 (shape [0] unless
        ``with_entropy``), log_sum [N] fp32 (log sum exp(z - m)), log_sum_sq [N] fp32
        (log sum_v p_v^2, shape [0] unless ``with_sum_sq``); all 0.0 at ignored positions.
        lse = row_max + log_sum.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    row_max = torch.zeros(n, dtype=torch.float32, device=dev)
    log_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=dev)
    lsq = torch.zeros(n if with_sum_sq else 0, dtype=torch.float32, device=dev)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    for r0 in range(0, rows.numel(), TOKEN_CHUNK):
        idx = rows[r0:r0 + TOKEN_CHUNK]
        h = hidden.index_select(0, idx).float()
        tgt = targets.index_select(0, idx)
        m = torch.full((idx.numel(),), float("-inf"), device=dev)
        s = torch.zeros(idx.numel(), device=dev)
        sz = torch.zeros(idx.numel(), device=dev)  # sum exp(z - m) * (z - m), for the entropy
        q = torch.zeros(idx.numel(), device=dev)  # sum exp(2 (z - m)), for log_sum_sq
        zt = torch.zeros(idx.numel(), device=dev)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, vocab)
            z, _ = _logits_tile(h, weight, bias, v0, v1, softcap, inv_temperature)
            hit = (tgt >= v0) & (tgt < v1)
            if bool(hit.any()):
                local = (tgt - v0).clamp(0, v1 - v0 - 1)
                zt = torch.where(hit, z.gather(1, local[:, None]).squeeze(1), zt)
            m_new = torch.maximum(m, z.amax(dim=1))
            scale = torch.exp(m - m_new)
            z -= m_new[:, None]  # z - m, in place
            if with_entropy:
                e = torch.exp(z)
                # sum e^(z-m) (z-m) relative to the running max: no cancellation at |z| ~ 1e4.
                shift = torch.where(s > 0, (m - m_new) * s, 0.0)
                ez = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # row dots, no temp
                sz = (sz + shift) * scale + ez
            else:
                e = z.exp_()
            s = s * scale + e.sum(dim=1)
            if with_sum_sq:  # referenced to the running max: q >= 1 at the end, no underflow
                q = q * (scale * scale) + torch.bmm(e.unsqueeze(1), e.unsqueeze(2)).view(-1)
            m = m_new
        log_s = torch.log(s)
        row_max[idx] = m
        log_sum[idx] = log_s
        logp[idx] = (zt - m) - log_s
        if with_entropy:
            ent[idx] = log_s - sz / s
        if with_sum_sq:
            lsq[idx] = torch.log(q) - 2.0 * log_s
    return logp, row_max, ent, log_sum, lsq


def logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    row_max: Tensor,
    log_sum: Tensor,
    entropy: Optional[Tensor],
    grad_logp: Optional[Tensor],
    grad_lse: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    *,
    ignore_index: int,
    softcap: Optional[float],
    inv_temperature: float,
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the fused op: recomputes logits tile by tile.

    Args:
        row_max, log_sum, entropy: [N] fp32 from the forward (entropy only with
            grad_entropy).
        grad_logp, grad_lse, grad_entropy: [N] fp32 upstream grads, or None for zero.
        need_dh, need_dw: False for a frozen input: its GEMM is skipped and None returned
            (e.g. a frozen LM head under LoRA saves the dW GEMM and its [V, D] buffer).
    Returns:
        grad_hidden [N, D] (hidden.dtype) or None, grad_weight [V, D] (weight.dtype) or
        None, grad_bias [V] (bias.dtype) or None.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(vocab, d, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None else None
    zero = torch.zeros(n, dtype=torch.float32, device=dev)
    g_lp = grad_logp.float() if grad_logp is not None else zero
    g_lse = grad_lse.float() if grad_lse is not None else zero
    use_ent = grad_entropy is not None
    valid = targets != ignore_index
    # Rows whose upstream grads are all zero contribute nothing: skip them too.
    live = valid & ((g_lp != 0) | (g_lse != 0) | ((grad_entropy != 0) if use_ent else False))
    rows = live.nonzero().squeeze(1)
    for r0 in range(0, rows.numel(), TOKEN_CHUNK):
        idx = rows[r0:r0 + TOKEN_CHUNK]
        h = hidden.index_select(0, idx).float()
        tgt = targets.index_select(0, idx)
        m_c = row_max.index_select(0, idx)[:, None]
        ls_c = log_sum.index_select(0, idx)[:, None]
        a = g_lp.index_select(0, idx)
        coef = (a - g_lse.index_select(0, idx))[:, None]
        if use_ent:
            ge = grad_entropy.float().index_select(0, idx)[:, None]
            he = entropy.index_select(0, idx)[:, None]
        dh_c = torch.zeros(idx.numel(), d, dtype=torch.float32, device=dev) if need_dh else None
        for v0 in range(0, vocab, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, vocab)
            z, t = _logits_tile(h, weight, bias, v0, v1, softcap, inv_temperature)
            # In place on the tile: log p = (z - m) - log_sum (fp32-accurate even at |z| ~ 1e4),
            # then dz = -p * (coef + g_H (log p + H)) without tile-sized temporaries.
            dz = z.sub_(m_c).sub_(ls_c)
            if use_ent:
                p = torch.exp(dz)
                dz.add_(he).mul_(ge).add_(coef).mul_(p).neg_()
                del p
            else:
                dz.exp_().mul_(coef).neg_()
            hit = (tgt >= v0) & (tgt < v1)
            if bool(hit.any()):
                local = (tgt - v0).clamp(0, v1 - v0 - 1)
                dz.scatter_add_(1, local[:, None], torch.where(hit, a, 0.0)[:, None])
            if inv_temperature != 1.0:
                dz.mul_(inv_temperature)
            if t is not None:
                dz.mul_(t.mul_(t).neg_().add_(1.0))
            if need_dh:
                dh_c.addmm_(dz, weight[v0:v1].float())
            if need_dw:
                dw[v0:v1].addmm_(dz.T, h)
            if db is not None:
                db[v0:v1] += dz.sum(dim=0)
        if need_dh:
            dh.index_copy_(0, idx, dh_c)
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
        db.to(bias.dtype) if db is not None else None,
    )
