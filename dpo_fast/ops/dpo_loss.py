"""Fused preference loss: hidden states + LM head -> DPO (or any preference) loss, no logits.

Packed layout (no padding needed): all 2B sequences of a batch concatenated along one token
axis. ``seq_index[i]`` says which sequence token position ``i`` belongs to; sequences
``0..B-1`` are the chosen responses and ``B..2B-1`` the rejected ones (TRL / Liger order:
pair ``j`` is ``(j, B + j)``). ``targets[i]`` is the next-token id predicted at position ``i``
(``ignore_index`` on prompt and padding positions), so each sequence's log-prob is the sum of
the per-token log-probs of its response tokens.

Data flow: per-token log-probs (and, from the same pass, entropy and whether the target is
the argmax) come from the fused op :func:`dpo_fast.linear_logprobs` (no [N, V] tensor);
a segmented sum gives the [2B] sequence log-probs; :func:`dpo_fast.preference_loss` turns
them into the loss. In backward the per-sequence coefficient dL/d(sequence logp) reaches
every response token of its sequence and the log-prob backward recomputes the logits tile by
tile, so memory stays O(N + tile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..kernels.dpo_scratch import (
    PAIR_SEPARABLE, ScratchPlan, pair_chunks, scratch_preference_loss,
)
from ..kernels.options import HeadOptions
from ..losses import PreferenceLossOutput, preference_loss, wpo_weights
from .head_grad import active_sink, blockwise_backward
from .logprobs import (
    TRITON_IMPLS, backend_module, fake_grads, grads_or_empty, head_grads, prepare_inputs,
)

_EMPTY_POLICIES = ("error", "drop")

# max_scratch_bytes="auto" on the C++ CPU backend: logits kept per chunk of pairs so that the
# backward recomputes fewer vocabulary tiles. Fixed (independent of batch, length and
# vocabulary), so memory stays O(N D) + this; see docs/design.md for the measured trade-off.
DEFAULT_CPU_SCRATCH_BYTES = 40 << 20


@dataclass(frozen=True)
class FusedPreferenceOutput:
    """Result of :func:`fused_preference_loss`. ``B`` = number of pairs kept.

    Attributes:
        loss: [] scalar mean over the kept pairs; differentiable w.r.t. hidden, weight, bias.
        losses, chosen_rewards, rejected_rewards, margins, accuracies: [B] as in
            :class:`dpo_fast.PreferenceLossOutput` (over the kept pairs).
        policy_logps: [2B_in] detached per-sequence policy log-probs (all input sequences,
            chosen first; 0.0 for a sequence with no response token).
        lengths: [2B_in] int64 response-token counts per sequence.
        kept: [B_in] bool, which pairs entered the loss (all True unless
            ``empty_sequences="drop"`` dropped some).
        num_dropped: number of pairs dropped for having an empty response.
        chosen_entropy, rejected_entropy: [] mean softmax entropy over the response tokens of
            the chosen / rejected sequences (detached; NaN if there are none).
        chosen_token_accuracy, rejected_token_accuracy: [] fraction of those tokens whose
            target is the argmax of the logits (detached; NaN if there are none).
        preference: the full :class:`dpo_fast.PreferenceLossOutput` (per-type terms, ...).
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracies: Tensor
    policy_logps: Tensor
    lengths: Tensor
    kept: Tensor
    num_dropped: int
    chosen_entropy: Tensor
    rejected_entropy: Tensor
    chosen_token_accuracy: Tensor
    rejected_token_accuracy: Tensor
    preference: PreferenceLossOutput

    @property
    def accuracy(self) -> Tensor:
        """[] mean reward accuracy (TRL's ``rewards/accuracies``)."""
        return self.accuracies.mean()


