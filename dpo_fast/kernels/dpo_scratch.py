"""Scratch-budget preference loss: gradient formed during the forward pass (3 GEMMs).

For loss types whose per-pair loss depends only on that pair, a chunk of whole pairs holds
everything its gradient needs once its logits exist: per-token log-probs -> the pair's
sequence log-probs -> dL/d(sequence logp) -> dz = g (onehot - p) -> dh, dW. So each chunk's
logits are computed once ([tokens, V] fp32 scratch, bounded by ``max_scratch_bytes``) and
the backward recompute of the memory-flat path is saved: 3 GEMMs (logits, dh, dW) instead of
4, at the price of the scratch. The forward returns the loss and keeps dh / dW / db; the
backward only scales them by the upstream gradient (a scalar).

Same math as :mod:`dpo_fast.kernels.logprobs_torch` (per token) and
:func:`dpo_fast.preference_loss` (per pair); any device torch runs on.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .gemm import gemm_f32 as _gemm_f32

_ROW_BLOCK = 32  # rows per elementwise block: 32 x 49152 fp32 = 6 MiB, L3-resident

# Types whose batch loss is the mean of per-pair losses that each depend on one pair only.
PAIR_SEPARABLE = frozenset((
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo", "cpo",
))


def pair_chunks(lengths: Tensor, b: int, vocab: int, max_scratch_bytes: int) -> List[Tuple[int, int]]:
    """Greedy chunks [p0, p1) of whole pairs whose response tokens' [tokens, V] fp32 logits
    fit in ``max_scratch_bytes``. Empty list if a single pair does not fit."""
    per_pair = (lengths[:b] + lengths[b:]).tolist()
    chunks, p0, tok = [], 0, 0
    for j, t in enumerate(per_pair):
        if t * vocab * 4 > max_scratch_bytes:
            return []
        if tok + t > max_scratch_bytes // (vocab * 4) and j > p0:
            chunks.append((p0, j))
            p0, tok = j, 0
        tok += t
    chunks.append((p0, b))
    return chunks


def _logits(h: Tensor, wf: Tensor, bias: Optional[Tensor], out: Tensor,
            softcap: Optional[float], inv_temperature: float) -> Optional[Tensor]:
    """out <- z (fp32, in place); returns tanh(z0 / c) for the softcap chain, or None."""
    _gemm_f32(h, wf.T, out)
    if bias is not None:
        out += bias.float()
    t = None
    if softcap is not None:
        t = torch.tanh(out / softcap)
        torch.mul(t, softcap, out=out)
    if inv_temperature != 1.0:
        out *= inv_temperature
    return t


class ScratchPreferenceLoss(torch.autograd.Function):
    """loss = mean over pairs of the per-pair preference loss; grads formed in forward.

    forward(hidden [N, D], weight [V, D], bias [V] | None, opts: dict) -> loss [].
    No pair may be empty (the caller falls back to memory-flat otherwise), so the mean is
    over all B pairs. ``opts`` carries targets, seq (sanitized [N] sequence ids), b, ref,
    ignore_index, softcap, inv_temperature, chunks, the preference_loss keyword arguments,
    and a ``stats`` dict that the forward fills (per-sequence logps, rewards, metrics).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, opts):
        from ..losses import preference_loss

        targets, seq, b = opts["targets"], opts["seq"], opts["b"]
        ref, ig = opts["ref"], opts["ignore_index"]
        softcap, inv_t = opts["softcap"], opts["inv_temperature"]
        dev = hidden.device
        vocab, d = weight.shape
        valid = targets != ig
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)
        dw = torch.zeros(vocab, d, dtype=torch.float32, device=dev)
        db = torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None else None
        seq_logps = torch.zeros(2 * b, dtype=torch.float64, device=dev)
        ent_sum = torch.zeros(2 * b, dtype=torch.float64, device=dev)
        hit_sum = torch.zeros(2 * b, dtype=torch.float64, device=dev)
        losses, rew_c, rew_r = [], [], []
        max_tok = max(opts["chunk_tokens"])
        # Half inputs: on CUDA the GEMMs take them as they are (fp32 output / accumulation);
        # elsewhere the weight is upcast once (CPU has no fp32-output half GEMM).
        native = weight.dtype == torch.float32 or dev.type == "cuda"
        wf = weight if native else weight.float()
        row_block = _ROW_BLOCK if dev.type == "cpu" else max(1, hidden.shape[0])
        scratch = torch.empty(max_tok * vocab, dtype=torch.float32, device=dev)
        pair_of_seq = torch.arange(2 * b, device=dev) % b
        for p0, p1 in opts["chunks"]:
            pairs = torch.arange(p0, p1, device=dev)
            in_chunk = valid & (pair_of_seq[seq] >= p0) & (pair_of_seq[seq] < p1)
            rows = in_chunk.nonzero().flatten()
            h = hidden.index_select(0, rows)
            h = h if native else h.float()
            tgt = targets.index_select(0, rows)
            s_ids = seq.index_select(0, rows)
            z = scratch[: rows.numel() * vocab].view(rows.numel(), vocab)
            t = _logits(h, wf, bias, z, softcap, inv_t)
            # Softmax, target log-prob, entropy and argmax hit, in row blocks that stay in
            # cache (one DRAM pass over the chunk's logits instead of one per op).
            n_c = rows.numel()
            tok_logp = torch.empty(n_c, dtype=torch.float32, device=dev)
            ent = torch.empty(n_c, dtype=torch.float32, device=dev)
            hit = torch.empty(n_c, dtype=torch.bool, device=dev)
            for r in range(0, n_c, row_block):
                blk = z[r:r + row_block]
                blk -= blk.amax(dim=1, keepdim=True)
                zt = blk.gather(1, tgt[r:r + row_block, None])[:, 0]  # z[y] - max
                e = blk.exp()
                s_ = e.sum(dim=1)
                log_s = s_.log()
                ent[r:r + row_block] = log_s - torch.linalg.vecdot(e, blk) / s_
                tok_logp[r:r + row_block] = zt - log_s
                hit[r:r + row_block] = zt == 0
                torch.div(e, s_[:, None], out=blk)  # p
            # Per-pair loss on this chunk's sequences, and dL/d(sequence logp) per pair.
            seq_ids = torch.cat([pairs, pairs + b])
            sl = torch.zeros(2 * b, dtype=torch.float64, device=dev).index_add(
                0, s_ids, tok_logp.double())[seq_ids].float()
            lens = opts["lengths"][seq_ids]
            pc = sl[: p1 - p0].clone().requires_grad_()
            pr = sl[p1 - p0:].clone().requires_grad_()
            rc = ref[pairs] if ref is not None else None
            rr = ref[pairs + b] if ref is not None else None
            with torch.enable_grad():
                out = preference_loss(pc, pr, rc, rr, chosen_lengths=lens[: p1 - p0],
                                      rejected_lengths=lens[p1 - p0:], **opts["loss_kwargs"])
                gc, gr = torch.autograd.grad(out.losses.sum(), (pc, pr))
            losses.append(out.losses.detach())
            rew_c.append(out.chosen_rewards)
            rew_r.append(out.rejected_rewards)
            # dL/d(seq logp) of the batch mean, per token of the chunk.
            g_seq = torch.zeros(2 * b, dtype=torch.float32, device=dev)
            g_seq[seq_ids] = torch.cat([gc, gr]).float() / b
            g = g_seq.index_select(0, s_ids)
            # dz = g (onehot - p), through temperature and softcap; in place, in row blocks.
            for r in range(0, n_c, row_block):
                blk = z[r:r + row_block]
                gb = g[r:r + row_block, None]
                blk *= -gb * inv_t if inv_t != 1.0 else -gb
                blk.scatter_add_(1, tgt[r:r + row_block, None], gb * inv_t)
                if t is not None:
                    tb = t[r:r + row_block]
                    blk *= 1.0 - tb * tb
            zg = z if h.dtype == torch.float32 else z.to(h.dtype)  # GEMM operand, as autograd
            dh_rows = torch.empty(n_c, d, dtype=torch.float32, device=dev)
            _gemm_f32(zg, wf, dh_rows)
            dh.index_copy_(0, rows, dh_rows)
            _gemm_f32(zg.T, h, dw, accumulate=True)
            if db is not None:
                db += z.sum(dim=0)
            seq_logps.index_add_(0, s_ids, tok_logp.double())
            ent_sum.index_add_(0, s_ids, ent.double())
            hit_sum.index_add_(0, s_ids, hit.double())
        stats = opts["stats"]
        stats.update(seq_logps=seq_logps.float(), ent_sum=ent_sum, hit_sum=hit_sum,
                     losses=torch.cat(losses), chosen_rewards=torch.cat(rew_c),
                     rejected_rewards=torch.cat(rew_r))
        ctx.save_for_backward(dh, dw, db if db is not None else dw.new_empty(0))
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return stats["losses"].sum() / b

    @staticmethod
    def backward(ctx, g):
        dh, dw, db = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        # In place: these buffers belong to this node alone, and a copy would be weight-sized.
        if not bool(g == 1):
            dh.mul_(g)
            dw.mul_(g)
            db.mul_(g)
        return dh.to(hd), dw.to(wd), (db.to(bd) if bd is not None else None), None


def scratch_preference_loss(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, seq: Tensor,
    b: int, ref: Optional[Tensor], lengths: Tensor, *,
    ignore_index: int, softcap: Optional[float], inv_temperature: float,
    chunks: Sequence[Tuple[int, int]], loss_kwargs: Dict,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Runs :class:`ScratchPreferenceLoss`; returns (loss [], stats dict)."""
    stats: Dict[str, Tensor] = {}
    tok = (lengths[:b] + lengths[b:]).tolist()
    opts = dict(targets=targets, seq=seq, b=b, ref=ref, ignore_index=ignore_index,
                softcap=softcap, inv_temperature=inv_temperature, chunks=list(chunks),
                chunk_tokens=[sum(tok[p0:p1]) for p0, p1 in chunks], lengths=lengths,
                loss_kwargs=loss_kwargs, stats=stats)
    loss = ScratchPreferenceLoss.apply(hidden, weight, bias, opts)
    return loss, stats
