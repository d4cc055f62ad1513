"""The LM head's weight gradient by vocabulary blocks, handed over one block at a time.

The fused op's backward normally returns dW as one ``[V, D]`` tensor. Under FSDP2 that
tensor is the largest thing a process holds during a step (with the gathered head itself),
and it only exists to be reduce-scattered: rank ``r`` keeps rows ``bounds[r]``. With a
:class:`WeightGradSink` in effect during the forward (:func:`weight_grad_sink`), the
sequence log-prob op's backward instead runs the backend once per row block of the head and
hands each block's ``[rows, D]`` gradient to the sink before computing the next, so at most
one block of dW exists at a time. The math is the op's own, split by vocabulary rows::

    logp_i = z_i[y_i] - lse_i,   dlogp_i / dz_ij = [j == y_i] - p_ij

The ``-p`` part is the gradient of ``-lse``: each block is the backend's backward with
``grad_lse = -g`` (``p_ij = exp(z_ij - lse_i)`` from the forward's row max and log-sum, so
a block needs only its own rows), and the one-hot part, nonzero only at the target, is added
outside: ``dz0_i = g_i * inv_temperature * (1 - tanh^2(z0_i / c))`` at ``z0_i = h_i . W[y_i]``
(the softcap factor only with a softcap ``c``), into ``dW[y_i] += dz0_i h_i`` for the block
holding ``y_i`` and ``dh_i += dz0_i W[y_i]``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor


class WeightGradSink(Protocol):
    """Where the head's weight gradient goes, block by block.

    Attributes:
        bounds: row ranges ``(start, stop)`` in order, covering ``[0, V)`` (an empty range
            is allowed and is still called, with a ``[0, D]`` gradient).
    """

    bounds: Sequence[Tuple[int, int]]

    def __call__(self, block: int, grad: Tensor) -> None:
        """Takes block ``block``'s gradient ``[stop - start, D]`` (float32; the sink may
        modify it in place)."""


_SINK: contextvars.ContextVar[Optional[WeightGradSink]] = contextvars.ContextVar(
    "dpo_fast_weight_grad_sink", default=None)


@contextlib.contextmanager
def weight_grad_sink(sink: Optional[WeightGradSink]) -> Iterator[None]:
    """Ops whose forward runs in this context send their head weight gradient to ``sink``
    in their backward (None: the usual ``[V, D]`` gradient)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def active_sink(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                impl: str) -> Optional[WeightGradSink]:
    """The enclosing sink if it applies to this head: a float32 head without bias whose
    weight requires a gradient, on a CPU backend ("cpu" or "torch"); else None (the usual
    ``[V, D]`` gradient)."""
    sink = _SINK.get()
    if (sink is None or bias is not None or impl not in ("cpu", "torch")
            or hidden.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.requires_grad):
        return None
    return sink


def blockwise_backward(
    backend, hidden: Tensor, weight: Tensor, targets: Tensor, row_max: Tensor,
    log_sum: Tensor, grad_logp: Tensor, *, ignore_index: int, softcap: Optional[float],
    inv_temperature: float, need_dh: bool, bounds: Sequence[Tuple[int, int]],
    emit: Callable[[int, Tensor], None],
) -> Optional[Tensor]:
    """Backward of per-token log-probs (no bias) with dW emitted block by block.

    Args:
        backend: a log-prob backend module (``logprobs_backward``, see
            ``kernels/logprobs_torch.py``).
        hidden: [N, D] float32; weight: [V, D] float32; targets: [N] int64 (``ignore_index``
            for positions without a log-prob); row_max, log_sum: [N] float32 from the
            forward; grad_logp: [N] upstream gradient of each position's log-prob.
        bounds: the row blocks of ``weight``, in order; ``emit(b, dW_b)`` gets block ``b``'s
            float32 ``[rows, D]`` gradient as soon as it is complete.
    Returns:
        grad_hidden [N, D] float32, or None without ``need_dh``.
    """
    valid = targets != ignore_index
    g = torch.where(valid, grad_logp.float(), 0.0)
    # The backend sees no target term (grad_logp absent), only which positions are valid:
    # any in-range id stands for a valid position.
    fill = 0 if ignore_index != 0 else 1
    n, d = hidden.shape
    dh = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_dh else None
    idx = valid.nonzero().squeeze(1)
    tgt = targets.index_select(0, idx)
    h_t = hidden.index_select(0, idx).float()
    w_t = weight.index_select(0, tgt).float()
    coef = g.index_select(0, idx) * inv_temperature
    if softcap is not None:
        th = torch.tanh((h_t * w_t).sum(-1) / softcap)
        coef = coef * (1.0 - th * th)
    if need_dh:
        dh.index_add_(0, idx, coef[:, None] * w_t)
    del w_t
    neg_g = -g
    for b, (start, stop) in enumerate(bounds):
        if stop <= start:
            emit(b, weight.new_zeros((0, d), dtype=torch.float32))
            continue
        local = torch.where(valid, min(fill, stop - start - 1), ignore_index)
        dh_b, dw_b, _ = backend.logprobs_backward(
            hidden, weight[start:stop], None, local, row_max, log_sum, None, None, neg_g,
            None, ignore_index=ignore_index, softcap=softcap, inv_temperature=inv_temperature,
            need_dh=need_dh, need_dw=True)
        if need_dh:
            dh.add_(dh_b)
        del dh_b
        dw_b = dw_b.float()
        hit = (tgt >= start) & (tgt < stop)
        if bool(hit.any()):
            dw_b.index_add_(0, tgt[hit] - start, coef[hit][:, None] * h_t[hit])
        emit(b, dw_b)
        del dw_b
    return dh
