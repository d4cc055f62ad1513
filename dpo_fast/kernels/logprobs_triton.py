"""Triton kernels for the fused linear -> per-token log-prob op.

Same functions, signatures and math as the pure-PyTorch twin
(:mod:`dpo_fast.kernels.logprobs_torch`); read its docstring for the formulas.

Kernels (one program per tile, logits only ever exist as one [BLOCK_N, BLOCK_V] tile):

- ``_fwd_kernel``: one program per tile of valid tokens; loops over vocab tiles
  (inner loop over D for the dot), online logsumexp, target gather by comparing
  column ids with the target, optional entropy (running sum of exp(z - m) * (z - m)),
  optional log sum p^2 (running sum of exp(2 (z - m)), forward only). Saves only
  per-position scalars.
- ``_bwd_dh_kernel``: one program per token tile; recomputes z tiles, forms dz and
  accumulates dh += dz @ W into an fp32 buffer whose rows it alone owns.
- ``_bwd_dw_kernel``: one program per vocab tile; recomputes z tiles, forms dz and
  accumulates dW += dz^T @ h (and db) into fp32 rows it alone owns.

The softcap tanh, the softmax gradient of a tile and the rounding of dz are the
``@triton.jit`` helpers of :mod:`dpo_fast.kernels.triton_common`, shared with the chunked
backend (:mod:`dpo_fast.kernels.logprobs_chunked`).

Fused-DPO mode (constexpr ``SEQ_GRAD``): given ``seq_index`` [N] and ``seq_grad`` [S], the
backward kernels gather each token's upstream grad ``seq_grad[seq_index[row]]`` themselves,
so no [N] gradient tensor is built on the host.

Backward is deterministic: no atomics; each accumulator has exactly one owner and the
loop order is fixed. Ignored positions are never loaded: the host builds a compact int32
index of the rows to process and the kernels read ``hidden`` through it.

Dot precision (a constexpr, checked by the compile gate): fp16/bf16 inputs use
tensor-core mma with fp32 accumulation (dz is rounded to the input dtype before the
backward GEMMs, like every bf16 training kernel); fp32 inputs use ``tf32x3`` (fp32-level
accuracy on tensor cores; plain tf32 would cost ~1e-3 relative error).

Under ``TRITON_INTERPRET=1`` (CPU) the kernels run on CPU tensors: operands are upcast to
fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong) and much larger blocks are
used (interpreter cost scales with programs x tiles, not FLOPs).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (
    TRITON_DTYPE, check_inputs, check_seq_args, dz_tile, interpreting, round_like, tanh,
)

# Default GPU configs per kernel and input dtype ("half" = fp16/bf16), chosen so that every
# kernel compiles with tensor-core mma/wgmma and zero spills on sm_80 and sm_90 with every
# supported Triton (3.8 and 3.9; checked by dpo_fast/kernels/compile_gate.py, run under both in
# CI). fp32 needs smaller tiles: tf32x3 splits each operand in two, tripling the live dot
# state. The fp32 forward takes BLOCK_D=16: at BLOCK_D=32 it used all 255 registers on sm_80
# with either Triton and spilled 32-40 bytes of stack with 3.8; at 16 it uses 128-168. The two
# backward kernels share BLOCK_N/BLOCK_V so they see the same dz tiles (gradient filtering
# then skips the same tiles in both).
DEFAULT_CONFIGS: Dict[str, Dict[str, Dict[str, int]]] = {
    "fwd": {
        "half": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=4, num_stages=3),
    },
    "bwd_dh": {
        "half": dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    },
    "bwd_dw": {
        "half": dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    },
}
# Interpreter blocks (each capped by next_power_of_2 of the real size).
INTERPRET_CONFIGS: Dict[str, Dict[str, int]] = {
    "fwd": dict(BLOCK_N=256, BLOCK_V=1024, BLOCK_D=512),
    "bwd_dh": dict(BLOCK_N=256, BLOCK_V=1024, BLOCK_D=512),
    "bwd_dw": dict(BLOCK_N=256, BLOCK_V=1024, BLOCK_D=512),
}
# Candidate configs tried when DPO_FAST_TRITON_AUTOTUNE=1 (GPU only); otherwise the single
# default above is used, so nothing is benchmarked at run time.
AUTOTUNE_CANDIDATES: List[Dict[str, int]] = [
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=3),
]
_AUTOTUNE_ENV = "DPO_FAST_TRITON_AUTOTUNE"


# --------------------------------------------------------------------------- device code


@triton.jit
def _logits_tile(
    H, W, B, row_off, mask_n, offs_v, mask_v, D, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 logits after bias, softcap and temperature, and tanh(z0/c)."""
    offs_d = tl.arange(0, BLOCK_D)
    w_off = offs_v.to(tl.int64) * D
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        md = dd < D
        h = tl.load(H + row_off[:, None] + dd[None, :],
                    mask=mask_n[:, None] & md[None, :], other=0.0)
        w = tl.load(W + w_off[:, None] + dd[None, :],
                    mask=mask_v[:, None] & md[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += b[None, :]
    t = acc
    if SOFTCAP:
        t = tanh(acc / softcap)
        acc = t * softcap
    acc = acc * inv_temperature
    return acc, t


@triton.jit
def _fwd_kernel(
    H, W, B, TGT, ROWS, LOGP, RMAX, LOGS, ENT, LSQ,
    n_rows, V, D, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr,
    WITH_SUM_SQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows = tl.load(ROWS + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=mask_n, other=-1)
    row_off = rows * D

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m), for the entropy
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(2 (z - m)), for log sum p^2
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z, _t = _logits_tile(
            H, W, B, row_off, mask_n, offs_v, mask_v, D, softcap, inv_temperature,
            HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION,
        )
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        zm = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp(-inf - -inf)
        scale = tl.exp(m - m_new)
        e = tl.exp(zm - m_new[:, None])
        if WITH_ENT:
            # sz = sum exp(z - m) * (z - m), rebased to the new max; e = 0 on padded columns.
            delta = tl.where(m == float("-inf"), 0.0, m - m_new)
            sz = scale * (sz + delta * s) + tl.sum(e * (z - m_new[:, None]), axis=1)
        s = s * scale + tl.sum(e, axis=1)
        if WITH_SUM_SQ:  # rescaled by exp(2 (m_old - m_new)) = scale^2; e = 0 when padded
            q = q * (scale * scale) + tl.sum(e * e, axis=1)
        m = m_new
    log_s = tl.log(s)
    # m and log_s stay separate (lse = m + log_s is formed by the caller): a rounded fp32
    # lse would cost the backward's log p = (z - m) - log_s its accuracy at |z| ~ 1e4.
    tl.store(RMAX + rows, m, mask=mask_n)
    tl.store(LOGS + rows, log_s, mask=mask_n)
    tl.store(LOGP + rows, (zt - m) - log_s, mask=mask_n)
    if WITH_ENT:
        # H = lse - E_p[z] = log(s) - E_p[z - m]: no cancellation against |lse| ~ 1e4.
        tl.store(ENT + rows, log_s - sz / s, mask=mask_n)
    if WITH_SUM_SQ:
        # log sum p^2 = log q - 2 log s, both referenced to the max (q >= 1: no underflow).
        tl.store(LSQ + rows, tl.log(q) - 2.0 * log_s, mask=mask_n)


@triton.jit
def _load_row_scalars(
    TGT, RMAX, LOGS, ENT, GLP, COEF, GENT, SIDX, SEQG, ROWS, offs_n, n_rows,
    HAS_GENT: tl.constexpr, SEQ_GRAD: tl.constexpr,
):
    mask_n = offs_n < n_rows
    rows = tl.load(ROWS + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=mask_n, other=-1)
    rmax = tl.load(RMAX + rows, mask=mask_n, other=0.0)
    logs = tl.load(LOGS + rows, mask=mask_n, other=0.0)
    if SEQ_GRAD:
        # Upstream grad of a token = its sequence's grad, gathered here (no [N] grad tensor
        # on the host). ROWS holds only valid positions, so an ignored position's sequence
        # id (e.g. -1) is never used; there is no grad_lse in this mode, so coef = glp.
        sid = tl.load(SIDX + rows, mask=mask_n, other=0)
        glp = tl.load(SEQG + sid, mask=mask_n, other=0.0)
        coef = glp
    else:
        glp = tl.load(GLP + rows, mask=mask_n, other=0.0)
        coef = tl.load(COEF + rows, mask=mask_n, other=0.0)
    if HAS_GENT:
        ge = tl.load(GENT + rows, mask=mask_n, other=0.0)
        he = tl.load(ENT + rows, mask=mask_n, other=0.0)
    else:
        ge = coef
        he = coef
    return mask_n, rows, tgt, rmax, logs, glp, coef, ge, he


@triton.jit
def _tile_is_live(dz, filter_eps, FILTER: tl.constexpr):
    if FILTER:
        live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps
    else:
        live = True
    return live


@triton.jit
def _bwd_dh_kernel(
    H, W, B, TGT, ROWS, RMAX, LOGS, ENT, GLP, COEF, GENT, SIDX, SEQG, DH,
    n_rows, V, D, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr, FILTER: tl.constexpr,
    SEQ_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n, rows, tgt, rmax, logs, glp, coef, ge, he = _load_row_scalars(
        TGT, RMAX, LOGS, ENT, GLP, COEF, GENT, SIDX, SEQG, ROWS, offs_n, n_rows, HAS_GENT,
            SEQ_GRAD)
    row_off = rows * D
    offs_d = tl.arange(0, BLOCK_D)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z, t = _logits_tile(
            H, W, B, row_off, mask_n, offs_v, mask_v, D, softcap, inv_temperature,
            HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION,
        )
        dz = dz_tile(z, t, offs_v, mask_v, mask_n, tgt, rmax, logs, glp, coef, ge, he,
                     inv_temperature, SOFTCAP, HAS_GENT)
        if _tile_is_live(dz, filter_eps, FILTER):
            dzc = round_like(dz, W, UPCAST)
            w_off = offs_v.to(tl.int64) * D
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                md = dd < D
                w = tl.load(W + w_off[:, None] + dd[None, :],
                            mask=mask_v[:, None] & md[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                # This program alone owns these dh rows: read-modify-write, deterministic.
                acc_ptr = DH + row_off[:, None] + dd[None, :]
                acc_mask = mask_n[:, None] & md[None, :]
                acc = tl.load(acc_ptr, mask=acc_mask, other=0.0)
                acc = tl.dot(dzc, w, acc, input_precision=DOT_PRECISION)
                tl.store(acc_ptr, acc, mask=acc_mask)


@triton.jit
def _bwd_dw_kernel(
    H, W, B, TGT, ROWS, RMAX, LOGS, ENT, GLP, COEF, GENT, SIDX, SEQG, DW, DB,
    n_rows, V, D, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr, FILTER: tl.constexpr,
    SEQ_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    w_off = offs_v.to(tl.int64) * D
    offs_d = tl.arange(0, BLOCK_D)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n, rows, tgt, rmax, logs, glp, coef, ge, he = _load_row_scalars(
            TGT, RMAX, LOGS, ENT, GLP, COEF, GENT, SIDX, SEQG, ROWS, offs_n, n_rows, HAS_GENT,
            SEQ_GRAD)
        row_off = rows * D
        z, t = _logits_tile(
            H, W, B, row_off, mask_n, offs_v, mask_v, D, softcap, inv_temperature,
            HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PRECISION,
        )
        dz = dz_tile(z, t, offs_v, mask_v, mask_n, tgt, rmax, logs, glp, coef, ge, he,
                     inv_temperature, SOFTCAP, HAS_GENT)
        if HAS_BIAS:
            db += tl.sum(dz, axis=0)  # exact even when the tile's GEMM is filtered out
        if _tile_is_live(dz, filter_eps, FILTER):
            dzt = tl.trans(round_like(dz, W, UPCAST))
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                md = dd < D
                h = tl.load(H + row_off[:, None] + dd[None, :],
                            mask=mask_n[:, None] & md[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                # This program alone owns these dW rows: read-modify-write, deterministic.
                acc_ptr = DW + w_off[:, None] + dd[None, :]
                acc_mask = mask_v[:, None] & md[None, :]
                acc = tl.load(acc_ptr, mask=acc_mask, other=0.0)
                acc = tl.dot(dzt, h, acc, input_precision=DOT_PRECISION)
                tl.store(acc_ptr, acc, mask=acc_mask)
    if HAS_BIAS:
        tl.store(DB + offs_v, db, mask=mask_v)


# --------------------------------------------------------------------------- host code

_KERNELS = {"fwd": _fwd_kernel, "bwd_dh": _bwd_dh_kernel, "bwd_dw": _bwd_dw_kernel}
_GEMM_KERNELS = ("fwd", "bwd_dh", "bwd_dw")  # all three carry tl.dot
_BLOCK_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
# Runtime (non-constexpr) argument types, by argument name; "{dt}" is the input dtype.
_ARG_TYPES = {
    "H": "*{dt}", "W": "*{dt}", "B": "*{dt}", "TGT": "*i64", "ROWS": "*i32",
    "LOGP": "*fp32", "RMAX": "*fp32", "LOGS": "*fp32", "ENT": "*fp32", "LSQ": "*fp32",
    "GLP": "*fp32", "COEF": "*fp32",
    "GENT": "*fp32", "SIDX": "*i64", "SEQG": "*fp32", "DH": "*fp32", "DW": "*fp32", "DB": "*fp32",
    "n_rows": "i32", "V": "i32", "D": "i32",
    "softcap": "fp32", "inv_temperature": "fp32", "filter_eps": "fp32",
}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision per input dtype: tf32x3 keeps fp32 inputs at fp32 accuracy.

    For fp16/bf16 operands the setting is inert (tensor-core mma, fp32 accumulate)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def default_config(name: str, dtype: torch.dtype) -> Dict[str, int]:
    """Default GPU config (blocks, num_warps, num_stages) of kernel ``name`` for ``dtype``."""
    return DEFAULT_CONFIGS[name]["fp32" if dtype == torch.float32 else "half"]


def _blocks(name: str, dtype: torch.dtype, n: int, v: int, d: int,
            interpret: bool) -> Dict[str, int]:
    if not interpret:
        return {k: default_config(name, dtype)[k] for k in _BLOCK_KEYS}
    cfg = INTERPRET_CONFIGS[name]
    sizes = {"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}
    # tl.dot needs every dim >= 16.
    return {k: max(16, min(cfg[k], triton.next_power_of_2(max(sizes[k], 1)))) for k in _BLOCK_KEYS}


def kernel_specs(dtype: torch.dtype, features: bool = True) -> List[dict]:
    """What the compile gate needs to build every kernel at its default GPU config.

    One entry per kernel, with every feature flag (bias, softcap, entropy, log sum p^2,
    filtering, the
    backward's in-kernel per-sequence gradient gather ``SEQ_GRAD``) on when ``features``
    (the largest register footprint), else off (the common fast path), so the gate compiles
    both the [N]-grad and the per-sequence-grad variants of the backward kernels:
    ``name``, ``fn`` (the JITFunction), ``signature`` (arg name -> Triton type or
    "constexpr"), ``constexprs``, ``attrs`` (ASTSource divisibility hints), ``options``
    (num_warps, num_stages), ``gemm`` (whether its PTX must hold tensor-core mma/wgmma).
    """
    dt = TRITON_DTYPE[dtype]
    flags = {k: features for k in ("HAS_BIAS", "SOFTCAP", "WITH_ENT", "WITH_SUM_SQ", "HAS_GENT",
                                   "FILTER", "SEQ_GRAD")}
    specs = []
    for name, fn in _KERNELS.items():
        cfg = default_config(name, dtype)
        signature, constexprs = {}, {}
        for arg in fn.arg_names:
            if arg in _ARG_TYPES:
                signature[arg] = _ARG_TYPES[arg].format(dt=dt)
            else:
                signature[arg] = "constexpr"
                if arg in flags:
                    constexprs[arg] = flags[arg]
                elif arg in cfg:
                    constexprs[arg] = cfg[arg]
                elif arg == "UPCAST":
                    constexprs[arg] = False
                elif arg == "DOT_PRECISION":
                    constexprs[arg] = dot_precision(dtype)
                else:
                    raise KeyError(f"{name}: no value for constexpr {arg}")
        # The specialization a launch gets for the usual shapes: 16-byte aligned pointers and
        # D, V multiples of 16 (the JIT marks such arguments tt.divisibility=16 by itself).
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if signature[arg].startswith("*") or arg in ("D", "V")}
        specs.append(dict(
            name=name, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
            gemm=name in _GEMM_KERNELS,
        ))
    return specs


_autotuned: Dict[str, object] = {}


def launch(name: str, n_programs_fn, args: tuple, flags: dict, sizes: Tuple[int, int, int],
           dtype: torch.dtype, reset: Tuple[str, ...] = ()) -> None:
    """Launch kernel ``name`` ("fwd" | "bwd_dh" | "bwd_dw") with the default (or
    interpreter, or autotuned) config. The host functions launch through this module-level
    name, so a benchmark may replace it to time one backward kernel alone."""
    interpret = interpreting()
    common = dict(flags, UPCAST=interpret, DOT_PRECISION=dot_precision(dtype))
    if not interpret and os.environ.get(_AUTOTUNE_ENV) == "1":
        fn = _autotuned.get(name)
        if fn is None:
            configs = [
                triton.Config({k: c[k] for k in _BLOCK_KEYS},
                              num_warps=c["num_warps"], num_stages=c["num_stages"])
                for c in AUTOTUNE_CANDIDATES
            ]
            # The accumulators are read-modify-write: zero them before every trial run.
            fn = triton.autotune(configs=configs, key=["V", "D"], reset_to_zero=list(reset))(
                _KERNELS[name])
            _autotuned[name] = fn
        fn[lambda meta: (n_programs_fn(meta),)](*args, **common)
        return
    blocks = _blocks(name, dtype, *sizes, interpret=interpret)
    cfg = default_config(name, dtype)
    opts = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _KERNELS[name][(n_programs_fn(blocks),)](*args, **common, **blocks, **opts)


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
    """Forward of the fused op (Triton). Same contract as the twin's ``logprobs_forward``.

    Args:
        hidden: [N, D] fp32/fp16/bf16. weight: [V, D] same dtype. bias: [V] or None.
        targets: [N] int64; ``ignore_index`` marks skipped positions.
        with_sum_sq: also return log_sum_sq (forward only).
    Returns:
        logp [N] fp32, row_max [N] fp32, entropy [N] fp32 (shape [0] unless
        ``with_entropy``), log_sum [N] fp32, log_sum_sq [N] fp32 (log sum_v p_v^2; shape [0]
        unless ``with_sum_sq``); 0.0 where ignored. lse = row_max + log_sum.
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
    rows = (targets != ignore_index).nonzero().squeeze(1).to(torch.int32)
    n_rows = rows.numel()
    if n_rows == 0 or vocab == 0:
        return logp, row_max, ent, log_sum, lsq
    args = (
        hidden, weight, bias if bias is not None else weight, targets, rows, logp, row_max,
        log_sum, ent if with_entropy else row_max, lsq if with_sum_sq else row_max,
        n_rows, vocab, d, float(softcap) if softcap is not None else 1.0, float(inv_temperature),
    )
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, WITH_ENT=with_entropy,
                 WITH_SUM_SQ=with_sum_sq)
    launch("fwd", lambda b: triton.cdiv(n_rows, b["BLOCK_N"]), args, flags,
           (n_rows, vocab, d), hidden.dtype)
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
    grad_filter_eps: Optional[float] = None,
    seq_index: Optional[Tensor] = None,
    seq_grad: Optional[Tensor] = None,
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the fused op (Triton): recomputes logits tile by tile. ``need_dh`` /
    ``need_dw`` False: that kernel is not launched (db still is, with a bias) and None is
    returned for it.

    Args:
        row_max, log_sum, entropy: [N] fp32 from the forward (entropy only with
            grad_entropy).
        grad_logp, grad_lse, grad_entropy: [N] fp32 upstream grads, or None for zero.
        grad_filter_eps: if set, a [BLOCK_N, BLOCK_V] tile whose max |dz| is below it
            skips its dh and dW GEMMs (an approximation; db stays exact). None: exact.
        seq_index, seq_grad: per-sequence upstream grad (the fused DPO loss), given together
            and only with ``grad_logp is None and grad_lse is None``. ``seq_index`` [N] int
            is each position's sequence id in [0, S) (any value, e.g. -1, at ignored
            positions: it is never read there); ``seq_grad`` [S] fp32 is dL/d(sequence
            logp). The kernels then gather ``grad_logp[i] = seq_grad[seq_index[i]]`` in-kernel
            (constexpr ``SEQ_GRAD``), so no [N] gradient tensor is built on the host; the
            result equals the [N]-grad path with ``grad_logp = seq_grad[seq_index] * valid``
            (bitwise when every valid position's sequence grad is nonzero; otherwise to fp32
            summation-order noise, since zero-grad rows are then not skipped). ``grad_entropy``
            is still supported in this mode; ``grad_lse`` is refused (ValueError).
    Returns:
        grad_hidden [N, D] (hidden.dtype), grad_weight [V, D] (weight.dtype),
        grad_bias [V] (bias.dtype) or None.
    """
    hidden, weight, bias, targets = check_inputs(hidden, weight, bias, targets)
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    # fp32 accumulators; for fp32 inputs they are the outputs themselves.
    dh = torch.zeros(n, d, dtype=torch.float32, device=dev)
    dw = torch.zeros(vocab, d, dtype=torch.float32, device=dev)
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None else None

    def _out():
        return (dh.to(hidden.dtype) if need_dh else None,
                dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if db is not None else None)

    use_seq = seq_grad is not None or seq_index is not None
    if use_seq:
        seq_index, seq_grad = check_seq_args(seq_index, seq_grad, grad_logp, grad_lse, n, dev)
    use_ent = grad_entropy is not None
    if use_ent and (entropy is None or entropy.numel() != n):
        raise ValueError("grad_entropy needs the forward's entropy (with_entropy=True)")
    if use_seq:
        # Every valid row is processed (its sequence grad is only known in-kernel).
        rows = (targets != ignore_index).nonzero().squeeze(1).to(torch.int32)
        n_rows = rows.numel()
        if n_rows and vocab:
            sids = seq_index[rows.long()]
            if int(sids.min()) < 0 or int(sids.max()) >= seq_grad.numel():
                raise ValueError(f"seq_index of a valid position is outside [0, "
                                 f"{seq_grad.numel()})")
        # GLP/COEF are never read with SEQ_GRAD: any fp32 pointer will do.
        g_lp = coef = row_max
        g_ent = grad_entropy.float().contiguous() if use_ent else row_max
        ent = entropy.float().contiguous() if use_ent else row_max
    else:
        zero = torch.zeros(n, dtype=torch.float32, device=dev)
        g_lp = grad_logp.float().contiguous() if grad_logp is not None else zero
        g_lse = grad_lse.float() if grad_lse is not None else zero
        g_ent = grad_entropy.float().contiguous() if use_ent else zero
        live = (targets != ignore_index) & ((g_lp != 0) | (g_lse != 0) | (g_ent != 0))
        rows = live.nonzero().squeeze(1).to(torch.int32)
        n_rows = rows.numel()
        coef = (g_lp - g_lse).contiguous() if n_rows and vocab else zero
        ent = entropy.float().contiguous() if use_ent else zero
        seq_index, seq_grad = targets, g_lp  # placeholders, never read without SEQ_GRAD
    if n_rows == 0 or vocab == 0:
        return _out()
    row_max = row_max.float().contiguous()
    log_sum = log_sum.float().contiguous()
    filt = grad_filter_eps is not None
    scalars = (n_rows, vocab, d, float(softcap) if softcap is not None else 1.0,
               float(inv_temperature), float(grad_filter_eps) if filt else 0.0)
    common = (hidden, weight, bias if bias is not None else weight, targets, rows, row_max,
              log_sum, ent,
              g_lp, coef, g_ent, seq_index, seq_grad)
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_GENT=use_ent,
                 FILTER=filt, SEQ_GRAD=use_seq)
    sizes = (n_rows, vocab, d)
    if need_dh:
        launch("bwd_dh", lambda b: triton.cdiv(n_rows, b["BLOCK_N"]),
               common + (dh,) + scalars, flags, sizes, hidden.dtype, reset=("DH",))
    if need_dw or db is not None:
        launch("bwd_dw", lambda b: triton.cdiv(vocab, b["BLOCK_V"]),
               common + (dw, db if db is not None else dw) + scalars, flags, sizes, hidden.dtype,
               reset=("DW", "DB"))
    return _out()