def _check_seq_inputs(targets: Tensor, seq_index: Tensor, ref_logps: Optional[Tensor],
                      num_pairs: Optional[int], ignore_index: int) -> int:
    """Validates the packing and returns B (number of pairs). While ``torch.compile`` traces,
    the checks that read tensor values are skipped (as the op's target-range check is) and B
    must come from ``ref_logps`` or ``num_pairs``."""
    compiling = torch.compiler.is_compiling()
    if not isinstance(seq_index, Tensor) or seq_index.dtype.is_floating_point \
            or seq_index.dtype == torch.bool:
        raise ValueError("seq_index must be an integer tensor")
    if seq_index.shape != targets.shape:
        raise ValueError(f"seq_index shape {tuple(seq_index.shape)} must equal targets shape "
                         f"{tuple(targets.shape)}")
    if seq_index.device != targets.device:
        raise ValueError(f"seq_index is on {seq_index.device} but targets on {targets.device}")
    if ref_logps is not None:
        if not isinstance(ref_logps, Tensor) or ref_logps.dim() != 1 \
                or not ref_logps.dtype.is_floating_point:
            raise ValueError("ref_logps must be a 1-D float tensor [2B]")
        if ref_logps.numel() % 2:
            raise ValueError(f"ref_logps must have 2B entries (chosen then rejected), got "
                             f"{ref_logps.numel()}")
        b = ref_logps.numel() // 2
        if num_pairs is not None and num_pairs != b:
            raise ValueError(f"num_pairs={num_pairs} but ref_logps has {ref_logps.numel()} "
                             f"entries (expected {2 * num_pairs})")
        if not compiling and not bool(torch.isfinite(ref_logps).all()):
            bad = (~torch.isfinite(ref_logps)).nonzero().flatten()[:5].tolist()
            raise ValueError(f"ref_logps has non-finite values at sequences {bad}")
    elif num_pairs is not None:
        b = int(num_pairs)
    elif compiling:
        raise ValueError("under torch.compile pass ref_logps or num_pairs: the number of pairs "
                         "cannot be read from the data while tracing")
    else:
        valid = targets != ignore_index
        top = int(seq_index[valid].max()) + 1 if bool(valid.any()) else 0
        b = (top + 1) // 2
    if b < 1:
        raise ValueError("the batch holds no pair (no response token, no ref_logps, no num_pairs)")
    if compiling:
        return b
    valid = targets != ignore_index
    sv = seq_index[valid]
    bad = (sv < 0) | (sv >= 2 * b)
    if bool(bad.any()):
        pos = valid.nonzero().flatten()[bad][:5].tolist()
        raise ValueError(f"seq_index must be in [0, {2 * b}) at response positions; "
                         f"{int(bad.sum())} out of range, first at positions {pos}: "
                         f"{sv[bad][:5].tolist()}")
    return b


# ------------------------------------------------------------------ sequence-level op
# Forward: per-token log-probs (plus entropy, row max and log-sum for the metrics, and with
# with_sum_sq log sum_v p_v^2 for WPO) and their per-sequence sums. Backward: takes dL/d(sequence logp) [S] and hands it to the
# log-prob backward; the Triton backend gathers it per token inside its kernels, the CPU
# backends expand it to an [N] vector (O(N), never [N, V]). The head options are the ops'
# keyword-only arguments (HeadOptions.op_kwargs), as in ``ops/logprobs.py``.


@torch.library.custom_op("dpo_fast::seq_logprobs_fwd", mutates_args=())
def _seq_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, seq: Tensor, *,
    num_seqs: int, ignore_index: int, softcap: Optional[float], inv_temperature: float,
    impl: str, with_sum_sq: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # log_sum_sq (log sum_v p_v^2, [N], or [0] without with_sum_sq) is forward-only.
    logp, row_max, ent, log_sum, log_sum_sq = backend_module(impl).logprobs_forward(
        hidden, weight, bias, targets, ignore_index=ignore_index, softcap=softcap,
        inv_temperature=inv_temperature, with_entropy=True, with_sum_sq=with_sum_sq,
    )
    # float64 accumulation: a sequential fp32 sum of hundreds of tokens would lose more than
    # the per-token op's own error. Ignored positions add exactly 0.0 (to sequence 0).
    seq_logps = torch.zeros(num_seqs, dtype=torch.float64, device=logp.device).index_add(
        0, seq, logp.double()).float()
    return seq_logps, logp, ent, row_max, log_sum, log_sum_sq


@_seq_fwd.register_fake
def _(hidden, weight, bias, targets, seq, *, num_seqs, with_sum_sq=False, **_opts):
    n = targets.shape[0]
    per_tok = hidden.new_empty((n,), dtype=torch.float32)
    return (hidden.new_empty((num_seqs,), dtype=torch.float32), per_tok,
            torch.empty_like(per_tok), torch.empty_like(per_tok), torch.empty_like(per_tok),
            hidden.new_empty((n if with_sum_sq else 0,), dtype=torch.float32))


