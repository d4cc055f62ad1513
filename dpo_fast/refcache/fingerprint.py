"""The cache's fingerprint: everything that changes the cached numbers.

A cache records the fingerprint it was built with; :meth:`dpo_fast.RefLogProbCache.open` with
``expect=`` and every build / ensure compare it field by field with the run's and refuse a
difference (:class:`FingerprintMismatchError` names each field), unless the caller allows it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..models import head_settings, model_dtype
from .store import LOGPROB_VERSION, FingerprintMismatchError

FINGERPRINT_FIELDS = ("logprob_version", "model_class", "model_config", "model_weights",
                      "model_weights_method", "tokenizer", "max_length", "truncation", "softcap",
                      "temperature", "dtype")
WEIGHT_METHODS = {
    "sample": ("sample-v1: SHA-256 over each state-dict tensor's name, shape, dtype, the int64 "
               "sums of its raw bit patterns in blocks of 262144 elements, and the raw bits of "
               "up to 4096 evenly strided elements"),
    "files": "files-v1: SHA-256 over the names, sizes and contents of the weight files in "
             "config._name_or_path",
}
_SUM_BLOCK = 1 << 18
_SAMPLE = 4096
# Config keys that do not change the numbers (paths, versions, bookkeeping).
_CONFIG_SKIP = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
                "output_hidden_states", "return_dict", "architectures", "pad_token_id",
                "bos_token_id", "eos_token_id", "id2label", "label2id", "problem_type",
                "tokenizer_class", "attn_implementation"}


def dtype_name(dtype: Union[torch.dtype, str]) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if isinstance(dtype, str):
        d = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(d, torch.dtype):
            return str(d).replace("torch.", "")
    raise ValueError(f"dtype must be a torch.dtype or its name, got {dtype!r}")


def _config_view(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _config_view(v) for k, v in sorted(obj.items())
                if not str(k).startswith("_") and k not in _CONFIG_SKIP}
    if isinstance(obj, (list, tuple)):
        return [_config_view(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _config_hash(model) -> Optional[str]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    text = json.dumps(_config_view(d), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _int_view(t: Tensor) -> Tensor:
    """1-D integer view of the raw bits of ``t`` (elements of at most 4 bytes)."""
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = flat.element_size()
    target = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}.get(size)
    if target is None:
        raise ValueError(f"cannot hash a tensor of dtype {t.dtype}; use weights='files'")
    return flat if flat.dtype == target else flat.view(target)


def _identity(t: Tensor) -> Optional[Tuple]:
    """What two state-dict entries of one tensor (tied weights) share: for an FSDP2 shard
    (DTensor) its local storage (each parameter has its own, also where its shard is empty,
    so every rank decides alike), else the data pointer, size and strides."""
    if t.numel() == 0:
        return None
    if hasattr(t, "to_local") and hasattr(t, "placements"):
        return ("shard", t.to_local().untyped_storage().data_ptr(), tuple(t.shape))
    return (t.data_ptr(), t.numel(), tuple(t.stride()))


def _weights_sample_hash(state: Dict[str, Any]) -> str:
    """``WEIGHT_METHODS["sample"]``: exact integer sums (order- and device-independent) catch a
    change anywhere; tied tensors are hashed once. A DTensor (FSDP2 shard) is gathered whole,
    one at a time (a collective: every rank calls this in the same order), so a sharded model
    hashes as the same model held whole."""
    h = hashlib.sha256(b"dpo_fast/weights-sample/v1\0")
    seen: Dict[Tuple, str] = {}
    for name, t in state.items():
        if not isinstance(t, Tensor):
            continue
        t = t.detach()
        h.update(json.dumps([name, list(t.shape), dtype_name(t.dtype)]).encode())
        ident = _identity(t)
        if ident is not None and ident in seen:
            h.update(f"alias:{seen[ident]}".encode())
            continue
        if ident is not None:
            seen[ident] = name
        if t.numel() == 0:
            continue
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        bits = _int_view(t)
        n = bits.numel()
        sums = torch.stack([c.sum(dtype=torch.int64) for c in bits.split(_SUM_BLOCK)])
        h.update(sums.cpu().numpy().astype("<i8").tobytes())
        k = min(n, _SAMPLE)
        idx = torch.arange(k, dtype=torch.int64, device=bits.device) * (n - 1) // max(k - 1, 1)
        sample = bits[idx].cpu().numpy()
        h.update(sample.astype(sample.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")


def _weights_files_hash(model) -> str:
    src = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    d = Path(src)
    if not src or not d.is_dir():
        raise ValueError(f"weights='files' needs model.config._name_or_path to be a local "
                         f"directory, got {src!r}; use weights='sample'")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(f"weights='files': no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in "
                         f"{d}; use weights='sample'")
    h = hashlib.sha256(b"dpo_fast/weights-files/v1\0")
    for p in files:
        h.update(json.dumps([p.name, p.stat().st_size]).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> Optional[str]:
    """SHA-256 of what makes a tokenizer tokenize (pipeline, vocabulary, special and added
    tokens, chat template); None for no tokenizer."""
    if tokenizer is None:
        return None
    special = {a: str(getattr(tokenizer, a, None)) for a in
               ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                "mask_token")}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    # What tokenizes: a fast tokenizer's backend (normalizer, pre-tokenizer, model, post-
    # processor; not the runtime truncation / padding settings), so the same tokenizer.json
    # loaded through another class (GPT2TokenizerFast vs AutoTokenizer) matches; a slow
    # tokenizer has only its class to go by.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        how = {"backend": spec}
    else:
        how = {"class": type(tokenizer).__name__}
    desc = {
        **how,
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "special": special,
        "all_special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []),
        "added": sorted((int(i), str(t)) for i, t in added.items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=repr).encode()).hexdigest()


def fingerprint(model, tokenizer=None, *, max_length: Optional[int] = None,
                truncation: str = "keep_start", softcap: Optional[float] = None,
                temperature: float = 1.0, dtype: Union[None, str, torch.dtype] = None,
                weights: str = "sample", state_dict: Optional[Dict[str, Tensor]] = None
                ) -> Dict[str, Any]:
    """Everything that changes the cached numbers, as a JSON-able dict of fields.

    ``state_dict``: the tensors the ``"sample"`` weight hash reads (default
    ``model.state_dict()``), e.g. a peft model's base weights under their base names.

    Fields: ``logprob_version`` (``LOGPROB_VERSION``), ``model_class``, ``model_config``
    (SHA-256 of the config without paths / versions / bookkeeping keys), ``model_weights``
    and ``model_weights_method`` (see below), ``tokenizer`` (SHA-256 of its tokenization
    pipeline -- a fast tokenizer's backend JSON without runtime truncation / padding, else its
    class name --, vocabulary, special and added tokens and chat template; None without a
    tokenizer), ``max_length``, ``truncation``, ``softcap`` / ``temperature`` (effective
    values: ``softcap=None`` takes the config's ``final_logit_softcapping``; Granite / Cohere
    logit scales are folded into the temperature), ``dtype`` (the model's, unless given).

    Weight methods (``weights=``):
      - ``"sample"`` (default): SHA-256 over every state-dict tensor's name, shape and dtype,
        the exact int64 sums of its raw bit patterns over blocks of 262,144 elements (exact,
        so independent of device, thread count and summation order, and any single changed
        element changes a sum) and the raw bits of up to 4,096 evenly strided elements. No
        full-precision copy of the weights is made (the per-block integer sums use a 2 MiB
        temporary; only a non-contiguous tensor is copied, one at a time). Measured on the
        2-core CPU machine: 0.07 s for SmolLM2-135M's shapes (134.5M fp32 parameters, tied
        embeddings hashed once; up to 0.7 s when the machine was busy); on a GPU it runs on
        the device.
      - ``"files"``: SHA-256 of the weight files in ``model.config._name_or_path`` (a local
        directory). Reads every byte (about 1 GB/s) and does not see in-memory changes.
    """
    if truncation != "keep_start":
        raise ValueError(f"truncation must be 'keep_start' (the only mode a cached prompt / "
                         f"response split supports), got {truncation!r}")
    if weights not in WEIGHT_METHODS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_METHODS)}, got {weights!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")
    softcap, temperature = head_settings(model, softcap, temperature)
    with torch.no_grad():
        wh = (_weights_sample_hash(model.state_dict() if state_dict is None else state_dict)
              if weights == "sample" else _weights_files_hash(model))
    return {
        "logprob_version": LOGPROB_VERSION,
        "model_class": type(model).__name__,
        "model_config": _config_hash(model),
        "model_weights": wh,
        "model_weights_method": WEIGHT_METHODS[weights],
        "tokenizer": tokenizer_hash(tokenizer),
        "max_length": max_length,
        "truncation": truncation,
        "softcap": softcap,
        "temperature": temperature,
        "dtype": dtype_name(dtype if dtype is not None else model_dtype(model)),
    }


def fingerprint_differences(stored: Dict[str, Any], expected: Dict[str, Any]
                             ) -> Dict[str, Tuple[Any, Any]]:
    missing = "<absent>"
    return {f: (stored.get(f, missing), expected.get(f, missing))
            for f in sorted(set(stored) | set(expected))
            if stored.get(f, missing) != expected.get(f, missing)}


def allowed_fields(allow_mismatch) -> set:
    if allow_mismatch is True:
        return set(FINGERPRINT_FIELDS)
    if allow_mismatch in (None, False):
        return set()
    if isinstance(allow_mismatch, str):
        allow_mismatch = (allow_mismatch,)
    fields = set(allow_mismatch)
    unknown = fields - set(FINGERPRINT_FIELDS)
    if unknown:
        raise ValueError(f"allow_mismatch names unknown fingerprint field(s) {sorted(unknown)}; "
                         f"fields are {list(FINGERPRINT_FIELDS)}")
    return fields


def check_fingerprint(stored: Dict[str, Any], expected: Dict[str, Any], where: Path,
                       allow_mismatch=()) -> None:
    allowed = allowed_fields(allow_mismatch)
    diffs = fingerprint_differences(stored, expected)
    refused = {f: v for f, v in diffs.items() if f not in allowed}
    if refused:
        lines = "\n".join(f"  {f}: cache has {a!r}, this run has {b!r}"
                          for f, (a, b) in refused.items())
        raise FingerprintMismatchError(
            f"the reference cache at {where} was built with a different fingerprint; "
            f"differing field(s): {', '.join(refused)}\n{lines}", refused,
            hint="Rebuild it (overwrite=True or a new directory), or, if you know the values "
                 "are still right, open it with allow_mismatch=(field names) or "
                 "allow_mismatch=True.",
            cli_hint="Rerun with --overwrite to rebuild the cache for this run's settings, or "
                     "choose another --out directory.")
    if diffs:
        warnings.warn(f"reference cache at {where}: fingerprint field(s) {sorted(diffs)} differ "
                      "and were allowed by allow_mismatch", RuntimeWarning, stacklevel=3)


def validate_fingerprint(fp: Dict[str, Any], softcap, temperature, dtype: str) -> None:
    """ValueError unless a caller's fingerprint agrees with what the build uses."""
    if not isinstance(fp, dict):
        raise ValueError(f"fingerprint must be a dict (see dpo_fast.refcache.fingerprint), got "
                         f"{type(fp).__name__}")
    want = {"softcap": softcap, "temperature": temperature, "dtype": dtype,
            "logprob_version": LOGPROB_VERSION}
    bad = {k: (fp.get(k, "<absent>"), v) for k, v in want.items() if fp.get(k, "<absent>") != v}
    if bad:
        raise ValueError("fingerprint disagrees with this build's settings: " + "; ".join(
            f"{k}: fingerprint has {a!r}, the build uses {b!r}" for k, (a, b) in bad.items()))
