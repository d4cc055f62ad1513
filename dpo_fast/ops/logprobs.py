"""``linear_logprobs``: per-token log-probs straight from hidden states and the LM head.

The [tokens x vocab] logits never exist: every backend streams the vocabulary in tiles
(online logsumexp in forward, recompute in backward). Backends:

- ``"triton"``: Triton row kernels (online logsumexp, softmax gradient) around library GEMMs
  on vocabulary chunks (``kernels/logprobs_chunked.py``; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``). The GPU default.
- ``"triton_fused"``: fully fused Triton kernels, GEMMs included (``kernels/
  logprobs_triton.py``); kept for study, several times slower than "triton" on an H100.
- ``"cpu"``: the C++/OpenMP kernel in ``csrc/`` (extension ``dpo_fast._C``).
- ``"torch"``: the chunked pure-PyTorch twin (any device).
- ``"auto"``: triton on CUDA, else cpu if built, else torch.

The op is registered with ``torch.library.custom_op`` (forward and backward), so
``torch.compile`` traces through it without graph breaks and autograd works for every
backend the same way.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ..kernels import logprobs_torch
from ..kernels.options import HeadOptions

IMPLS = ("auto", "triton", "triton_fused", "cpu", "torch")
TRITON_IMPLS = ("triton", "triton_fused")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LinearLogprobs(NamedTuple):
    """Output of :func:`linear_logprobs` when extras are requested.

    Each tensor is float32 and shaped like ``targets``; 0.0 at ignored positions.
    ``lse`` / ``entropy`` are None unless ``return_lse`` / ``return_entropy`` was set.
    """

    logp: Tensor
    lse: Optional[Tensor]
    entropy: Optional[Tensor]


# ----------------------------------------------------------------------------- backends

_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _cpu_backend():
    """The C++ backend module, or None (with a one-time warning) if it is not built."""
    from ..kernels import logprobs_cpu

    if logprobs_cpu.available():
        return logprobs_cpu
    _warn_once(
        "cpu",
        "dpo_fast: the C++ CPU kernel (dpo_fast._C) is not built "
        f"({logprobs_cpu.load_error()}); falling back to the pure-PyTorch backend. "
        "Reinstall with `pip install --no-build-isolation -e .` to build it.",
    )
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_backend(name: str):
    try:
        if name == "triton_fused":
            from ..kernels import logprobs_triton as mod
        else:
            from ..kernels import logprobs_chunked as mod
    except ImportError as e:  # triton missing
        raise ValueError(f"impl={name!r} needs the triton package: {e}") from e
    return mod


def _resolve_impl(impl: str, device: torch.device) -> str:
    """Maps ``impl`` (incl. "auto") to the concrete backend name for ``device``."""
    if impl == "auto":
        if device.type == "cuda":
            try:
                import triton  # noqa: F401

                return "triton"
            except ImportError:
                return "torch"
        if device.type == "cpu":
            from ..kernels import logprobs_cpu

            return "cpu" if logprobs_cpu.available() else "torch"
        return "torch"
    if impl in TRITON_IMPLS and device.type == "cpu" and not _interpreting():
        raise ValueError(
            f"impl={impl!r} on CPU tensors needs TRITON_INTERPRET=1 set before dpo_fast is "
            "imported; use impl='cpu' or 'torch' on CPU."
        )
    if impl == "cpu" and device.type != "cpu":
        raise ValueError(f"impl='cpu' needs CPU tensors, got device {device}")
    return impl


def backend_module(name: str):
    """The backend module of a resolved impl name (see :func:`prepare_inputs`): it has
    ``logprobs_forward`` / ``logprobs_backward`` (contract: ``kernels/logprobs_torch.py``)."""
    if name in TRITON_IMPLS:
        return _triton_backend(name)
    if name == "cpu":
        return _cpu_backend() or logprobs_torch
    return logprobs_torch


# ------------------------------------------------------------------- torch.library ops
# The options travel as one HeadOptions value; the custom-op schemas take its fields as
# keyword-only arguments (HeadOptions.op_kwargs), so the autograd formulas return gradients
# for the tensor inputs only.


# Forward outputs: logp, lse, entropy, and for the backward the row max m and
# log_sum = log sum exp(z - m) (kept apart: their rounded sum would cost the backward
# fp32 accuracy at large |z|; see logprobs_torch).
@torch.library.custom_op("dpo_fast::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
    with_entropy: bool, ignore_index: int, softcap: Optional[float], inv_temperature: float,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    logp, row_max, ent, log_sum, _ = backend_module(impl).logprobs_forward(
        hidden, weight, bias, targets, ignore_index=ignore_index, softcap=softcap,
        inv_temperature=inv_temperature, with_entropy=with_entropy,
    )
    return logp, row_max + log_sum, ent, row_max, log_sum


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, *, with_entropy, **_opts):
    n = targets.shape[0]
    out = hidden.new_empty((n,), dtype=torch.float32)
    ent = hidden.new_empty((n if with_entropy else 0,), dtype=torch.float32)
    return out, torch.empty_like(out), ent, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("dpo_fast::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, row_max: Tensor,
    log_sum: Tensor, entropy: Optional[Tensor], grad_logp: Optional[Tensor],
    grad_lse: Optional[Tensor], grad_entropy: Optional[Tensor], *,
    need_dh: bool, need_dw: bool, ignore_index: int, softcap: Optional[float],
    inv_temperature: float, impl: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = backend_module(impl).logprobs_backward(
        hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_lse,
        grad_entropy, ignore_index=ignore_index, softcap=softcap, inv_temperature=inv_temperature,
        need_dh=need_dh, need_dw=need_dw,
    )
    return grads_or_empty(hidden, dh, dw, db)


@_bwd_op.register_fake
def _(hidden, weight, bias, *_tensors, need_dh, need_dw, **_opts):
    return fake_grads(hidden, weight, bias, need_dh, need_dw)


def grads_or_empty(hidden: Tensor, *grads: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """A custom op returns tensors: an empty one stands for a gradient not computed."""
    return tuple(g if g is not None else hidden.new_empty((0,)) for g in grads)


def fake_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_dh: bool,
               need_dw: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Shapes of (dh, dW, db) for the fake implementations (empty when not computed)."""
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_dw else hidden.new_empty((0,)), db)


