"""C++/OpenMP backend of the fused linear -> per-token log-prob op (``csrc/logprobs.cpp``).

Same signatures and math as :mod:`dpo_fast.kernels.logprobs_torch` (the twin); the kernels
are the ``torch.ops.dpo_fast_cpu.logprobs_fwd`` / ``logprobs_bwd`` ops registered by the
compiled extension ``dpo_fast._C`` (built by ``pip install --no-build-isolation -e .``).
With ``DPO_FAST_JIT_BUILD=1`` a missing extension is compiled on first use instead
(``torch.utils.cpp_extension.load``, cached per user).

Nothing is loaded at import: :func:`available` loads the extension once and keeps the
error for :func:`load_error`, so callers can warn once and fall back to the twin.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

_state: dict = {"tried": False, "ok": False, "error": None}


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if not (csrc / "logprobs.cpp").exists():
        raise ImportError(f"DPO_FAST_JIT_BUILD=1 but {csrc / 'logprobs.cpp'} is missing")
    load(
        name="dpo_fast_cpu_jit",
        sources=[str(csrc / "logprobs.cpp")],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _register_fakes() -> None:
    """Shape-only versions of the ops, so torch.compile can trace through them."""

    @torch.library.register_fake("dpo_fast_cpu::logprobs_fwd")
    def _fwd_fake(hidden, weight, bias, targets, ignore_index, softcap, inv_temperature,
                  with_entropy, with_sum_sq=False):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32)
        return (hidden.new_empty(n, **f32), hidden.new_empty(n, **f32),
                hidden.new_empty(n if with_entropy else 0, **f32), hidden.new_empty(n, **f32),
                hidden.new_empty(n if with_sum_sq else 0, **f32))

    @torch.library.register_fake("dpo_fast_cpu::logprobs_bwd")
    def _bwd_fake(hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_lse,
                  grad_entropy, ignore_index, softcap, inv_temperature, need_dh=True,
                  need_dw=True):
        none = hidden.new_empty(0, dtype=torch.float32)
        db = bias.new_empty(bias.shape) if bias is not None else none
        return (hidden.new_empty(hidden.shape) if need_dh else none,
                weight.new_empty(weight.shape) if need_dw else none, db)


def _load() -> bool:
    if _state["tried"]:
        return _state["ok"]
    _state["tried"] = True
    try:
        importlib.import_module("dpo_fast._C")
    except ImportError as e:
        _state["error"] = f"{type(e).__name__}: {e}"
        if os.environ.get("DPO_FAST_JIT_BUILD") != "1":
            return False
        try:
            _jit_build()
        except Exception as e2:  # compiler missing, build error, ...
            _state["error"] += f"; JIT build failed: {type(e2).__name__}: {e2}"
            return False
    if not hasattr(torch.ops.dpo_fast_cpu, "logprobs_fwd"):
        _state["error"] = "the extension loaded but did not register dpo_fast_cpu ops"
        return False
    _register_fakes()
    _state["ok"], _state["error"] = True, None
    return True


def available() -> bool:
    """True if the compiled kernel is loaded (loads it on the first call)."""
    return _load()


def load_error() -> Optional[str]:
    """Why :func:`available` is False (None if it is True or was not asked yet)."""
    _load()
    return _state["error"]


def pin_vocab_groups(groups: int) -> int:
    """Pins the C++ kernel's vocabulary groups (its split of the vocabulary tiles, by default
    one group per torch thread) to ``groups``; 0 restores the default. With the groups pinned,
    the kernel's tile and reduction order, and so its results bit for bit, stay the same when
    ``torch.set_num_threads`` changes: it then runs min(groups, threads) threads. Returns the
    previous setting (0, and nothing pinned, when the kernel is not loaded)."""
    if not _load():
        return 0
    return int(torch.ops.dpo_fast_cpu.set_vocab_groups(int(groups)))


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
    """Forward of the fused op; see ``logprobs_torch.logprobs_forward`` for the contract.

    Returns logp [N], row_max [N], entropy [N] (shape [0] unless ``with_entropy``),
    log_sum [N] (lse = row_max + log_sum) and log_sum_sq [N] (log sum_v p_v^2; shape [0]
    unless ``with_sum_sq``), fp32, 0.0 at ignored positions.
    """
    if not _load():
        raise RuntimeError(f"dpo_fast C++ CPU kernel unavailable: {_state['error']}")
    return torch.ops.dpo_fast_cpu.logprobs_fwd(
        hidden, weight, bias, targets, int(ignore_index),
        None if softcap is None else float(softcap), float(inv_temperature), bool(with_entropy),
        bool(with_sum_sq),
    )


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
    """Backward of the fused op (recomputes logits tile by tile); see the twin.

    Returns grad_hidden [N, D], grad_weight [V, D] (input dtypes; None when not
    ``need_dh`` / ``need_dw``: that GEMM is skipped), grad_bias [V] or None.
    """
    if not _load():
        raise RuntimeError(f"dpo_fast C++ CPU kernel unavailable: {_state['error']}")
    dh, dw, db = torch.ops.dpo_fast_cpu.logprobs_bwd(
        hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_lse, grad_entropy,
        int(ignore_index), None if softcap is None else float(softcap), float(inv_temperature),
        bool(need_dh), bool(need_dw),
    )
    return (dh if need_dh else None), (dw if need_dw else None), (db if bias is not None else None)