@torch.library.custom_op("dpo_fast::seq_logprobs_bwd", mutates_args=())
def _seq_bwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, seq: Tensor,
    row_max: Tensor, log_sum: Tensor, seq_grad: Tensor, *, need_dh: bool, need_dw: bool,
    ignore_index: int, softcap: Optional[float], inv_temperature: float, impl: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    backend = backend_module(impl)
    kw = dict(ignore_index=ignore_index, softcap=softcap, inv_temperature=inv_temperature,
              need_dh=need_dh, need_dw=need_dw)
    g = seq_grad.float()
    if impl in TRITON_IMPLS:  # gather seq_grad[seq_index] per token inside their kernels
        dh, dw, db = backend.logprobs_backward(
            hidden, weight, bias, targets, row_max, log_sum, None, None, None, None,
            seq_index=seq, seq_grad=g, **kw)
    else:
        g_tok = g.index_select(0, seq) * (targets != ignore_index)
        dh, dw, db = backend.logprobs_backward(
            hidden, weight, bias, targets, row_max, log_sum, None, g_tok, None, None, **kw)
    return grads_or_empty(hidden, dh, dw, db)


@_seq_bwd.register_fake
def _(hidden, weight, bias, *_tensors, need_dh, need_dw, **_opts):
    return fake_grads(hidden, weight, bias, need_dh, need_dw)


def _seq_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.set_materialize_grads(False)
    hidden, weight, bias, targets, seq = inputs
    kw = dict(keyword_only_inputs)
    del kw["num_seqs"]
    kw.pop("with_sum_sq", None)
    ctx.opts = HeadOptions(**kw)
    # A weight-gradient sink (FSDP2: dW by vocabulary block, each reduced to the rank that
    # holds those rows) applies to fp32 heads without bias on the CPU backends.
    ctx.sink = active_sink(hidden, weight, bias, ctx.opts.impl)
    _, _, _, row_max, log_sum, _ = output
    ctx.save_for_backward(hidden, weight, bias, targets, seq, row_max, log_sum)


def _seq_backward(ctx, g_seq, *_unused):
    hidden, weight, bias, targets, seq, row_max, log_sum = ctx.saved_tensors
    if g_seq is None:
        return (None,) * 5
    if ctx.sink is not None and ctx.needs_input_grad[1]:
        o = ctx.opts
        g_tok = g_seq.float().index_select(0, seq)
        dh = blockwise_backward(
            backend_module(o.impl), hidden, weight, targets, row_max, log_sum, g_tok,
            ignore_index=o.ignore_index, softcap=o.softcap, inv_temperature=o.inv_temperature,
            need_dh=ctx.needs_input_grad[0], bounds=ctx.sink.bounds, emit=ctx.sink)
        return (dh, None, None, None, None)
    dh, dw, db = _seq_bwd(hidden, weight, bias, targets, seq, row_max, log_sum, g_seq,
                          need_dh=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
                          **ctx.opts.op_kwargs())
    return head_grads(ctx, bias, dh, dw, db, 2)


torch.library.register_autograd("dpo_fast::seq_logprobs_fwd", _seq_backward,
                                setup_context=_seq_setup)