def head_grads(ctx, bias: Optional[Tensor], dh: Tensor, dw: Tensor, db: Tensor,
               n_other: int) -> Tuple[Optional[Tensor], ...]:
    """What an autograd formula over (hidden, weight, bias, *``n_other`` more tensor inputs)
    returns: each gradient where its input needs one, else None; None for the others."""
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw if need[1] else None,
            db if bias is not None and need[2] else None) + (None,) * n_other


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs (e.g. entropy for logging) cost nothing
    hidden, weight, bias, targets = inputs
    kw = dict(keyword_only_inputs)
    ctx.with_entropy = kw.pop("with_entropy")
    ctx.opts = HeadOptions(**kw)
    _, _, ent, row_max, log_sum = output
    ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum, ent)


def _backward(ctx, g_logp, g_lse, g_ent, _g_max, _g_log_sum):
    hidden, weight, bias, targets, row_max, log_sum, ent = ctx.saved_tensors
    if not ctx.with_entropy:
        g_ent, ent = None, None
    # A frozen input (e.g. the LM head under LoRA) gets no GEMM.
    dh, dw, db = _bwd_op(
        hidden, weight, bias, targets, row_max, log_sum, ent, g_logp, g_lse, g_ent,
        need_dh=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
        **ctx.opts.op_kwargs(),
    )
    return head_grads(ctx, bias, dh, dw, db, 1)


torch.library.register_autograd(
    "dpo_fast::linear_logprobs_fwd", _backward, setup_context=_setup_context
)


# -------------------------------------------------------------------------- public API


