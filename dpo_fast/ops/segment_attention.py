"""Attention over a packed row as causal segments: exact, with no ``[L, L]`` tensor anywhere.

A packed row (:mod:`dpo_fast.train.batching`) holds many sequences; in the shared-prompt tree
each pair is laid out as ``prompt | chosen | rejected`` and the rejected response attends to the
prompt but not to the chosen response. Both layouts are a list of **segments**
``(q0, q1, p0, p1)``: the queries ``row[q0:q1]`` attend causally to the keys ``row[q0:q1]`` and
to every key of the **prefix** ``row[p0:p1]`` (empty for a plain sequence and for
``prompt | chosen``; the prompt for ``rejected``). Positions: prefix key ``j`` is at position
``j - p0``, query / key ``t`` of the segment at ``(p1 - p0) + (t - q0)``; sliding windows
(transformers' convention: a query sees keys less than ``window`` positions back) count those.

Implementations (one autograd path each, all exact; ``segment_attention`` picks):

* ``"cpu-flash"`` (CPU default): per segment PyTorch's CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) twice, causal over the segment and full
  over the prefix, merged by their log-sum-exps; the backward runs the kernel's backward for
  each part with the merged output and log-sum-exp, which is the exact gradient of each key
  block (the split every flash / ring attention backward relies on). Saved: q, k, v, out, lse.
* ``"sdpa"`` (CUDA without flash-attn): per segment SDPA, ``is_causal`` for plain segments and
  ``causal_lower_right`` over ``[prefix; segment]`` keys otherwise (memory-efficient kernel).
* ``"flash-varlen"`` (CUDA with flash-attn): one ``flash_attn_varlen_func`` call over all
  segments, keys gathered as ``[prefix; segment]`` (bottom-right causal), with softcap and
  window.
* ``"chunked"`` (softcap, a window shorter than a segment, or no kernel above): query chunks
  of at most ``chunk`` rows, scores of a chunk against the keys it may see (a ``[chunk, keys]``
  tile), recomputed in a hand-written backward. Memory ``O(chunk x L)``.

Shapes follow transformers' attention functions: ``query [1, H, L, D]``, ``key`` / ``value``
``[1, Hkv, L, D]`` (GQA: ``H % Hkv == 0``), output ``[1, L, H, D]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

#: The attention implementation name registered with transformers (:func:`register`).
ATTN_NAME = "dpo_fast_segments"
#: The keyword the layout travels under from the body's forward to each attention call.
LAYOUT_KWARG = "segment_layout"

IMPLS = ("cpu-flash", "sdpa", "flash-varlen", "chunked")


@dataclass(frozen=True)
class SegmentLayout:
    """A packed row's attention as segments (see the module docstring).

    Attributes:
        segments: ``((q0, q1, p0, p1), ...)`` in row order; the query ranges tile
            ``[0, length)``; a prefix lies before its segment and ``p0 == p1`` means none.
        length: L, the row's tokens.
    """

    segments: Tuple[Tuple[int, int, int, int], ...]
    length: int

    def __post_init__(self):
        at = 0
        for s in self.segments:
            q0, q1, p0, p1 = s
            if q0 != at or q1 <= q0 or not (0 <= p0 <= p1 <= q0):
                raise ValueError(f"SegmentLayout: segment {s} does not continue the row at "
                                 f"{at} (queries q0 < q1 tiling the row, prefix before them)")
            at = q1
        if at != self.length:
            raise ValueError(f"SegmentLayout: segments end at {at}, the row has {self.length}")

    @property
    def extent(self) -> int:
        """The longest context any query has (prefix plus segment): windows at least this long
        change nothing."""
        return max((q1 - q0) + (p1 - p0) for q0, q1, p0, p1 in self.segments)

    def to(self, *args, **kwargs) -> "SegmentLayout":
        return self  # plain integers: nothing to move (Tensor.to's signature, for batches)

    @classmethod
    def of_sequences(cls, lengths: Sequence[int]) -> "SegmentLayout":
        """Sequences laid end to end, each causal on its own."""
        segs, o = [], 0
        for n in lengths:
            segs.append((o, o + int(n), o, o))
            o += int(n)
        return cls(tuple(segs), o)

    @classmethod
    def of_shared_pairs(cls, sizes: Sequence[Tuple[int, int, int]]) -> "SegmentLayout":
        """Pairs laid out as ``prompt | chosen | rejected`` (``sizes``: (P, C, R) per pair):
        ``prompt | chosen`` causal, ``rejected`` over the prompt and itself."""
        segs, o = [], 0
        for p, c, r in sizes:
            p, c, r = int(p), int(c), int(r)
            segs.append((o, o + p + c, o, o))
            segs.append((o + p + c, o + p + c + r, o, o + p))
            o += p + c + r
        return cls(tuple(segs), o)


# ---------------------------------------------------------------------------------------------
# cpu-flash: PyTorch's CPU flash kernel per segment, prefix merged by log-sum-exp.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flash_cpu_fwd(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, causal, scale=scale)


def _flash_cpu_bwd(g, q, k, v, o, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g[None], q[None], k[None], v[None], o[None], lse[None], 0.0, causal, scale=scale)


def _heads(t: Tensor, rep: int) -> Tensor:
    """Key / value heads [Hkv, n, D] repeated to the query heads (GQA), for one kernel call."""
    return t if rep == 1 else t.repeat_interleave(rep, dim=0)


def _fold(g: Tensor, rep: int) -> Tensor:
    """The gradient of :func:`_heads`: [H, n, D] summed back onto [Hkv, n, D]."""
    return g if rep == 1 else g.unflatten(0, (-1, rep)).sum(1)


class _CpuFlashSegments(torch.autograd.Function):
    """q ``[H, L, D]``, k, v ``[Hkv, L, D]`` -> out ``[H, L, D]``. Key / value heads are
    repeated per kernel call only, so the saved k, v keep their Hkv heads."""

    @staticmethod
    def forward(ctx, q, k, v, layout: SegmentLayout, scale: float):
        h, n, d = q.shape
        rep = h // k.shape[0]
        out = q.new_empty(h, n, d)
        acc = _acc_dtype(q.dtype)
        lse = torch.empty(h, n, dtype=acc, device=q.device)
        for q0, q1, p0, p1 in layout.segments:
            qs = q[:, q0:q1]
            o, l_ = _flash_cpu_fwd(qs, _heads(k[:, q0:q1], rep), _heads(v[:, q0:q1], rep), True,
                                   scale)
            o, l_ = o[0], l_[0].to(acc)
            if p1 > p0:
                o2, l2 = _flash_cpu_fwd(qs, _heads(k[:, p0:p1], rep), _heads(v[:, p0:p1], rep),
                                        False, scale)
                l2 = l2[0].to(acc)
                m = torch.logaddexp(l_, l2)
                o = (o.to(acc) * torch.exp(l_ - m)[..., None]
                     + o2[0].to(acc) * torch.exp(l2 - m)[..., None]).to(q.dtype)
                l_ = m
            out[:, q0:q1] = o
            lse[:, q0:q1] = l_
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        grad = grad.to(q.dtype)
        rep = q.shape[0] // k.shape[0]
        for q0, q1, p0, p1 in ctx.layout.segments:
            g, qs, o, l_ = grad[:, q0:q1], q[:, q0:q1], out[:, q0:q1], lse[:, q0:q1]
            a = _flash_cpu_bwd(g, qs, _heads(k[:, q0:q1], rep), _heads(v[:, q0:q1], rep), o, l_,
                               True, ctx.scale)
            dq[:, q0:q1] += a[0][0]
            dk[:, q0:q1] += _fold(a[1][0], rep)
            dv[:, q0:q1] += _fold(a[2][0], rep)
            if p1 > p0:
                b = _flash_cpu_bwd(g, qs, _heads(k[:, p0:p1], rep), _heads(v[:, p0:p1], rep), o,
                                   l_, False, ctx.scale)
                dq[:, q0:q1] += b[0][0]
                dk[:, p0:p1] += _fold(b[1][0], rep)
                dv[:, p0:p1] += _fold(b[2][0], rep)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# ---------------------------------------------------------------------------------------------
# chunked: score tiles of at most `chunk` queries, hand-written backward (softcap, windows).

def _chunk_keys(seg, t0: int, t1: int, window: Optional[int], device):
    """Keys that queries ``t0 <= t < t1`` of segment ``seg`` may see: (row index ranges,
    key positions [nk], query positions [t1 - t0])."""
    q0, _, p0, p1 = seg
    plen = p1 - p0
    lo = -1 << 62 if window is None else plen + t0 - window + 1  # lowest visible position
    pre = (p0 + max(0, lo), p1) if lo < plen else (p1, p1)
    own = (q0 + max(0, lo - plen), q0 + t1)
    kpos = torch.cat([torch.arange(pre[0] - p0, pre[1] - p0, device=device),
                      plen + torch.arange(own[0] - q0, own[1] - q0, device=device)])
    qpos = plen + torch.arange(t0, t1, device=device)
    return (pre, own), kpos, qpos


def _tile(q, k, v, ranges, kpos, qpos, scale, softcap, window):
    """Scores of one query chunk: (keys [H, nk, D], values, raw scores / softcapped tanh,
    masked scores [H, c, nk]), all in the accumulation dtype (fp32 for half inputs)."""
    acc = _acc_dtype(k.dtype)
    rep = q.shape[0] // k.shape[0]
    kk = _heads(torch.cat([k[:, a:b] for a, b in ranges], dim=1), rep).to(acc)
    vv = _heads(torch.cat([v[:, a:b] for a, b in ranges], dim=1), rep).to(acc)
    s = torch.matmul(q.to(acc), kk.transpose(1, 2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    dist = qpos[:, None] - kpos[None, :]
    ok = dist >= 0
    if window is not None:
        ok &= dist < window
    s = s.masked_fill(~ok, float("-inf"))
    return kk, vv, t, s


class _ChunkedSegments(torch.autograd.Function):
    """q ``[H, L, D]``, k, v ``[Hkv, L, D]`` -> out ``[H, L, D]``; scores per chunk of queries
    (fp32 for half inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: SegmentLayout, scale: float, softcap: Optional[float],
                window: Optional[int], chunk: int):
        h, n, d = q.shape
        out = q.new_empty(h, n, d)
        lse = torch.empty(h, n, dtype=_acc_dtype(q.dtype), device=q.device)
        for seg in layout.segments:
            q0, q1 = seg[0], seg[1]
            for t0 in range(0, q1 - q0, chunk):
                t1 = min(t0 + chunk, q1 - q0)
                ranges, kpos, qpos = _chunk_keys(seg, t0, t1, window, q.device)
                _, vv, _, s = _tile(q[:, q0 + t0:q0 + t1], k, v, ranges, kpos, qpos, scale,
                                    softcap, window)
                m = torch.logsumexp(s, dim=-1)
                out[:, q0 + t0:q0 + t1] = torch.matmul(torch.exp(s - m[..., None]), vv).to(q.dtype)
                lse[:, q0 + t0:q0 + t1] = m
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, scale, softcap, window, chunk)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, softcap, window, chunk = ctx.args
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for seg in layout.segments:
            q0, q1 = seg[0], seg[1]
            for t0 in range(0, q1 - q0, chunk):
                t1 = min(t0 + chunk, q1 - q0)
                a, b = q0 + t0, q0 + t1
                ranges, kpos, qpos = _chunk_keys(seg, t0, t1, window, q.device)
                qc = q[:, a:b].to(acc)
                kk, vv, t, s = _tile(qc, k, v, ranges, kpos, qpos, scale, softcap, window)
                p = torch.exp(s - lse[:, a:b, None])
                g = grad[:, a:b].to(acc)
                dvv = torch.matmul(p.transpose(1, 2), g)
                dp = torch.matmul(g, vv.transpose(1, 2))
                ds = p * (dp - (g * out[:, a:b].to(acc)).sum(-1, keepdim=True))
                if t is not None:
                    ds = ds * (1 - t * t)
                ds = ds * scale
                dq[:, a:b] += torch.matmul(ds, kk)
                rep = q.shape[0] // k.shape[0]
                dkk = _fold(torch.matmul(ds.transpose(1, 2), qc), rep)
                dvv = _fold(dvv, rep)
                o = 0
                for r0, r1 in ranges:
                    dk[:, r0:r1] += dkk[:, o:o + r1 - r0]
                    dv[:, r0:r1] += dvv[:, o:o + r1 - r0]
                    o += r1 - r0
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# sdpa and flash-varlen (CUDA): per-segment SDPA, or one flash-attn varlen call.