class _TritonDPOSigmoid(torch.autograd.Function):
    """Mean sigmoid (c)DPO loss over B pairs from the Triton kernel, which returns the
    per-pair loss and its closed-form gradients in one launch."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, eps):
        from ..kernels import dpo_triton

        losses, gc, gr, rew_c, rew_r = dpo_triton.dpo_sigmoid_loss(
            torch.cat([pc, pr]).float(), torch.cat([rc, rr]).float(), beta, eps)
        ctx.save_for_backward(gc, gr)
        ctx.mark_non_differentiable(rew_c, rew_r)
        return losses, rew_c, rew_r

    @staticmethod
    def backward(ctx, g_losses, _g_rc, _g_rr):
        gc, gr = ctx.saved_tensors
        if g_losses is None:
            return (None,) * 6
        return (g_losses * gc, g_losses * gr) + (None,) * 4


def _triton_sigmoid(pc, pr, rc, rr, beta, eps) -> PreferenceLossOutput:
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps!r}")
    losses, rew_c, rew_r = _TritonDPOSigmoid.apply(pc, pr, rc, rr, beta, eps)
    return PreferenceLossOutput(
        loss=losses.mean(), losses=losses, terms=(losses,), chosen_rewards=rew_c,
        rejected_rewards=rew_r, margins=rew_c - rew_r, accuracies=(rew_c > rew_r).float())


# ------------------------------------------------- fused_preference_loss, step by step


@dataclass(frozen=True)
class _Packed:
    """A validated packed batch of B pairs (N positions), ready for either loss path."""

    hidden: Tensor          # [N, D], flattened and contiguous
    weight: Tensor          # [V, D]
    bias: Optional[Tensor]  # [V] or None
    targets: Tensor         # [N] int64
    seq: Tensor             # [N] int64 sequence ids, 0 at ignored positions
    valid: Tensor           # [N] bool, response positions
    b: int
    lengths: Tensor         # [2B] int64 response-token counts
    empty: Tensor           # [B] bool, pairs with a sequence of no response token
    ref: Optional[Tensor]   # [2B] fp32 reference log-probs on the batch's device, or None
    head: HeadOptions


@dataclass(frozen=True)
class _LossParts:
    """What a loss path hands to the output assembly."""

    pref: PreferenceLossOutput
    policy_logps: Tensor    # [2B_in] detached
    kept: Tensor            # [B_in] bool
    num_dropped: int
    metrics: Dict[str, Tensor]  # the entropy / token-accuracy fields of the output, [] each


def _check_empty_pairs(empty: Tensor, policy: str, compiling: bool) -> None:
    if compiling:
        torch._assert_async(~empty.any(), "a pair has a sequence with no response token")
    elif bool(empty.any()):
        if policy == "error":
            pairs = empty.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{int(empty.sum())} pair(s) have a sequence with no response "
                             f"token (first pairs {pairs}); pass empty_sequences='drop' to "
                             "drop them")
        if bool(empty.all()):
            raise ValueError("every pair has an empty sequence; nothing to train on")


def _pack(hidden, weight, targets, seq_index, ref_logps, *, bias, softcap, temperature,
          ignore_index, num_pairs, empty_sequences, impl) -> _Packed:
    """Validates the arguments of :func:`fused_preference_loss` (ValueError naming the
    argument) and returns the batch flattened, with lengths and empty pairs."""
    if empty_sequences not in _EMPTY_POLICIES:
        raise ValueError(f"empty_sequences must be one of {_EMPTY_POLICIES}, got "
                         f"{empty_sequences!r}")
    # While torch.compile traces: one graph (no value-dependent branch), the memory-flat path,
    # no empty-pair dropping (it changes shapes); an empty pair fails a runtime assert.
    compiling = torch.compiler.is_compiling()
    if compiling and empty_sequences == "drop":
        raise ValueError("empty_sequences='drop' changes the batch's shape and cannot be "
                         "traced by torch.compile; drop such pairs before the loss")
    if not isinstance(targets, Tensor):
        raise ValueError("targets must be a tensor")
    targets = targets.reshape(-1)
    seq_index = seq_index.reshape(-1) if isinstance(seq_index, Tensor) else seq_index
    b = _check_seq_inputs(targets, seq_index, ref_logps, num_pairs, ignore_index)
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor [N, D]")
    h2, w, targets, head = prepare_inputs(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, bias, ignore_index=ignore_index,
        softcap=softcap, temperature=temperature, impl=impl)
    valid = targets != ignore_index
    seq = torch.where(valid, seq_index.to(torch.int64), torch.zeros_like(targets))
    dev = targets.device
    lengths = torch.zeros(2 * b, dtype=torch.int64, device=dev).index_add(
        0, seq, valid.to(torch.int64))
    empty = (lengths[:b] == 0) | (lengths[b:] == 0)
    _check_empty_pairs(empty, empty_sequences, compiling)
    ref = ref_logps.to(device=dev, dtype=torch.float32) if ref_logps is not None else None
    return _Packed(h2, w, bias, targets, seq, valid, b, lengths, empty, ref, head)


def _scratch_chunks(batch: _Packed, max_scratch_bytes, loss_type
                    ) -> Tuple[List[Tuple[int, int]], int]:
    """The engine choice: (chunks of pairs, budget) for the scratch engine, or ([], 0) for
    the memory-flat path (see ``max_scratch_bytes`` in :func:`fused_preference_loss`)."""
    if torch.compiler.is_compiling():
        return [], 0
    if torch.is_grad_enabled() and active_sink(batch.hidden, batch.weight, batch.bias,
                                               batch.head.impl) is not None:
        return [], 0  # the scratch engine forms the whole [V, D] dW in the forward
    if isinstance(max_scratch_bytes, str):
        if max_scratch_bytes != "auto":
            raise ValueError(f"max_scratch_bytes must be a positive int, None or 'auto', got "
                             f"{max_scratch_bytes!r}")
        max_scratch_bytes = DEFAULT_CPU_SCRATCH_BYTES if batch.head.impl == "cpu" else None
    if max_scratch_bytes is None:
        return [], 0
    if not (isinstance(max_scratch_bytes, int) and not isinstance(max_scratch_bytes, bool)
            and max_scratch_bytes > 0):
        raise ValueError(f"max_scratch_bytes must be a positive int, None or 'auto', got "
                         f"{max_scratch_bytes!r}")
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    # Forming the gradient in the forward only pays when a gradient is wanted.
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (batch.hidden, batch.weight, batch.bias))
    if not (wants_grad and not bool(batch.empty.any()) and all(t in PAIR_SEPARABLE
                                                               for t in types)):
        return [], 0
    # Empty when a pair's logits exceed the budget (torch engine): the memory-flat path runs.
    chunks = pair_chunks(batch.lengths, batch.b, batch.weight.shape[0], max_scratch_bytes,
                         partial=batch.head.impl == "cpu")
    return chunks, max_scratch_bytes


def _scratch_loss(batch: _Packed, chunks: List[Tuple[int, int]], budget: int,
                  loss_kwargs: Dict[str, Any]) -> _LossParts:
    """The scratch engine: gradients formed during the forward, per chunk of pairs."""
    b, lengths = batch.b, batch.lengths
    res = scratch_preference_loss(batch.hidden, batch.weight, batch.bias, ScratchPlan(
        targets=batch.targets, seq=batch.seq, b=b, ref=batch.ref, lengths=lengths,
        head=batch.head, chunks=tuple(chunks), budget=budget, loss_kwargs=loss_kwargs))
    rc_, rr_ = res.chosen_rewards, res.rejected_rewards
    pref = PreferenceLossOutput(
        loss=res.loss, losses=res.losses, terms=(res.losses,), chosen_rewards=rc_,
        rejected_rewards=rr_, margins=rc_ - rr_, accuracies=(rc_ > rr_).float())
    n_c, n_r = lengths[:b].sum(), lengths[b:].sum()
    metrics = dict(
        chosen_entropy=(res.ent_sum[:b].sum() / n_c).float(),
        rejected_entropy=(res.ent_sum[b:].sum() / n_r).float(),
        chosen_token_accuracy=(res.hit_sum[:b].sum() / n_c).float(),
        rejected_token_accuracy=(res.hit_sum[b:].sum() / n_r).float())
    return _LossParts(pref, res.seq_logps, ~batch.empty, 0, metrics)


def _uses_triton_sigmoid(batch: _Packed, loss_kwargs: Dict[str, Any]) -> bool:
    """Plain (c)DPO sigmoid with a reference on a Triton backend: the one-launch kernel."""
    return (batch.head.impl in TRITON_IMPLS and batch.ref is not None
            and loss_kwargs["loss_type"] == "sigmoid" and loss_kwargs["loss_weights"] is None
            and len(loss_kwargs) == 4)  # no type-specific argument


def ld_split(seq_index: Tensor, num_seqs: int, valid: Optional[Tensor] = None) -> Tensor:
    """LD-DPO's split of the scored positions (Liu et al. 2024): sequence ids [N] in
    ``[0, num_seqs)`` (chosen ``s``, rejected ``S/2 + s``; each sequence's positions in token
    order, sequences in any order) -> ids in ``[0, 2 num_seqs)``: a position past its pair's
    shared length (the shorter response's scored-position count) moves to ``num_seqs + id``.
    ``valid`` [N] bool (default all): unscored positions keep their id and count nowhere."""
    n = seq_index.numel()
    dev = seq_index.device
    valid = torch.ones(n, dtype=torch.bool, device=dev) if valid is None else valid
    ids = torch.where(valid, seq_index, torch.full_like(seq_index, num_seqs))  # a parking id
    counts = torch.bincount(ids, minlength=num_seqs + 1)[:num_seqs]
    b = num_seqs // 2
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)
    order = torch.sort(ids, stable=True).indices  # each sequence's positions, in token order
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    sorted_ids = ids[order]
    in_seq = sorted_ids < num_seqs
    rank[order] = torch.where(
        in_seq, torch.arange(n, device=dev) - first[sorted_ids.clamp(max=num_seqs - 1)], 0)
    tail = valid & (rank >= shared[seq_index.clamp(0, num_seqs - 1)])
    return seq_index + num_seqs * tail.long()


#: Loss types that read the chosen response's per-token NLL (``chosen_nll``).
_NLL_TYPES = frozenset(("sft", "orpo", "unlikelihood", "cpo"))


def _flat_loss(batch: _Packed, loss_kwargs: Dict[str, Any], ld_alpha: Optional[float] = None,
               use_weighting: bool = False) -> _LossParts:
    """The memory-flat path: one custom op (O(N + tile) memory), then the preference loss on
    the kept pairs. ``ld_alpha``: the op sums each sequence's shared and tail positions apart
    (:func:`ld_split`); ``use_weighting``: it also returns log sum_v p_v^2 per position for
    WPO's pair weights."""
    compiling = torch.compiler.is_compiling()
    b, lengths, empty, valid, seq = batch.b, batch.lengths, batch.empty, batch.valid, batch.seq
    ids, num_ids = (seq, 2 * b) if ld_alpha is None else (ld_split(seq, 2 * b, valid), 4 * b)
    sums, logp, ent, row_max, log_sum, log_sum_sq = _seq_fwd(
        batch.hidden, batch.weight, batch.bias, batch.targets, ids, num_seqs=num_ids,
        with_sum_sq=use_weighting, **batch.head.op_kwargs())
    if ld_alpha is None:
        policy_logps = plain = sums
    else:  # shared part + ld_alpha * tail; sft / WPO read the unweighted sums
        plain = sums[:2 * b] + sums[2 * b:]
        policy_logps = sums[:2 * b] + ld_alpha * sums[2 * b:]
    kept = ~empty
    idx = slice(None) if compiling or not bool(empty.any()) else kept.nonzero().flatten()
    pc, pr = policy_logps[:b][idx], policy_logps[b:][idx]
    rc, rr = (batch.ref[:b][idx], batch.ref[b:][idx]) if batch.ref is not None else (None, None)
    loss_kwargs = dict(loss_kwargs)
    types = loss_kwargs["loss_type"]
    types = (types,) if isinstance(types, str) else tuple(types)
    if ld_alpha is not None and _NLL_TYPES.intersection(types):
        loss_kwargs.setdefault("chosen_nll", -plain[:b][idx] / lengths[:b][idx].clamp(min=1))
    if use_weighting:
        with torch.no_grad():
            sq = torch.zeros(2 * b, dtype=torch.float64, device=seq.device).index_add(
                0, seq, log_sum_sq.double())
            loss_kwargs["pair_weights"] = wpo_weights(
                plain[:b].detach(), plain[b:].detach(), sq[:b], sq[b:], lengths[:b],
                lengths[b:]).float()[idx]
    if _uses_triton_sigmoid(batch, loss_kwargs):
        pref = _triton_sigmoid(pc, pr, rc, rr, float(loss_kwargs["beta"]),
                               float(loss_kwargs["label_smoothing"]))
    else:
        pref = preference_loss(pc, pr, rc, rr, chosen_lengths=lengths[:b][idx],
                               rejected_lengths=lengths[b:][idx], **loss_kwargs)

    with torch.no_grad():
        # The target is the argmax exactly when z[y] == max z, i.e. logp == -log_sum.
        hit = (logp == -log_sum) & valid
        chosen_tok = valid & (seq < b)
        rejected_tok = valid & (seq >= b)

        def _mean(x: Tensor, m: Tensor) -> Tensor:  # NaN over no token; no host sync
            k = m.sum()
            return torch.where(k > 0, (x * m).sum() / k.clamp(min=1), math.nan)

        metrics = dict(
            chosen_entropy=_mean(ent, chosen_tok),
            rejected_entropy=_mean(ent, rejected_tok),
            chosen_token_accuracy=_mean(hit.float(), chosen_tok),
            rejected_token_accuracy=_mean(hit.float(), rejected_tok),
        )
    return _LossParts(pref, policy_logps.detach(), kept,
                      0 if compiling else int(empty.sum()), metrics)


def fused_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    seq_index: Tensor,
    ref_logps: Optional[Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    bias: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    num_pairs: Optional[int] = None,
    empty_sequences: str = "error",
    max_scratch_bytes: Union[int, str, None] = "auto",
    impl: str = "auto",
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    **type_specific,
) -> FusedPreferenceOutput:
    """Preference loss straight from hidden states, for a packed batch of 2B sequences.

    Args:
        hidden: [N, D] hidden states of all 2B sequences, packed (or [..., D], flattened).
        weight: [V, D] LM-head weight (same dtype as hidden).
        targets: [N] next-token ids; ``ignore_index`` on prompt / padding positions.
        seq_index: [N] int, the sequence of each position: 0..B-1 chosen, B..2B-1 rejected
            (pair j = (j, B + j)). Ignored positions may hold any value (e.g. -1).
        ref_logps: [2B] reference sequence log-probs in the same order (e.g. from the
            reference cache), or None for reference-free loss types.
        loss_type, loss_weights, beta, label_smoothing, **type_specific: as in
            :func:`dpo_fast.preference_loss` (e.g. ``simpo_gamma``, ``discopop_tau``).
        bias, softcap, temperature, ignore_index, impl: as in :func:`dpo_fast.linear_logprobs`.
        num_pairs: B, if neither ``ref_logps`` nor the data determine it (default: from
            ``ref_logps``, else the largest sequence id with a response token).
        empty_sequences: what a sequence with zero response tokens does: "error" (default,
            ValueError naming the pairs) or "drop" (its pair leaves the loss; counted in
            ``num_dropped``).
        max_scratch_bytes: bytes of fp32 logits that may be kept between the forward and
            the backward of a chunk of whole pairs, whose gradient is then formed during the
            forward (:mod:`dpo_fast.kernels.dpo_scratch`). Each kept logit saves its
            recompute: 4 GEMMs with nothing kept, 3 when a chunk's [tokens, V] logits fit.
            The C++ backend (``impl="cpu"``) keeps part of a chunk's logits when they do not
            all fit; the torch backend needs a whole pair to fit (its softcap doubles the
            scratch). Needs a per-pair loss type (not aot / aot_unpaired) and no dropped
            pair; otherwise, and with None, the memory-flat path runs (O(N + tile) memory,
            one custom op that ``torch.compile`` traces). "auto" (default):
            ``DEFAULT_CPU_SCRATCH_BYTES`` (40 MiB) on the C++ backend, else None.
        ld_alpha: LD-DPO (TRL's name): each sequence's log-prob is the sum over its first
            min(|chosen|, |rejected|) response positions plus ``ld_alpha`` times the rest
            (positions of a sequence in token order). ``ref_logps`` must be split the same
            way (``dpo_fast.train.reference.ld_pair_table``). ``policy_logps`` and the rewards
            are the weighted sums; sft / orpo / cpo / unlikelihood's NLL and ``lengths`` stay
            unweighted (TRL's conventions). None = off.
        use_weighting: WPO (TRL's name): each pair's loss times :func:`dpo_fast.wpo_weights`
            of the policy's unweighted log-probs and ``log sum_v p_v^2`` (from the same kernel
            pass), without gradient. Not with aot / aot_unpaired.
            With either modifier the memory-flat path runs.

    Under ``torch.compile`` the call traces as one graph (``fullgraph=True``) given
    ``ref_logps`` or ``num_pairs``: the memory-flat path runs whatever ``max_scratch_bytes``
    says, checks that read tensor values are skipped, an empty pair fails a runtime assert,
    and ``empty_sequences="drop"`` is refused.

    Returns:
        :class:`FusedPreferenceOutput`.
    """
    batch = _pack(hidden, weight, targets, seq_index, ref_logps, bias=bias, softcap=softcap,
                  temperature=temperature, ignore_index=ignore_index, num_pairs=num_pairs,
                  empty_sequences=empty_sequences, impl=impl)
    loss_kwargs = dict(loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                       label_smoothing=label_smoothing, **type_specific)
    if ld_alpha is not None:
        if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) \
                or not math.isfinite(ld_alpha):
            raise ValueError(f"ld_alpha must be a finite number (LD-DPO uses [0, 1]) or None, "
                             f"got {ld_alpha!r}")
        ld_alpha = float(ld_alpha)
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be True or False, got {use_weighting!r}")
    chunks, budget = _scratch_chunks(batch, max_scratch_bytes, loss_type)
    if ld_alpha is not None or use_weighting:
        chunks = []  # the scratch engine sums whole sequences and weights no pair
    # No chunks (no budget, no gradient wanted, a batch-coupled type such as aot, a dropped
    # pair, a pair whose logits exceed the budget, or a modifier): the memory-flat path runs.
    parts = (_scratch_loss(batch, chunks, budget, loss_kwargs) if chunks
             else _flat_loss(batch, loss_kwargs, ld_alpha, use_weighting))
    pref = parts.pref
    return FusedPreferenceOutput(
        loss=pref.loss, losses=pref.losses, chosen_rewards=pref.chosen_rewards,
        rejected_rewards=pref.rejected_rewards, margins=pref.margins,
        accuracies=pref.accuracies, policy_logps=parts.policy_logps, lengths=batch.lengths,
        kept=parts.kept, num_dropped=parts.num_dropped, preference=pref, **parts.metrics,
    )