def _check_inputs(hidden, weight, targets, bias, ignore_index, softcap, temperature, impl):
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise ValueError("hidden and weight must be torch.Tensor")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight.shape[1]={weight.shape[1]}, "
            f"got hidden shape {tuple(hidden.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError("targets must be an integer tensor of token ids")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}"
        )
    for name, t in (("weight", weight), ("targets", targets)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    check_head_options(softcap, temperature)
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def _check_target_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        vals = targets[bad][:5].tolist()
        raise ValueError(
            f"targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
            f"{int(bad.sum())} bad ids, first at {where}: {vals}"
        )


def check_head_options(softcap, temperature) -> None:
    """ValueError unless ``softcap`` is None or a finite number > 0 and ``temperature`` is a
    finite number > 0 (the head transform every backend and the cache apply)."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap)
                                    and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def prepare_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], *,
                   ignore_index: int, softcap: Optional[float], temperature: float,
                   impl: str) -> Tuple[Tensor, Tensor, Tensor, HeadOptions]:
    """Validates the op's inputs and returns ``(hidden [N, D], weight [V, D], targets [N]
    int64, HeadOptions)``: flattened, contiguous, with ``impl`` resolved for the device
    (and "cpu" falling back to "torch", with one warning, when the extension is missing)."""
    _check_inputs(hidden, weight, targets, bias, ignore_index, softcap, temperature, impl)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    t1 = targets.reshape(-1).to(torch.int64)
    if not torch.compiler.is_compiling():
        _check_target_range(t1, weight.shape[0], ignore_index)
    name = _resolve_impl(impl, hidden.device)
    if name == "cpu" and _cpu_backend() is None:
        name = "torch"
    opts = HeadOptions(ignore_index=ignore_index,
                       softcap=None if softcap is None else float(softcap),
                       inv_temperature=1.0 / float(temperature), impl=name)
    return h2, w, t1, opts


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_lse: bool = False,
    return_entropy: bool = False,
    impl: str = "auto",
) -> Union[Tensor, LinearLogprobs]:
    """Per-token log-probs of ``targets`` under ``softmax(hidden @ weight.T + bias)``.

    ``logp[i] = log_softmax(z_i)[targets[i]]`` with ``z_i = hidden[i] @ weight.T + bias``,
    then ``z = softcap * tanh(z / softcap)`` if ``softcap`` is set, then ``z / temperature``;
    fp32 accumulation throughout. No [tokens x vocab] tensor is ever allocated.

    Args:
        hidden: [..., D] float32 / float16 / bfloat16 hidden states.
        weight: [V, D] LM-head weight, same dtype as ``hidden``.
        targets: [...] (= ``hidden.shape[:-1]``) integer token ids; ``ignore_index`` marks
            positions to skip (they cost nothing and give 0.0).
        bias: optional [V] head bias.
        softcap: Gemma-style logit soft-capping value, or None.
        temperature: logits are divided by it (after soft-capping).
        return_lse: also return the logsumexp per position.
        return_entropy: also return the softmax entropy per position.
        impl: "auto" | "triton" | "triton_fused" | "cpu" | "torch" (module docstring).

    Returns:
        float32 tensor shaped like ``targets`` (0.0 where ignored), differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias``; or, if an extra is requested, a
        :class:`LinearLogprobs` ``(logp, lse, entropy)`` (``lse`` and ``entropy`` are
        differentiable too; the unrequested one is None).
    """
    lead = targets.shape
    h2, w, t1, opts = prepare_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                                     softcap=softcap, temperature=temperature, impl=impl)
    logp, lse, ent, _, _ = _fwd_op(h2, w, bias, t1, with_entropy=bool(return_entropy),
                                   **opts.op_kwargs())
    logp = logp.view(lead)
    if not (return_lse or return_entropy):
        return logp
    return LinearLogprobs(
        logp,
        lse.view(lead) if return_lse else None,
        ent.view(lead) if return_entropy else None,
    )