def _sdpa_segments(q, k, v, layout: SegmentLayout, scale: float) -> Tensor:
    from torch.nn.attention.bias import causal_lower_right

    outs = []
    for q0, q1, p0, p1 in layout.segments:
        qs = q[None, :, q0:q1]
        if p1 == p0:
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, k[None, :, q0:q1], v[None, :, q0:q1], is_causal=True, scale=scale)
        else:
            ks = torch.cat([k[:, p0:p1], k[:, q0:q1]], dim=1)[None]
            vs = torch.cat([v[:, p0:p1], v[:, q0:q1]], dim=1)[None]
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=causal_lower_right(q1 - q0, ks.shape[2]), scale=scale)
        outs.append(o[0])
    return torch.cat(outs, dim=1)


def varlen_arguments(layout: SegmentLayout, device) -> Tuple[Tensor, Tensor, Tensor, int, int]:
    """flash-attn varlen inputs of ``layout``: (key row index [sum of prefix + segment],
    cu_seqlens_q, cu_seqlens_k (int32), max_seqlen_q, max_seqlen_k). Queries are the row
    itself; each segment's keys are its prefix then its own rows (bottom-right causal)."""
    idx, cq, ck = [], [0], [0]
    for q0, q1, p0, p1 in layout.segments:
        idx.append(torch.arange(p0, p1))
        idx.append(torch.arange(q0, q1))
        cq.append(cq[-1] + q1 - q0)
        ck.append(ck[-1] + (p1 - p0) + (q1 - q0))
    lq = max(b - a for a, b in zip(cq, cq[1:]))
    lk = max(b - a for a, b in zip(ck, ck[1:]))
    return (torch.cat(idx).to(device), torch.tensor(cq, dtype=torch.int32, device=device),
            torch.tensor(ck, dtype=torch.int32, device=device), lq, lk)