class SequenceLogprobs(NamedTuple):
    """Output of :func:`sequence_logprobs`. ``S`` = number of sequences, ``N`` = positions.

    Attributes:
        logps: [S] float32 sum of each sequence's token log-probs; differentiable w.r.t.
            hidden, weight and bias (0.0 for a sequence with no scored token).
        token_logps: [N] float32 per-position log-probs (0.0 at ignored positions), detached.
        entropy: [N] float32 softmax entropy per position (0.0 at ignored ones), detached.
        is_top1: [N] bool, the target is the argmax of the logits (False where ignored).
        lengths: [S] int64 scored positions per sequence.
        log_sum_sq: [N] float32 log sum_v p_v^2 per position (0.0 at ignored ones), detached;
            None unless ``with_sum_sq=True`` was asked.
    """

    logps: Tensor
    token_logps: Tensor
    entropy: Tensor
    is_top1: Tensor
    lengths: Tensor
    log_sum_sq: Optional[Tensor] = None


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    seq_index: Tensor,
    num_seqs: int,
    *,
    bias: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    with_sum_sq: bool = False,
) -> SequenceLogprobs:
    """Per-sequence log-probs straight from hidden states (no ``[N, V]`` logits), for any
    loss the caller builds on them: the sequence-level op under
    :func:`fused_preference_loss`'s memory-flat path, without the preference loss.

    Args:
        hidden: [N, D] hidden states (or [..., D], flattened).
        weight: [V, D] LM-head weight (same dtype as hidden).
        targets: [N] next-token ids, ``ignore_index`` where nothing is scored.
        seq_index: [N] int in [0, num_seqs), the sequence of each scored position (any value
            where ignored).
        num_seqs: S.
        bias, softcap, temperature, ignore_index, impl: as in :func:`dpo_fast.linear_logprobs`.
        with_sum_sq: also return ``log_sum_sq`` [N] fp32, log sum_v p_v^2 of each position's
            softmax (WPO's weights), from the same pass over the logits; forward only.

    Returns:
        :class:`SequenceLogprobs` (logps [S], token_logps / entropy / is_top1 [N], lengths
        [S], log_sum_sq [N] or None). The backward recomputes the logits tile by tile.
    """
    if not isinstance(targets, Tensor) or not isinstance(seq_index, Tensor):
        raise ValueError("targets and seq_index must be tensors")
    if not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs must be an int >= 1, got {num_seqs!r}")
    h2, w, t1, head = prepare_inputs(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, bias, ignore_index=ignore_index,
        softcap=softcap, temperature=temperature, impl=impl)
    seq_index = seq_index.reshape(-1)
    if seq_index.shape != t1.shape:
        raise ValueError(f"seq_index has {seq_index.numel()} positions, targets {t1.numel()}")
    valid = t1 != ignore_index
    seq = torch.where(valid, seq_index.to(device=t1.device, dtype=torch.int64),
                      torch.zeros_like(t1))
    if not torch.compiler.is_compiling() and bool(valid.any()):
        lo, hi = int(seq[valid].min()), int(seq[valid].max())
        if lo < 0 or hi >= num_seqs:
            raise ValueError(f"seq_index must lie in [0, {num_seqs}) at scored positions, "
                             f"got values in [{lo}, {hi}]")
    logps, logp, ent, _row_max, log_sum, lsq = _seq_fwd(
        h2, w, bias, t1, seq, num_seqs=num_seqs, with_sum_sq=bool(with_sum_sq),
        **head.op_kwargs())
    lengths = torch.zeros(num_seqs, dtype=torch.int64, device=t1.device).index_add(
        0, seq, valid.to(torch.int64))
    # The target is the argmax exactly when z[y] == max z, i.e. logp == -log_sum.
    return SequenceLogprobs(logps, logp.detach(), ent.detach(),
                            ((logp == -log_sum) & valid).detach(), lengths,
                            lsq.detach() if with_sum_sq else None)


