"""Model adapter: a Hugging Face causal LM seen as a body (hidden states) and a head.

The fused ops never call the model's own LM head: the body gives the last hidden states
``h [..., D]`` and the head is applied by :func:`dpo_fast.linear_logprobs` from the head's
weight ``[V, D]`` (and bias ``[V]``, if any). This module finds those parts and the head's
logit transform for any ``transformers`` causal LM, so the reference cache and the trainer
read them the same way:

- :func:`model_parts` -- ``(body, weight, bias)``; tied input / output embeddings are one
  tensor, which is what the head uses.
- :func:`head_settings` -- the effective ``(softcap, temperature)``: ``softcap=None`` takes the
  config's ``final_logit_softcapping`` (Gemma 2/3); Granite's ``logits_scaling`` (logits / s)
  and Cohere's ``logit_scale`` (logits * s) are folded into the temperature.
- :func:`body_hidden` -- the body's forward (``use_cache=False``) to ``[B, T, D]``.

A head that does something these settings do not describe is caught by the reference cache's
head check (the model's own logits are compared with the fused head on one example).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .ops.logprobs import check_head_options


class ModelParts(NamedTuple):
    """A causal LM's body and head.

    Attributes:
        body: the module mapping ``input_ids [B, T]`` (+ ``attention_mask``) to the last hidden
            states ``[B, T, D]`` (``get_decoder()``, else ``base_model``).
        weight: the head weight ``[V, D]`` (the input embedding when tied).
        bias: the head bias ``[V]``, or None.
    """

    body: torch.nn.Module
    weight: Tensor
    bias: Optional[Tensor]


def text_config(model) -> Any:
    """The model's text config (``config.get_text_config()`` for multimodal configs), or
    ``model.config``, or None."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:
            return cfg
    return cfg


def model_parts(model) -> ModelParts:
    """(body, head weight [V, D], head bias [V] or None) of a causal LM.

    Raises:
        ValueError if ``get_output_embeddings()`` is not a module with a 2-D weight, or no body
        sub-module is found.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} is not supported: its "
                         "get_output_embeddings() must return the LM head (a module with a "
                         f"[V, D] weight), got {type(head).__name__}")
    body = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"cannot find the body of {type(model).__name__}: neither "
                         "get_decoder() nor base_model gives a sub-module")
    bias = getattr(head, "bias", None)
    return ModelParts(body, weight, bias if isinstance(bias, Tensor) else None)


def head_settings(model, softcap: Optional[float], temperature: float
                  ) -> Tuple[Optional[float], float]:
    """Effective ``(softcap, temperature)`` of the model's head.

    ``softcap`` None takes the config's ``final_logit_softcapping``; Granite's
    ``logits_scaling`` (logits / s) and Cohere's ``logit_scale`` (logits * s) are folded into
    ``temperature`` (the fused op computes ``softcap * tanh(z / softcap) / temperature``).

    Raises:
        ValueError for a non-positive or non-finite softcap / temperature.
    """
    cfg = text_config(model)
    if softcap is None and cfg is not None:
        softcap = getattr(cfg, "final_logit_softcapping", None)
    check_head_options(softcap, temperature)
    temperature = float(temperature)
    scaling = getattr(cfg, "logits_scaling", None) if cfg is not None else None
    if isinstance(scaling, (int, float)) and scaling != 1:
        temperature *= float(scaling)
    scale = getattr(cfg, "logit_scale", None) if cfg is not None else None
    if isinstance(scale, (int, float)) and scale != 1:
        temperature /= float(scale)
    return (None if softcap is None else float(softcap)), temperature


def model_dtype(model) -> torch.dtype:
    """The head weight's dtype (else the first parameter's)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and isinstance(getattr(head, "weight", None), Tensor):
        return head.weight.dtype
    return next(model.parameters()).dtype


def input_device(model, weight: Tensor) -> torch.device:
    """Where the model takes its ``input_ids``: the input embedding's device (else the head
    weight's)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.device if isinstance(w, Tensor) else weight.device


def body_hidden(body: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                device: Optional[torch.device] = None) -> Tensor:
    """Last hidden states ``[B, T, D]`` of ``body`` for ``input_ids [B, T]`` with
    ``attention_mask [B, T]`` (no KV cache), moved to ``device`` if given."""
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h if device is None else h.to(device)