def _flash_varlen(q, k, v, layout, scale, softcap, window):
    from flash_attn import flash_attn_varlen_func

    idx, cq, ck, lq, lk = varlen_arguments(layout, q.device)
    out = flash_attn_varlen_func(
        q.transpose(0, 1), k.index_select(1, idx).transpose(0, 1),
        v.index_select(1, idx).transpose(0, 1), cq, ck, lq, lk, dropout_p=0.0,
        softmax_scale=scale, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
        softcap=0.0 if softcap is None else float(softcap))
    return out.transpose(0, 1)


@functools.lru_cache(maxsize=None)
def _flash_attn_available() -> bool:
    """Whether flash-attn imports (asked once: choose_impl runs at every attention call)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_impl(device: torch.device, softcap: Optional[float], window: Optional[int],
                dtype: torch.dtype = torch.bfloat16) -> str:
    """The implementation ``segment_attention`` runs for these settings on ``device``
    (flash-attn takes fp16 / bf16 only)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) \
            and _flash_attn_available():
        return "flash-varlen"
    if softcap is not None or window is not None:
        return "chunked"
    return "cpu-flash" if device.type == "cpu" else "sdpa"


def segment_attention(query: Tensor, key: Tensor, value: Tensor, layout: SegmentLayout, *,
                      scale: Optional[float] = None, softcap: Optional[float] = None,
                      window: Optional[int] = None, impl: str = "auto",
                      chunk: Optional[int] = None) -> Tensor:
    """Exact attention of a packed row whose sequences are ``layout``'s segments.

    Args:
        query: [1, H, L, D]; key, value: [1, Hkv, L, D] with ``H % Hkv == 0``.
        layout: the row's :class:`SegmentLayout` (``layout.length == L``).
        scale: score scale (default ``D ** -0.5``).
        softcap: scores become ``softcap * tanh(score / softcap)`` (Gemma 2).
        window: a query sees keys less than ``window`` positions back (None: all).
        impl: "auto" (:func:`choose_impl`) or one of :data:`IMPLS`.
        chunk: queries per score tile of the "chunked" implementation (default: tiles of at
            most 2^24 scores).

    Returns:
        [1, L, H, D], transformers' attention output layout.
    """
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"segment_attention: query must be [1, H, L, D] (one packed row), "
                         f"got {tuple(query.shape)}")
    _, h, n, d = query.shape
    hkv = key.shape[1]
    if key.shape != value.shape or key.shape[0] != 1 or key.shape[2] != n or h % hkv:
        raise ValueError(f"segment_attention: key / value {tuple(key.shape)} / "
                         f"{tuple(value.shape)} do not fit query {tuple(query.shape)}")
    if layout.length != n:
        raise ValueError(f"segment_attention: the layout covers {layout.length} tokens, the "
                         f"row has {n}")
    scale = float(d ** -0.5 if scale is None else scale)
    if window is not None and window >= layout.extent:
        window = None  # no query has a key that far back
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # as autocast treats sdpa: inputs in its dtype
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    if impl == "auto":
        impl = choose_impl(query.device, softcap, window, dtype)
    if impl not in IMPLS:
        raise ValueError(f"segment_attention: impl must be 'auto' or one of {IMPLS}, got "
                         f"{impl!r}")
    if impl in ("cpu-flash", "sdpa") and (softcap is not None or window is not None):
        raise ValueError(f"segment_attention: impl {impl!r} has no softcap / window; use "
                         "'chunked' or 'auto'")
    q, k, v = (t[0].to(dtype) for t in (query, key, value))
    with torch.autocast(dev, enabled=False):  # the kernels' own precision inside
        out = _run(impl, q, k, v, layout, scale, softcap, window, chunk)
    return out.transpose(0, 1)[None]


