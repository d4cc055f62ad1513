"""fp32-accumulating GEMM for every input dtype (shared by the GPU paths).

bf16/fp16 operands go to the library GEMM as they are with an fp32 output (``out_dtype``, on
CUDA): the products are exact in fp32 and accumulated in fp32, as in autograd's own half
GEMMs, without an fp32 copy of either operand. Where that overload is missing (CPU torch,
older versions) the operands are upcast, which computes the same values.
"""

from __future__ import annotations

import torch
from torch import Tensor

_OUT_DTYPE_GEMM = {}  # device type -> whether mm/addmm with out_dtype=float32 work


def gemm_f32(a: Tensor, b: Tensor, out: Tensor, accumulate: bool = False) -> None:
    """out (fp32) = a @ b, or out += a @ b, with fp32 accumulation for any input dtype."""
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    key = a.device.type
    if _OUT_DTYPE_GEMM.get(key, key == "cuda"):
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            _OUT_DTYPE_GEMM[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_GEMM[key] = False
    if accumulate:
        out.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=out)
