"""Triton helpers shared by the two Triton backends (``logprobs_chunked``, the GPU default,
and ``logprobs_triton``, the fully fused kernels), like cut-cross-entropy's ``tl_utils.py``.

Device code (``@triton.jit``, inlined into the kernels that call them):

- :func:`tanh`: tanh from ``exp`` (libdevice fails under the interpreter), for the softcap.
- :func:`dz_tile`: the softmax gradient dz0 = d loss / d(raw logits) of one logit tile.
- :func:`round_like`: fp32 -> the weight's dtype with the GPU's round-to-nearest-even, also
  under the interpreter.

Host code: :func:`check_inputs` / :func:`check_seq_args` (argument checks of both backends'
``logprobs_forward`` / ``logprobs_backward``), :func:`interpreting` and ``TRITON_DTYPE``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

#: torch dtype -> Triton type name of the input pointers (the supported input dtypes).
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """True when the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------- device code


@triton.jit
def tanh(x):
    # libdevice.tanh fails under the interpreter. Below |x| = 0.625 the exp form loses the
    # relative accuracy (1 - e cancels), so use the Cephes tanhf odd polynomial there (same
    # as csrc/vec_math.h); above it (1 - e) / (1 + e), where exp(-2|x|) never overflows.
    ax = tl.abs(x)
    s = x * x
    p = -5.70498872745e-3
    p = p * s + 2.06390887954e-2
    p = p * s - 5.37397155531e-2
    p = p * s + 1.33314422036e-1
    p = p * s - 3.33332819422e-1
    p = p * s * x + x
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    big = tl.where(x >= 0, t, -t)
    return tl.where(ax < 0.625, p, big)


@triton.jit
def dz_tile(
    z, t, offs_v, mask_v, mask_n, tgt, rmax, logs, glp, coef, ge, he, inv_temperature,
    SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr,
):
    """dz0 = d loss / d(raw logits) for one tile; 0 at padded rows and columns."""
    logsm = (z - rmax[:, None]) - logs[:, None]  # log p, fp32-accurate even at |z| ~ 1e4
    p = tl.where(mask_n[:, None] & mask_v[None, :], tl.exp(logsm), 0.0)
    if HAS_GENT:
        dz = -p * (coef[:, None] + ge[:, None] * (logsm + he[:, None]))
    else:
        dz = -p * coef[:, None]
    dz += tl.where(offs_v[None, :] == tgt[:, None], glp[:, None], 0.0)
    dz = dz * inv_temperature
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def round_like(x, W, UPCAST: tl.constexpr):
    """Rounds fp32 ``x`` to W's element type as the GPU does (round to nearest even).

    The interpreter's fp32 -> bf16 cast truncates (and its "rtne" mode is wrong too), which
    would double the error of the backward GEMM operand there; so when interpreting, the
    rounding is done on the bits and the value stays fp32 for the (upcast) dot.
    """
    if UPCAST:
        if W.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            y = bits.to(tl.float32, bitcast=True)
        else:
            y = x.to(W.dtype.element_ty).to(tl.float32)
    else:
        y = x.to(W.dtype.element_ty)
    return y


# --------------------------------------------------------------------------- host code


def check_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Checks hidden [N, D], weight [V, D] (same dtype, one of ``TRITON_DTYPE``), bias [V] or
    None and targets [N]; returns them contiguous."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [N, D] and [V, D]")
    if hidden.dtype != weight.dtype or hidden.dtype not in TRITON_DTYPE:
        raise TypeError(f"hidden/weight must share a dtype in fp32/fp16/bf16, got "
                        f"{hidden.dtype}/{weight.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [V={weight.shape[0]}]")
    return (hidden.contiguous(), weight.contiguous(),
            bias.contiguous() if bias is not None else None, targets.contiguous())


def check_seq_args(seq_index: Optional[Tensor], seq_grad: Optional[Tensor],
                   grad_logp: Optional[Tensor], grad_lse: Optional[Tensor], n: int,
                   dev: torch.device) -> Tuple[Tensor, Tensor]:
    """Validates the backward's per-sequence grad arguments (shared by the Triton backends);
    returns (seq_index int64 [N], seq_grad fp32 [S]), contiguous on ``dev``."""
    if seq_grad is None or seq_index is None:
        raise ValueError("seq_index and seq_grad must be given together")
    if grad_logp is not None or grad_lse is not None:
        raise ValueError("seq_grad replaces grad_logp, and grad_lse is not supported "
                         "with it: pass grad_logp=None, grad_lse=None")
    if seq_index.shape != (n,) or seq_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seq_index must be [N={n}] int64, got "
                         f"{tuple(seq_index.shape)} {seq_index.dtype}")
    if seq_grad.dim() != 1:
        raise ValueError(f"seq_grad must be [S], got {tuple(seq_grad.shape)}")
    return (seq_index.to(device=dev, dtype=torch.int64).contiguous(),
            seq_grad.to(device=dev, dtype=torch.float32).contiguous())