def fused_preference_loss_padded(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_logps: Optional[Tensor] = None,
    **kwargs,
) -> FusedPreferenceOutput:
    """:func:`fused_preference_loss` for padded batches.

    Args:
        hidden: [2B, T, D] hidden states, rows 0..B-1 chosen, B..2B-1 rejected.
        targets: [2B, T] next-token ids (``ignore_index`` on prompt and padding positions).
        ref_logps: [2B] or None. Other keyword arguments as in :func:`fused_preference_loss`.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must be [2B, T, D] for the padded layout")
    if not isinstance(targets, Tensor) or targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be [2B, T] = {tuple(hidden.shape[:2])}, got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else targets}")
    if hidden.shape[0] % 2:
        raise ValueError(f"padded layout needs an even number of rows (2B), got {hidden.shape[0]}")
    rows, t = hidden.shape[:2]
    seq_index = torch.arange(rows, device=targets.device).repeat_interleave(t)
    kwargs.setdefault("num_pairs", rows // 2)
    return fused_preference_loss(hidden.reshape(rows * t, -1), weight, targets.reshape(-1),
                                 seq_index, ref_logps, **kwargs)


__all__ = ["fused_preference_loss", "fused_preference_loss_padded", "FusedPreferenceOutput",
           "sequence_logprobs", "SequenceLogprobs", "ld_split"]
