"""Models: the one loader of a Hugging Face causal LM (and its tokenizer), and the adapter that
sees it as a body (hidden states) and a head.

Loading (the trainer and the command line alike):

- :func:`resolve_model_name` -- :data:`BUNDLED_MODEL` -> the converted SmolLM2 folder
  (:mod:`dpo_fast.assets`); other names unchanged;
- :func:`locate_model` -- checks a ``--model`` / ``--gguf-file`` pair without loading anything
  (a model folder, a ``.gguf`` file or a folder holding one, a hub id in the local cache or
  on a reachable hub) and gives the ``from_pretrained`` arguments;
- :func:`load_model` / :func:`load_tokenizer` -- ``from_pretrained`` with the attention choice
  (flash-attention 2 when ``flash_attn`` is importable on CUDA, else sdpa; retried without one
  on an attention error), ``local_files_only`` under ``HF_HUB_OFFLINE=1``, and one message
  naming the setting for any failure.

The adapter:

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

import contextlib
import os
import re
import socket
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .errors import first_line
from .ops.logprobs import check_head_options

#: The model name that stands for the bundled SmolLM2-135M-Instruct (dpo_fast.assets).
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


# ----------------------------------------------------------------------------- loading


def resolve_model_name(name: str) -> str:
    """``bundled:smollm2-135m-instruct`` -> the converted SmolLM2 folder; others unchanged."""
    if name == BUNDLED_MODEL:
        from .assets import smollm2_dir

        return str(smollm2_dir())
    if isinstance(name, str) and name.startswith("bundled:"):
        raise ValueError(f"unknown bundled model {name!r}; the bundled model is "
                         f"{BUNDLED_MODEL!r}")
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co",
                                       url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def locate_model(model: str, gguf_file: Optional[str] = None, *, what: str = "--model",
                 gguf_what: str = "--gguf-file") -> Tuple[str, Dict[str, Any]]:
    """``(name_or_path, from_pretrained kwargs)`` for a model and an optional GGUF file in
    its folder, checked without loading anything and without waiting on a network that is
    not there. ``what`` / ``gguf_what`` name the two settings in messages.

    Raises:
        ValueError saying what is wrong (no such path, a folder without ``config.json`` or
        with several ``.gguf`` files, a hub id neither cached nor reachable, ...).
    """
    model = resolve_model_name(model)
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"{what} {model}: a file that is not a .gguf model; give a model "
                             "folder (with config.json) or a .gguf file")
        if gguf_file:
            raise ValueError(f"{gguf_what} names a file inside a {what} folder; {what} is "
                             "already a .gguf file")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if gguf_file:
            if not (p / gguf_file).is_file():
                raise ValueError(f"{gguf_what} {gguf_file}: no such file in {model}")
            return str(p), {"gguf_file": gguf_file}
        if (p / "config.json").is_file():
            return str(p), {}
        ggufs = sorted(f.name for f in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), {"gguf_file": ggufs[0]}
        if ggufs:
            raise ValueError(f"{what} {model} holds several .gguf files ({', '.join(ggufs)}): "
                             f"pick one with {gguf_what}")
        raise ValueError(f"{what} {model}: no config.json (not a Hugging Face model folder) "
                         "and no .gguf file in it")
    looks_local = (model.startswith((".", "/", "~")) or model.count("/") > 1
                   or (os.sep != "/" and os.sep in model) or not _HUB_ID.match(model))
    if looks_local:
        raise ValueError(f"{what} {model}: no such file or directory")
    if gguf_file:
        raise ValueError(f"{what} {model}: not found locally ({gguf_what} needs a local "
                         "folder)")
    from huggingface_hub import constants, try_to_load_from_cache

    offline = str(os.environ.get("HF_HUB_OFFLINE", "")).upper() in ("1", "ON", "YES", "TRUE")
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        # in the local cache: load from there without asking an unreachable hub
        return model, ({"local_files_only": True} if offline or not _hub_reachable() else {})
    if offline or not _hub_reachable():
        why = ("HF_HUB_OFFLINE is set" if offline
               else "the Hugging Face hub cannot be reached from this machine")
        raise ValueError(f"{what} {model}: not found locally (no such folder or file, and not "
                         f"in the Hugging Face cache at {constants.HF_HUB_CACHE}) and {why}; "
                         "give a local model folder or .gguf file")
    return model, {}


def load_model(name: str, *, dtype: torch.dtype, device, what: str,
               attn_implementation: Optional[str] = "auto", **kwargs):
    """``AutoModelForCausalLM.from_pretrained(name)`` on ``device``.

    Args:
        name: a model folder, a hub id or :data:`BUNDLED_MODEL`.
        dtype: the weights' dtype.
        device: where the model goes (``torch.device`` or its name).
        what: the setting ``name`` came from, as messages name it (``"TrainConfig.model"``,
            ``"--model"``).
        attn_implementation: ``"auto"``: flash-attention 2 when ``flash_attn`` is importable
            and the device is CUDA, else sdpa (retried without the argument when the model
            refuses it); None: the library's default; else passed on.
        kwargs: more ``from_pretrained`` arguments (e.g. ``gguf_file``); a name that is not a
            folder loads with ``local_files_only`` when ``HF_HUB_OFFLINE=1``.

    Raises:
        ValueError ``"<what>=<name>: cannot load the model (<error>)"``.
    """
    from transformers import AutoModelForCausalLM

    name = resolve_model_name(name)
    device = torch.device(device)
    attn = attention_choice(attn_implementation, device)
    kw = dict(kwargs)
    if not Path(name).is_dir():
        kw.setdefault("local_files_only", os.environ.get("HF_HUB_OFFLINE") == "1")
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, **({} if attn is None else {"attn_implementation": attn}),
                **kw)
        except (ValueError, ImportError) as e:
            if attn_implementation != "auto" or (
                    "attn" not in str(e).lower() and "attention" not in str(e).lower()):
                raise
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    except Exception as e:
        shown = str(Path(name) / kw["gguf_file"]) if kw.get("gguf_file") else name
        raise ValueError(f"{what}={shown!r}: cannot load the model "
                         f"({type(e).__name__}: {first_line(e)})") from e
    return model.to(device)


def attention_choice(attn_implementation: Optional[str], device: torch.device
                     ) -> Optional[str]:
    """``"auto"`` -> flash-attention 2 when ``flash_attn`` is importable and ``device`` is
    CUDA, else sdpa; other values unchanged."""
    if attn_implementation != "auto":
        return attn_implementation
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside the block is moved to the meta device as it is
    registered (no storage; initializers on it do nothing); buffers stay real, so tables
    computed in ``__init__`` (rotary frequencies) keep their values. A layer's weight exists
    for a moment as an untouched ``torch.empty``, so the host memory of the whole build stays
    near zero."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"),
                                       requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(name: str, *, dtype: torch.dtype, device, what: str,
                attn_implementation: Optional[str] = "auto"):
    """The causal LM of the model folder ``name`` built from its ``config.json`` with every
    parameter on the meta device (see :func:`parameters_on_meta`): the architecture,
    ``dtype`` and attention choice of :func:`load_model`, no weights. ``device`` only decides
    the attention choice.

    Raises:
        ValueError ``"<what>=<name>: cannot build the model (<error>)"``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = resolve_model_name(name)
    attn = attention_choice(attn_implementation, torch.device(device))
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=Path(name).is_dir())
        with parameters_on_meta():
            try:
                model = AutoModelForCausalLM.from_config(
                    config, dtype=dtype, **({} if attn is None else {"attn_implementation": attn}))
            except (ValueError, ImportError) as e:
                if attn_implementation != "auto" or (
                        "attn" not in str(e).lower() and "attention" not in str(e).lower()):
                    raise
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise ValueError(f"{what}={name!r}: cannot build the model "
                         f"({type(e).__name__}: {first_line(e)})") from e
    model.config._name_or_path = name
    return model


def load_tokenizer(name: str, *, what: str, **kwargs):
    """``AutoTokenizer.from_pretrained(name, **kwargs)`` (``name`` as in :func:`load_model`);
    ValueError ``"<what>: cannot load a tokenizer from <name> (<error>)"``."""
    from transformers import AutoTokenizer

    name = resolve_model_name(name)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as e:
        raise ValueError(f"{what}: cannot load a tokenizer from {name!r} "
                         f"({type(e).__name__}: {first_line(e)})") from e