def _run(impl, q, k, v, layout, scale, softcap, window, chunk) -> Tensor:
    h, hkv = q.shape[0], k.shape[0]
    if impl == "flash-varlen":
        out = _flash_varlen(q, k, v, layout, scale, softcap, window)
    elif impl == "sdpa":
        out = _sdpa_segments(q, _heads(k, h // hkv), _heads(v, h // hkv), layout, scale)
    elif impl == "cpu-flash":
        out = _CpuFlashSegments.apply(q, k, v, layout, scale)
    else:
        if chunk is None:
            chunk = max(16, min(1024, (1 << 24) // max(1, h * layout.extent)))
        out = _ChunkedSegments.apply(q, k, v, layout, scale, softcap, window, int(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# transformers: a registered attention function that takes the layout from its kwargs.

def _fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs):
    """No layout (generation, padded batches): what sdpa (no softcap) or eager would do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    import sys

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    if attention_mask is None and query.shape[2] > 1:  # sdpa's is_causal (bottom-right)
        lq, lk = query.shape[2], key.shape[2]
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device
                                    ).tril_(lk - lq)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # eager's additive form: the dtype's minimum (as transformers' eager masks), so a
        # padding query that sees nothing gets a finite, unused row instead of NaN.
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype,
                                     device=query.device).masked_fill_(
                                         ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                 softcap=softcap, **kwargs)


def transformers_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, softcap: Optional[float] = None,
                           sliding_window: Optional[int] = None, **kwargs):
    """transformers attention function (``ALL_ATTENTION_FUNCTIONS[ATTN_NAME]``): the
    :class:`SegmentLayout` under ``kwargs[LAYOUT_KWARG]`` -> :func:`segment_attention`
    (``attention_mask`` is then ignored); without one, sdpa (eager with softcap)."""
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, softcap,
                         kwargs)
    if dropout:
        raise ValueError(f"{type(module).__name__}: attention dropout {dropout} is not "
                         "supported by segment attention (train with disable_dropout=True)")
    return _segment_attention_uncompiled(query, key, value, layout, scale=scaling,
                                         softcap=softcap, window=sliding_window), None


#: Under ``torch.compile`` the segment loop runs eagerly (a graph break per attention call), so
#: compiled graphs do not specialize on each row's layout and recompile per micro-batch.
_segment_attention_uncompiled = torch.compiler.disable(segment_attention)


def register() -> str:
    """Registers :data:`ATTN_NAME` with transformers' attention and mask registries (masks as
    sdpa builds them, for calls without a layout); idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, transformers_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


#: A zero-size 4D stand-in passed as the body's ``attention_mask`` with a layout: transformers
#: returns a 4D mask as is, so no ``[L, L]`` mask is built (the attention function ignores it).
def no_mask(device=None) -> Tensor:
    return torch.zeros(1, 1, 0, 0, dtype=torch.bool, device=device)
