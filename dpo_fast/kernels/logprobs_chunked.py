"""GPU backend ("triton"): Triton row kernels + library GEMMs over vocabulary chunks.

Same contract as ``logprobs_torch`` (``logprobs_forward`` / ``logprobs_backward``), built for
the GPU's split of work: the three GEMMs per vocabulary chunk go to the vendor library
(cuBLAS reaches ~740 TFLOP/s bf16 on an H100, several times what a GEMM written in Triton with
a fused softmax epilogue reached there, see docs/design.md), and everything that is not a GEMM
-- the online logsumexp, entropy, target gather, softcap / temperature, and the softmax
gradient -- runs in Triton kernels that read each chunk's logits once.

For the valid rows R (ignored positions are dropped first) and vocabulary chunks of C columns:

  forward   z_c = h W_c^T             [R, C] fp32 (bf16/fp16 inputs: fp32 output of the GEMM)
            _lse_chunk_kernel: update the running (max m, sum s, entropy sum, target logit,
                               and with_sum_sq q = sum exp(2 (z - m)))
  backward  z_c = h W_c^T             recomputed, as above
            _dz_chunk_kernel: dz_c = d loss / d z_c   [R, C] in the input dtype (in place
                                       over z_c for fp32)
            dh += dz_c W_c  (fp32 accumulator) ; dW_c = dz_c^T h (written once, final dtype)
            db_c = sum_rows dz_c

Peak scratch is one chunk: R x C x (4 + itemsize) bytes. C is chosen so that this is at most
``max(CHUNK_BYTES_MIN, CHUNK_FRACTION x the full fp32 logits)``, and at least MIN_COLS
columns (GEMM efficiency); plus the [R, D] fp32 dh accumulator and, when some rows are
ignored, the gathered [R, D] hidden rows. No [R, V] tensor exists. Deterministic: every
output element is written by one GEMM call or one program, in a fixed chunk order.

The math per element is the fused kernels' (logprobs_triton): both import the same
``@triton.jit`` helpers from :mod:`dpo_fast.kernels.triton_common` (``tanh``, ``dz_tile``,
``round_like``). m and log s are returned separately (lse = m + log s) and
log p = (z - m) - log s, so logits of magnitude 1e4 keep fp32 accuracy.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the row kernels run in the interpreter and the
GEMMs are torch's CPU GEMMs (bf16/fp16 operands upcast to fp32 there: CPU torch has no
fp32-output half GEMM); the tests use that.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemm import gemm_f32
from .triton_common import (
    TRITON_DTYPE, check_inputs, check_seq_args, dz_tile, interpreting, round_like, tanh,
)

CHUNK_BYTES_MIN = 256 << 20
CHUNK_FRACTION = 0.02
MIN_COLS = 1024
# Row kernels: (BLOCK_R rows, BLOCK_C columns per step, num_warps) per kernel on the GPU;
# override with DPO_FAST_ROW_CONFIG_FWD / _BWD="R,C,W" (a tuning knob for benchmarks). The
# interpreter's cost grows with programs x steps, so it gets far larger blocks.
ROW_CONFIGS = {"fwd": (1, 2048, 4), "bwd": (16, 512, 8)}  # best of a sweep on an H100
INTERPRET_BLOCK_R, INTERPRET_BLOCK_C = 64, 1024


def _row_launch(kind: str, r: int):
    """(grid, launch options) of row kernel ``kind`` ("fwd" | "bwd") over ``r`` rows."""
    if interpreting():
        return (triton.cdiv(r, INTERPRET_BLOCK_R),), dict(BLOCK_R=INTERPRET_BLOCK_R,
                                                          BLOCK_C=INTERPRET_BLOCK_C)
    env = os.environ.get(f"DPO_FAST_ROW_CONFIG_{kind.upper()}")
    br, bc, nw = tuple(int(x) for x in env.split(",")) if env else ROW_CONFIGS[kind]
    return (triton.cdiv(r, br),), dict(BLOCK_R=br, BLOCK_C=bc, num_warps=nw)


def chunk_columns(n_rows: int, vocab: int, itemsize: int, chunk_bytes: Optional[int] = None,
                  min_cols: Optional[int] = None) -> int:
    """Columns per vocabulary chunk: scratch R x C x (4 + itemsize, or 4 for fp32) bytes
    within ``chunk_bytes`` (default: max(CHUNK_BYTES_MIN, CHUNK_FRACTION of R x V x 4)),
    a multiple of 128, at least ``min_cols`` (default MIN_COLS) and at most V."""
    if chunk_bytes is None:
        chunk_bytes = max(CHUNK_BYTES_MIN, int(CHUNK_FRACTION * n_rows * vocab * 4))
    per_col = max(1, n_rows * (4 + (itemsize if itemsize != 4 else 0)))
    cols = chunk_bytes // per_col // 128 * 128
    return max(1, min(vocab, max(MIN_COLS if min_cols is None else min_cols, cols)))


# --------------------------------------------------------------------------- device code


@triton.jit
def _lse_chunk_kernel(
    Z, B, TGT, M, S, SZ, Q, ZT,
    R, C, v0, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr,
    WITH_SUM_SQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Folds one [R, C] chunk of raw logits (z = h W_c^T, row stride C) into the running
    per-row state: max m, s = sum exp(z - m), sz = sum exp(z - m)(z - m), target logit, and
    (WITH_SUM_SQ) q = sum exp(2 (z - m))."""
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    m = tl.load(M + offs_r, mask=mask_r, other=float("-inf"))
    s = tl.load(S + offs_r, mask=mask_r, other=0.0)
    zt = tl.load(ZT + offs_r, mask=mask_r, other=0.0)
    if WITH_ENT:
        sz = tl.load(SZ + offs_r, mask=mask_r, other=0.0)
    else:
        sz = s
    # q = sum exp(2 (z - m)) of this chunk, referenced to the running max; the state from
    # the earlier chunks (referenced to m0) is folded in after the loop. (Loading it before
    # the loop kept one more value live through it: ptxas spilled on sm_90 / bf16.)
    m0 = m
    q = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tgt = tl.load(TGT + offs_r, mask=mask_r, other=-1) - v0
    row_ptr = Z + offs_r.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        z = tl.load(row_ptr[:, None] + offs_c[None, :], mask=mask_r[:, None] & mask_c[None, :],
                    other=0.0)
        if HAS_BIAS:
            z += tl.load(B + v0 + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            z = tanh(z / softcap) * softcap
        z = z * inv_temperature
        zt += tl.sum(tl.where(offs_c[None, :] == tgt[:, None], z, 0.0), axis=1)
        zm = tl.where(mask_c[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp(-inf - -inf)
        scale = tl.exp(m - m_new)
        e = tl.exp(zm - m_new[:, None])
        if WITH_ENT:
            delta = tl.where(m == float("-inf"), 0.0, m - m_new)
            sz = scale * (sz + delta * s) + tl.sum(e * (z - m_new[:, None]), axis=1)
        s = s * scale + tl.sum(e, axis=1)
        if WITH_SUM_SQ:  # rescaled by exp(2 (m_old - m_new)) = scale^2; e = 0 when padded
            q = q * (scale * scale) + tl.sum(e * e, axis=1)
        m = m_new
    tl.store(M + offs_r, m, mask=mask_r)
    tl.store(S + offs_r, s, mask=mask_r)
    tl.store(ZT + offs_r, zt, mask=mask_r)
    if WITH_ENT:
        tl.store(SZ + offs_r, sz, mask=mask_r)
    if WITH_SUM_SQ:  # m0 = -inf on the first chunk: its (zero) state gets weight 0
        q += tl.load(Q + offs_r, mask=mask_r, other=0.0) * tl.exp(2.0 * (m0 - m))
        tl.store(Q + offs_r, q, mask=mask_r)


@triton.jit
def _dz_chunk_kernel(
    Z, DZ, B, TGT, RMAX, LOGS, ENT, GLP, COEF, GENT, SIDX, SEQG,
    R, C, v0, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
    SEQ_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dz = d loss / d(raw logits) for one [R, C] chunk (row stride C); written in DZ's
    dtype (DZ may alias Z for fp32). Per-row inputs are compact ([R], one per valid row)."""
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    tgt = tl.load(TGT + offs_r, mask=mask_r, other=-1)
    rmax = tl.load(RMAX + offs_r, mask=mask_r, other=0.0)
    logs = tl.load(LOGS + offs_r, mask=mask_r, other=0.0)
    if SEQ_GRAD:
        sid = tl.load(SIDX + offs_r, mask=mask_r, other=0)
        glp = tl.load(SEQG + sid, mask=mask_r, other=0.0)
        coef = glp
    else:
        glp = tl.load(GLP + offs_r, mask=mask_r, other=0.0)
        coef = tl.load(COEF + offs_r, mask=mask_r, other=0.0)
    if HAS_GENT:
        ge = tl.load(GENT + offs_r, mask=mask_r, other=0.0)
        he = tl.load(ENT + offs_r, mask=mask_r, other=0.0)
    else:
        ge = coef
        he = coef
    row_off = offs_r.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_r[:, None] & mask_c[None, :]
        z = tl.load(Z + row_off[:, None] + offs_c[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            z += tl.load(B + v0 + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        t = z
        if SOFTCAP:
            t = tanh(z / softcap)
            z = t * softcap
        z = z * inv_temperature
        dz = dz_tile(z, t, offs_c + v0, mask_c, mask_r, tgt, rmax, logs, glp, coef, ge, he,
                     inv_temperature, SOFTCAP, HAS_GENT)
        tl.store(DZ + row_off[:, None] + offs_c[None, :], round_like(dz, DZ, UPCAST),
                 mask=mask)


# --------------------------------------------------------------------------- host code


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
    chunk_bytes: Optional[int] = None,
    min_cols: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward (no grad). Same contract as ``logprobs_torch.logprobs_forward``.

    Args:
        hidden: [N, D] fp32/fp16/bf16. weight: [V, D] same dtype. bias: [V] or None.
        targets: [N] int64; ``ignore_index`` marks skipped positions.
        with_sum_sq: also return log_sum_sq (forward only).
        chunk_bytes, min_cols: scratch budget per vocabulary chunk (see chunk_columns).
    Returns:
        logp [N], row_max [N], entropy [N] (or [0] unless ``with_entropy``), log_sum [N],
        log_sum_sq [N] (log sum_v p_v^2; or [0] unless ``with_sum_sq``), all fp32, 0.0
        where ignored.
    """
    hidden, weight, bias, targets = check_inputs(hidden, weight, bias, targets)
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    row_max = torch.zeros(n, dtype=torch.float32, device=dev)
    log_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=dev)
    lsq = torch.zeros(n if with_sum_sq else 0, dtype=torch.float32, device=dev)
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    r = rows.numel()
    if r == 0 or vocab == 0:
        return logp, row_max, ent, log_sum, lsq
    all_rows = r == n
    hv = hidden if all_rows else hidden.index_select(0, rows)
    tv = (targets if all_rows else targets.index_select(0, rows)).contiguous()
    m = torch.full((r,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(r, dtype=torch.float32, device=dev)
    zt = torch.zeros(r, dtype=torch.float32, device=dev)
    sz = torch.zeros(r if with_entropy else 1, dtype=torch.float32, device=dev)
    q = torch.zeros(r if with_sum_sq else 1, dtype=torch.float32, device=dev)
    cols = chunk_columns(r, vocab, hidden.element_size(), chunk_bytes, min_cols)
    buf = torch.empty(r * cols, dtype=torch.float32, device=dev)
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, WITH_ENT=with_entropy,
                 WITH_SUM_SQ=with_sum_sq)
    cap = float(softcap) if softcap is not None else 1.0
    for v0 in range(0, vocab, cols):
        c = min(cols, vocab - v0)
        z = buf[: r * c].view(r, c)
        gemm_f32(hv, weight[v0:v0 + c].t(), z)
        grid, opts = _row_launch("fwd", r)
        _lse_chunk_kernel[grid](
            z, bias if bias is not None else z, tv, m, s, sz, q, zt, r, c, v0, cap,
            float(inv_temperature), **flags, **opts)
    del buf
    ls = torch.log(s)
    # m and log s stay separate (lse = m + log s is formed by the caller).
    logp.index_copy_(0, rows, (zt - m) - ls)
    row_max.index_copy_(0, rows, m)
    log_sum.index_copy_(0, rows, ls)
    if with_entropy:
        ent.index_copy_(0, rows, ls - sz / s)
    if with_sum_sq:  # log sum p^2 = log sum exp(2 (z - m)) - 2 log s
        lsq.index_copy_(0, rows, torch.log(q) - 2.0 * ls)
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
    seq_index: Optional[Tensor] = None,
    seq_grad: Optional[Tensor] = None,
    chunk_bytes: Optional[int] = None,
    min_cols: Optional[int] = None,
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward: recomputes each chunk's logits and forms dz there (see module docstring).
    ``need_dh`` / ``need_dw`` False: that GEMM is skipped and None returned.

    Args as ``logprobs_triton.logprobs_backward`` (row_max, log_sum, entropy: [N] fp32 from
    the forward; grad_*: [N] fp32 or None; ``seq_index`` [N] / ``seq_grad`` [S]: per-sequence
    upstream grad gathered inside the dz kernel, given only with grad_logp = grad_lse = None).
    Returns:
        grad_hidden [N, D] (hidden.dtype), grad_weight [V, D] (weight.dtype), grad_bias [V]
        (bias.dtype) or None.
    """
    hidden, weight, bias, targets = check_inputs(hidden, weight, bias, targets)
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    dw = torch.zeros_like(weight) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None else None
    use_seq = seq_grad is not None or seq_index is not None
    use_ent = grad_entropy is not None
    if use_ent and (entropy is None or entropy.numel() != n):
        raise ValueError("grad_entropy needs the forward's entropy (with_entropy=True)")
    valid = targets != ignore_index
    if use_seq:
        seq_index, seqg = check_seq_args(seq_index, seq_grad, grad_logp, grad_lse, n, dev)
        rows = valid.nonzero().squeeze(1)
        sids = seq_index.index_select(0, rows)
        if rows.numel() and (int(sids.min()) < 0 or int(sids.max()) >= seqg.numel()):
            raise ValueError(f"seq_index of a valid position is outside [0, {seqg.numel()})")
        glp = coef = None
    else:
        zero = torch.zeros(n, dtype=torch.float32, device=dev)
        g_lp = grad_logp.float() if grad_logp is not None else zero
        g_lse = grad_lse.float() if grad_lse is not None else zero
        g_e = grad_entropy.float() if use_ent else zero
        rows = (valid & ((g_lp != 0) | (g_lse != 0) | (g_e != 0))).nonzero().squeeze(1)
        glp = g_lp.index_select(0, rows).contiguous()
        coef = (g_lp - g_lse).index_select(0, rows).contiguous()
        sids = seqg = None
    r = rows.numel()
    if r == 0 or vocab == 0:
        return (torch.zeros_like(hidden) if need_dh else None, dw,
                db.to(bias.dtype) if db is not None else None)
    all_rows = r == n
    pick = (lambda x: x.contiguous()) if all_rows else (lambda x: x.index_select(0, rows))
    hv = hidden if all_rows else hidden.index_select(0, rows)
    tv = pick(targets)
    rmax = pick(row_max.float())
    logs = pick(log_sum.float())
    ge = pick(grad_entropy.float()) if use_ent else rmax
    he = pick(entropy.float()) if use_ent else rmax
    dh = torch.zeros(r, d, dtype=torch.float32, device=dev) if need_dh else None
    cols = chunk_columns(r, vocab, hidden.element_size(), chunk_bytes, min_cols)
    zbuf = torch.empty(r * cols, dtype=torch.float32, device=dev)
    half = hidden.dtype != torch.float32
    dzbuf = torch.empty(r * cols, dtype=hidden.dtype, device=dev) if half else zbuf
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_GENT=use_ent,
                 SEQ_GRAD=use_seq)
    cap = float(softcap) if softcap is not None else 1.0
    for v0 in range(0, vocab, cols):
        c = min(cols, vocab - v0)
        z = zbuf[: r * c].view(r, c)
        dz = dzbuf[: r * c].view(r, c)
        w_c = weight[v0:v0 + c]
        gemm_f32(hv, w_c.t(), z)
        grid, opts = _row_launch("bwd", r)
        _dz_chunk_kernel[grid](
            z, dz, bias if bias is not None else z, tv, rmax, logs, he,
            glp if glp is not None else rmax, coef if coef is not None else rmax, ge,
            sids if sids is not None else tv, seqg if seqg is not None else rmax,
            r, c, v0, cap, float(inv_temperature), **flags, **opts, UPCAST=interpreting())
        if need_dh:
            gemm_f32(dz, w_c, dh, accumulate=True)
        if not need_dw:
            pass
        elif half and not dz.is_cuda:
            dw[v0:v0 + c] = torch.mm(dz.t().float(), hv.float()).to(weight.dtype)
        else:
            torch.mm(dz.t(), hv, out=dw[v0:v0 + c])
        if db is not None:
            db[v0:v0 + c] = dz.sum(0, dtype=torch.float32)
    del zbuf, dzbuf
    if not need_dh:
        grad_hidden = None
    elif all_rows:
        grad_hidden = dh.to(hidden.dtype)
    else:
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden.index_copy_(0, rows, dh.to(hidden.dtype))
    return grad_hidden, dw, (db.to(bias.dtype) if db is not None else None)


_ROW_ARG_TYPES = {
    "Z": "*fp32", "DZ": "*{dt}", "B": "*{dt}", "TGT": "*i64", "M": "*fp32", "S": "*fp32",
    "SZ": "*fp32", "Q": "*fp32", "ZT": "*fp32", "RMAX": "*fp32", "LOGS": "*fp32", "ENT": "*fp32",
    "GLP": "*fp32", "COEF": "*fp32", "GENT": "*fp32", "SIDX": "*i64", "SEQG": "*fp32",
    "R": "i32", "C": "i32", "v0": "i32", "softcap": "fp32", "inv_temperature": "fp32",
}


def kernel_specs(dtype: torch.dtype, features: bool = True) -> list:
    """Compile-gate entries for the two row kernels at their default GPU configs (same keys
    as ``logprobs_triton.kernel_specs``); every feature flag on when ``features``, else off.
    No GEMM inside (the GEMMs are the library's), so the gate checks spills only."""
    dt = TRITON_DTYPE[dtype]
    specs = []
    for name, fn, kind in (("lse_chunk", _lse_chunk_kernel, "fwd"),
                           ("dz_chunk", _dz_chunk_kernel, "bwd")):
        br, bc, nw = ROW_CONFIGS[kind]
        signature, constexprs = {}, {}
        for arg in fn.arg_names:
            if arg in _ROW_ARG_TYPES:
                signature[arg] = _ROW_ARG_TYPES[arg].format(dt=dt)
            else:
                signature[arg] = "constexpr"
                constexprs[arg] = {"BLOCK_R": br, "BLOCK_C": bc, "UPCAST": False}.get(
                    arg, features)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if signature[a].startswith("*")}
        specs.append(dict(name=name, fn=fn, signature=signature, constexprs=constexprs,
                          attrs=attrs, options=dict(num_warps=nw, num_stages=1), gemm=False))
    return specs
