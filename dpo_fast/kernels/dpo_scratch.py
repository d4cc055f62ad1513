"""Scratch-budget preference loss: the gradient is formed during the forward pass.

For loss types whose per-pair loss depends only on that pair, a chunk of whole pairs holds
everything its gradient needs once its log-probs are known: per-token log-probs -> the pair's
sequence log-probs -> dL/d(sequence logp) -> dz = g (onehot - p) -> dh, dW. Each chunk is
run forward, its loss coefficients taken, and its backward run right away, so the autograd
backward only scales the finished grads by the upstream (scalar) gradient. What the scratch
buys is the backward's recompute GEMM: logits kept from the forward need not be recomputed.

Two engines, same math as :mod:`dpo_fast.kernels.logprobs_torch` (per token) and
:func:`dpo_fast.preference_loss` (per pair):

* :class:`TorchChunks` (any device; the twin): a chunk's whole [tokens, V] fp32 logits live in
  the scratch (3 GEMMs: logits, dh, dW); a pair that does not fit sends the batch to the
  memory-flat path.
* :class:`CppChunks` (the C++ ops ``chunk_fwd`` / ``chunk_bwd``): the scratch keeps as many of
  the kernel's per-core vocabulary tiles as fit (the first ones of every core's range) and
  the backward recomputes the rest, so any budget works: 4 GEMMs at 0 bytes, 4 - f with a
  fraction f of the logits kept, 3 when a whole chunk fits. The kernel's per-core tiles run
  at the machine's GEMM peak where one big 2-thread GEMM does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .gemm import gemm_f32
from .options import HeadOptions

_ROW_BLOCK = 32  # rows per elementwise block: 32 x 49152 fp32 = 6 MiB, L3-resident

# Types whose batch loss is the mean of per-pair losses that each depend on one pair only.
PAIR_SEPARABLE = frozenset((
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo", "cpo",
    "unlikelihood",
))


def _logits(h: Tensor, wf: Tensor, bias: Optional[Tensor], out: Tensor,
            softcap: Optional[float], inv_temperature: float) -> Optional[Tensor]:
    """out <- z (fp32, in place); returns tanh(z0 / c) for the softcap chain, or None."""
    gemm_f32(h, wf.T, out)
    if bias is not None:
        out += bias.float()
    t = None
    if softcap is not None:
        t = torch.tanh(out / softcap)
        torch.mul(t, softcap, out=out)
    if inv_temperature != 1.0:
        out *= inv_temperature
    return t


MIN_CHUNK_ROWS = 512  # the C++ kernel's token tile: smaller chunks give it smaller GEMMs


def pair_chunks(lengths: Tensor, b: int, vocab: int, max_scratch_bytes: int, *,
                partial: bool = False) -> List[Tuple[int, int]]:
    """Greedy chunks [p0, p1) of whole pairs: a pair joins the chunk while the chunk's
    [tokens, V] fp32 logits still fit in ``max_scratch_bytes``.

    ``partial=False`` (the torch engine): every chunk must fit; empty list if a single pair
    does not. ``partial=True`` (the C++ engine, which keeps part of a chunk's logits): a pair
    also joins while the chunk has fewer than ``MIN_CHUNK_ROWS`` tokens (short pairs are
    grouped so the GEMMs stay large); never an empty list.
    """
    per_pair = (lengths[:b] + lengths[b:]).tolist()
    cap = max_scratch_bytes // (vocab * 4)
    if not partial and max(per_pair) > cap:
        return []
    min_rows = MIN_CHUNK_ROWS if partial else 0
    chunks, p0, tok = [], 0, 0
    for j, t in enumerate(per_pair):
        if j > p0 and tok + t > cap and tok >= min_rows:
            chunks.append((p0, j))
            p0, tok = j, 0
        tok += t
    chunks.append((p0, b))
    return chunks


def cpp_store_plan(n_rows: int, vocab: int, budget_bytes: int) -> Tuple[int, int, int]:
    """For the C++ engine at the current thread count: (floats the store uses, logit columns
    of V it keeps, floats that would keep all V) for a chunk of ``n_rows`` tokens and a
    ``budget_bytes`` scratch. The backward recomputes the other V - kept columns."""
    used, cols, full = torch.ops.dpo_fast_cpu.store_plan(n_rows, vocab, budget_bytes // 4)
    return int(used), int(cols), int(full)


class TorchChunks:
    """Whole-chunk scratch in torch ops: forward(h, tgt) -> (logp, ent, hit) per row, then
    backward(h, tgt, g, dh_rows, dw, db, first) adds the chunk's grads (dw / db in place;
    on the first chunk ``overwrites`` engines ignore their old contents; dh_rows / dw None:
    a frozen input, not computed). Built with (weight [V, D], bias [V] | None, head options,
    rows of the largest chunk, scratch budget in bytes)."""

    overwrites = False

    def __init__(self, weight: Tensor, bias: Optional[Tensor], head: HeadOptions,
                 max_rows: int, budget: int):
        dev = weight.device
        # Half inputs: on CUDA the GEMMs take them as they are (fp32 output / accumulation);
        # elsewhere the weight is upcast once (CPU has no fp32-output half GEMM).
        self.native = weight.dtype == torch.float32 or dev.type == "cuda"
        self.wf = weight if self.native else weight.float()
        self.bias, self.softcap, self.inv_t = bias, head.softcap, head.inv_temperature
        self.row_block = _ROW_BLOCK if dev.type == "cpu" else max(1, max_rows)
        self.scratch = torch.empty(max_rows * weight.shape[0], dtype=torch.float32, device=dev)

    def prepare(self, h: Tensor) -> Tensor:
        return h if self.native else h.float()

    def forward(self, h: Tensor, tgt: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        n_c, dev = h.shape[0], h.device
        z = self.scratch[: n_c * self.wf.shape[0]].view(n_c, self.wf.shape[0])
        self.z, self.t = z, _logits(h, self.wf, self.bias, z, self.softcap, self.inv_t)
        # Softmax, target log-prob, entropy and argmax hit, in row blocks that stay in
        # cache (one DRAM pass over the chunk's logits instead of one per op).
        tok_logp = torch.empty(n_c, dtype=torch.float32, device=dev)
        ent = torch.empty(n_c, dtype=torch.float32, device=dev)
        hit = torch.empty(n_c, dtype=torch.bool, device=dev)
        rb = self.row_block
        for r in range(0, n_c, rb):
            blk = z[r:r + rb]
            blk -= blk.amax(dim=1, keepdim=True)
            zt = blk.gather(1, tgt[r:r + rb, None])[:, 0]  # z[y] - max
            e = blk.exp()
            s_ = e.sum(dim=1)
            log_s = s_.log()
            ent[r:r + rb] = log_s - torch.linalg.vecdot(e, blk) / s_
            tok_logp[r:r + rb] = zt - log_s
            hit[r:r + rb] = zt == 0
            torch.div(e, s_[:, None], out=blk)  # p
        return tok_logp, ent, hit

    def backward(self, h: Tensor, tgt: Tensor, g: Tensor, dh_rows: Tensor, dw: Tensor,
                 db: Optional[Tensor], first: bool) -> None:
        z, t, inv_t, rb = self.z, self.t, self.inv_t, self.row_block
        # dz = g (onehot - p), through temperature and softcap; in place, in row blocks.
        for r in range(0, z.shape[0], rb):
            blk = z[r:r + rb]
            gb = g[r:r + rb, None]
            blk *= -gb * inv_t if inv_t != 1.0 else -gb
            blk.scatter_add_(1, tgt[r:r + rb, None], gb * inv_t)
            if t is not None:
                tb = t[r:r + rb]
                blk *= 1.0 - tb * tb
        zg = z if h.dtype == torch.float32 else z.to(h.dtype)  # GEMM operand, as autograd
        if dh_rows is not None:
            gemm_f32(zg, self.wf, dh_rows)
        if dw is not None:
            gemm_f32(zg.T, h, dw, accumulate=True)
        if db is not None:
            db += z.sum(dim=0)
        self.z = self.t = None


class CppChunks:
    """The C++ chunk ops; the store keeps as many whole vocabulary tiles as the budget
    allows for the largest chunk (:func:`cpp_store_plan`). Same interface as
    :class:`TorchChunks`."""

    overwrites = True  # the first chunk writes dW / db instead of adding to zeros

    def __init__(self, weight: Tensor, bias: Optional[Tensor], head: HeadOptions,
                 max_rows: int, budget: int):
        used, _, _ = cpp_store_plan(max_rows, weight.shape[0], budget)
        self.store = torch.empty(used, dtype=torch.float32)
        self.weight, self.bias = weight, bias
        self.softcap, self.inv_t = head.softcap, head.inv_temperature
        self.ig = head.ignore_index

    def prepare(self, h: Tensor) -> Tensor:
        return h

    def forward(self, h: Tensor, tgt: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        logp, self.row_max, ent, self.log_sum = torch.ops.dpo_fast_cpu.chunk_fwd(
            h, self.weight, self.bias, tgt, self.ig, self.softcap, self.inv_t, self.store)
        # The target is the argmax exactly when z[y] == max z, i.e. logp == -log_sum.
        return logp, ent, logp == -self.log_sum

    def backward(self, h: Tensor, tgt: Tensor, g: Tensor, dh_rows: Tensor, dw: Tensor,
                 db: Optional[Tensor], first: bool) -> None:
        torch.ops.dpo_fast_cpu.chunk_bwd(
            h, self.weight, self.bias, tgt, self.row_max, self.log_sum, g, self.ig,
            self.softcap, self.inv_t, self.store, dh_rows, dw, db, first)


@dataclass(frozen=True)
class ScratchPlan:
    """Everything the scratch engine needs besides hidden, weight and bias.

    Attributes:
        targets: [N] int64 next-token ids (``head.ignore_index`` on skipped positions).
        seq: [N] int64 sequence ids in [0, 2B) (any valid id, e.g. 0, at skipped positions).
        b: number of pairs B; none may be empty (the mean is over all B).
        ref: [2B] fp32 reference log-probs, or None.
        lengths: [2B] int64 response-token counts.
        head: the head options; ``head.impl == "cpu"`` runs :class:`CppChunks`, anything
            else :class:`TorchChunks`.
        chunks: ``(p0, p1)`` ranges of whole pairs (:func:`pair_chunks`).
        budget: scratch bytes.
        loss_kwargs: keyword arguments of :func:`dpo_fast.preference_loss` (loss_type, ...).
    """

    targets: Tensor
    seq: Tensor
    b: int
    ref: Optional[Tensor]
    lengths: Tensor
    head: HeadOptions
    chunks: Tuple[Tuple[int, int], ...]
    budget: int
    loss_kwargs: Mapping[str, Any]


class ScratchResult(NamedTuple):
    """Output of :func:`scratch_preference_loss` (everything but ``loss`` detached)."""

    loss: Tensor              # [] mean over the B pairs; differentiable
    seq_logps: Tensor         # [2B] fp32 per-sequence policy log-probs
    ent_sum: Tensor           # [2B] fp64 sums of the per-token entropies
    hit_sum: Tensor           # [2B] fp64 counts of tokens whose target is the argmax
    losses: Tensor            # [B] per-pair losses
    chosen_rewards: Tensor    # [B]
    rejected_rewards: Tensor  # [B]


class ScratchPreferenceLoss(torch.autograd.Function):
    """loss = mean over pairs of the per-pair preference loss; grads formed in forward.

    forward(hidden [N, D], weight [V, D], bias [V] | None, plan: ScratchPlan) -> the fields
    of :class:`ScratchResult`; only the loss is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        from ..losses import preference_loss

        targets, seq, b, ref = plan.targets, plan.seq, plan.b, plan.ref
        dev = hidden.device
        vocab, d = weight.shape
        valid = targets != plan.head.ignore_index
        tok = (plan.lengths[:b] + plan.lengths[b:]).tolist()
        max_rows = max(sum(tok[p0:p1]) for p0, p1 in plan.chunks)
        engine = CppChunks if plan.head.impl == "cpu" else TorchChunks
        eng = engine(weight, bias, plan.head, max_rows, plan.budget)
        # A frozen input (e.g. the LM head under LoRA) gets no GEMM and no buffer.
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_dh else None
        new = torch.empty if eng.overwrites else torch.zeros  # dW: a weight-sized memset saved
        dw = new(vocab, d, dtype=torch.float32, device=dev) if need_dw else None
        db = new(vocab, dtype=torch.float32, device=dev) if bias is not None else None
        seq_logps = torch.zeros(2 * b, dtype=torch.float64, device=dev)
        ent_sum = torch.zeros(2 * b, dtype=torch.float64, device=dev)
        hit_sum = torch.zeros(2 * b, dtype=torch.float64, device=dev)
        losses, rew_c, rew_r = [], [], []
        # Valid rows ordered by pair (stable), so each chunk's rows are one slice.
        pair_of_row = (seq % b).masked_fill(~valid, b)
        order = torch.sort(pair_of_row, stable=True).indices
        bounds = torch.searchsorted(pair_of_row[order], torch.arange(b + 1, device=dev)).tolist()
        for k, (p0, p1) in enumerate(plan.chunks):
            pairs = torch.arange(p0, p1, device=dev)
            rows = order[bounds[p0]:bounds[p1]]
            h = eng.prepare(hidden.index_select(0, rows))
            tgt = targets.index_select(0, rows)
            s_ids = seq.index_select(0, rows)
            tok_logp, ent, hit = eng.forward(h, tgt)
            # Per-pair loss on this chunk's sequences, and dL/d(sequence logp) per pair.
            seq_ids = torch.cat([pairs, pairs + b])
            sl = torch.zeros(2 * b, dtype=torch.float64, device=dev).index_add(
                0, s_ids, tok_logp.double())[seq_ids].float()
            lens = plan.lengths[seq_ids]
            pc = sl[: p1 - p0].clone().requires_grad_()
            pr = sl[p1 - p0:].clone().requires_grad_()
            rc = ref[pairs] if ref is not None else None
            rr = ref[pairs + b] if ref is not None else None
            with torch.enable_grad():
                out = preference_loss(pc, pr, rc, rr, chosen_lengths=lens[: p1 - p0],
                                      rejected_lengths=lens[p1 - p0:], **plan.loss_kwargs)
                # allow_unused: sft's loss does not depend on the rejected log-probs.
                gc, gr = torch.autograd.grad(out.losses.sum(), (pc, pr), allow_unused=True,
                                             materialize_grads=True)
            losses.append(out.losses.detach())
            rew_c.append(out.chosen_rewards)
            rew_r.append(out.rejected_rewards)
            # dL/d(seq logp) of the batch mean, per token of the chunk.
            g_seq = torch.zeros(2 * b, dtype=torch.float32, device=dev)
            g_seq[seq_ids] = torch.cat([gc, gr]).float() / b
            g = g_seq.index_select(0, s_ids)
            # zeros: the C++ backward skips rows whose gradient is 0 (sft's rejected tokens)
            dh_rows = (torch.zeros(rows.numel(), d, dtype=torch.float32, device=dev)
                       if need_dh else None)
            eng.backward(h, tgt, g, dh_rows, dw, db, k == 0)
            if need_dh:
                dh.index_copy_(0, rows, dh_rows)
            seq_logps.index_add_(0, s_ids, tok_logp.double())
            ent_sum.index_add_(0, s_ids, ent.double())
            hit_sum.index_add_(0, s_ids, hit.double())
        ctx.grads = (dh, dw, db)  # plain attributes: they are outputs of no graph
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        losses = torch.cat(losses)
        stats = (seq_logps.float(), ent_sum, hit_sum, losses, torch.cat(rew_c), torch.cat(rew_r))
        ctx.mark_non_differentiable(*stats)
        return (losses.sum() / b,) + stats

    @staticmethod
    def backward(ctx, g, *_stats):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the scratch engine forms its gradients once, in the forward: a "
                               "second backward through it (retain_graph) is not supported; "
                               "use max_scratch_bytes=None for that")
        out = []
        for x, dt in zip(grads, ctx.dtypes):
            if x is None:
                out.append(None)
                continue
            # In place: these buffers belong to this node alone, and a copy would be weight-sized.
            if not bool(g == 1):
                x.mul_(g)
            out.append(x.to(dt))
        return (*out, None)


def scratch_preference_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                            plan: ScratchPlan) -> ScratchResult:
    """Runs :class:`ScratchPreferenceLoss` on hidden [N, D], weight [V, D], bias [V] | None
    with the engine and scratch budget of ``plan``."""
    return ScratchResult(*ScratchPreferenceLoss.apply(hidden, weight, bias, plan))
