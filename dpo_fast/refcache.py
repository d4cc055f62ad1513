"""Reference log-probs computed once, cached on disk, looked up by content key.

DPO needs, for every preference pair, the reference model's log-probs of the chosen and the
rejected response. :class:`RefLogProbCache` computes them once (forward only, through the
fused log-prob op: the model body gives the last hidden states and
:func:`dpo_fast.linear_logprobs` turns them into per-token log-probs without ever building
the [tokens x vocab] logits), stores them in a directory, and serves them by the examples'
content keys (:attr:`dpo_fast.PreferenceExample.key`), so training holds one model and a
shuffled or filtered dataset still finds its values.

What a value is (``LOGPROB_VERSION`` 1): for a sequence ``prompt + response`` the sum over the
response tokens of ``log_softmax(z_t)[token]`` with ``z_t = h_t W^T + b`` (then softcap, then
temperature; see :func:`dpo_fast.linear_logprobs`), where ``h_t`` is the model body's last
hidden state at the position before the token. Per-token values are fp32 (fp32 accumulation
whatever the model dtype); their sum is taken exactly (``math.fsum``) and rounded to float32.
The model runs in eval mode under ``torch.inference_mode``.

On-disk format (directory ``path``)::

    manifest.json              format, fingerprint, builds, shard list (JSON, sorted keys)
    shard-00000.safetensors    rows of the cache (safetensors, no pickle)
    shard-00001.safetensors
    ...

Each shard holds, for its ``n`` rows (in build order: longest first, then by key):
``keys`` uint8 [n, 16] (content keys), ``chosen_logps`` / ``rejected_logps`` float32 [n],
``chosen_lengths`` / ``rejected_lengths`` int32 [n] (response tokens), and with
``per_token=True`` also ``token_logps`` float32 [T] (row i's chosen tokens, then its
rejected tokens, at ``token_offsets[i]:token_offsets[i+1]``) and ``token_offsets`` int64
[n+1]. The manifest lists every shard with its row count, byte size and SHA-256, and each
build (one ``build``, or one per ``ensure`` that appended rows) with the hash of its plan.

Crash-safety protocol: every file (shard or manifest) is written to a temporary name in the
same directory, flushed and fsync'd, renamed over its final name with ``os.replace``, and the
directory is fsync'd. A shard is listed in the manifest only after its rename, and the
manifest is rewritten after each shard, so at any kill point the manifest lists only complete,
durable shards. The plan (which rows go into which batch and shard) depends only on the set of
examples and the settings, never on where a run resumed: a re-run keeps the listed shards
(after checking their SHA-256), deletes temporary files and unlisted shards, and computes the
rest, and the finished directory is byte-identical to an uninterrupted build. Opening a cache
checks every shard's size and SHA-256; a flipped byte or truncated shard is an error naming
the file.

Distributed build: with ``rank`` / ``world_size`` (or an initialized ``torch.distributed``)
rank r computes the plan's shards ``i`` with ``i % world_size == r`` into ``path/part-<r>/``
(same protocol, its own manifest); :meth:`RefLogProbCache.merge` (rank 0, after a barrier)
checks that every part used the same plan and fingerprint, moves the shards into ``path`` and
writes the manifest. The result is byte-identical to a single-process build (for the same
numerics on each rank: same device type and thread count).

Not provided: a lock against two processes building into one directory at the same time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .data import KEY_BYTES, PreferenceExample, pack_pair_batch
from .ops.logprobs import check_head_options, linear_logprobs

LOGPROB_VERSION = 1
FORMAT = "dpo_fast.refcache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEY_DEFINITION = ("first 16 bytes of SHA-256(b'dpo_fast/pref/v1\\0' + uint64-LE lengths of "
                  "prompt, chosen, rejected + their int32-LE ids)")
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
_IGNORE = -100
_SHARD_NAME = "shard-{:05d}.safetensors"
_PART_NAME = "part-{:05d}"
_TMP_MARK = ".tmp-"
_SUM_BLOCK = 1 << 18
_SAMPLE = 4096
_SHARD_TENSORS = ("keys", "chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")
_TOKEN_TENSORS = ("token_logps", "token_offsets")
# Config keys that do not change the numbers (paths, versions, bookkeeping).
_CONFIG_SKIP = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
                "output_hidden_states", "return_dict", "architectures", "pad_token_id",
                "bos_token_id", "eos_token_id", "id2label", "label2id", "problem_type",
                "tokenizer_class", "attn_implementation"}


# ----------------------------------------------------------------------------- errors


class RefCacheError(RuntimeError):
    """A reference cache cannot be built or opened as asked (see the message)."""


class CorruptCacheError(RefCacheError):
    """A shard or manifest on disk does not match what the manifest recorded."""


class FingerprintMismatchError(RefCacheError):
    """The cache was built with different settings. ``differences`` maps each differing field
    to ``(cache value, expected value)``."""

    def __init__(self, message: str, differences: Dict[str, Tuple[Any, Any]]):
        super().__init__(message)
        self.differences = differences


class MissingRowsError(KeyError):
    """Keys looked up that the cache does not hold. ``missing`` lists them (hex)."""

    def __init__(self, message: str, missing: List[str]):
        super().__init__(message)
        self.message = message
        self.missing = missing

    def __str__(self):  # KeyError would print the repr of the message
        return self.message


@dataclass(frozen=True)
class BuildProgress:
    """Passed to a build's ``progress`` callable.

    ``event`` is "start", "batch" (after a batch's forward), "shard" (after a shard is durable
    and listed in the manifest) or "done". Counts cover this build's plan (for a rank: its
    shards); ``rows_done`` / ``tokens_done`` include shards kept from an earlier run,
    ``rows_computed`` / ``tokens_computed`` only this run's work. Tokens are real tokens of
    both sequences (prompt counted twice), padding excluded.
    """

    event: str
    rows_done: int
    rows_total: int
    tokens_done: int
    tokens_total: int
    shards_done: int
    shards_total: int
    rows_computed: int
    tokens_computed: int
    elapsed_s: float


# ----------------------------------------------------------------------------- file helpers


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path``: temp name in the same dir, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _remove_temps(d: Path) -> None:
    for f in d.iterdir():
        if f.name.startswith(".") and _TMP_MARK in f.name and f.is_file():
            f.unlink()


def _remove_unlisted_shards(d: Path, listed: Iterable[str]) -> None:
    keep = set(listed)
    for f in d.iterdir():
        if f.name.startswith("shard-") and f.name.endswith(".safetensors") and f.name not in keep:
            f.unlink()


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptCacheError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptCacheError(f"{path}: not a {FORMAT} manifest")
    if obj.get("format_version") != FORMAT_VERSION:
        raise RefCacheError(f"{path}: format version {obj.get('format_version')!r}; this "
                            f"dpo_fast reads version {FORMAT_VERSION}")
    return obj


def _read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    m = path / MANIFEST
    return _read_json(m, "reference cache manifest") if m.exists() else None


def _read_shard(d: Path, rec: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Reads, verifies (size, SHA-256, tensors) and decodes the shard described by ``rec``."""
    from safetensors.numpy import load

    f = d / rec["file"]
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        raise CorruptCacheError(f"shard {f} is listed in the manifest but missing") from None
    if len(data) != rec["bytes"]:
        raise CorruptCacheError(f"shard {f} has {len(data)} bytes, the manifest says "
                                f"{rec['bytes']} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec["sha256"]:
        raise CorruptCacheError(f"shard {f}: SHA-256 {digest} does not match the manifest's "
                                f"{rec['sha256']} (the file is corrupted)")
    try:
        arrays = load(data)
    except Exception as e:  # a valid hash of an invalid file: written by something else
        raise CorruptCacheError(f"shard {f}: not a readable safetensors file ({e})") from None
    n = rec["rows"]
    shapes = {"keys": (n, KEY_BYTES), "chosen_logps": (n,), "rejected_logps": (n,),
              "chosen_lengths": (n,), "rejected_lengths": (n,)}
    if "token_logps" in arrays:
        shapes["token_offsets"] = (n + 1,)
    for name, shape in shapes.items():
        if name not in arrays or arrays[name].shape != shape:
            got = arrays[name].shape if name in arrays else "missing"
            raise CorruptCacheError(f"shard {f}: tensor {name!r} is {got}, expected {shape}")
    return arrays


# ----------------------------------------------------------------------------- fingerprint


def _dtype_name(dtype: Union[torch.dtype, str]) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if isinstance(dtype, str):
        d = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(d, torch.dtype):
            return str(d).replace("torch.", "")
    raise ValueError(f"dtype must be a torch.dtype or its name, got {dtype!r}")


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:
            return cfg
    return cfg


def _head_settings(model, softcap: Optional[float], temperature: float
                   ) -> Tuple[Optional[float], float]:
    """Effective (softcap, temperature) of the head: ``softcap`` defaults to the config's
    ``final_logit_softcapping``; Granite's ``logits_scaling`` (logits / s) and Cohere's
    ``logit_scale`` (logits * s) are folded into the temperature."""
    cfg = _text_config(model)
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


def _weights_sample_hash(model) -> str:
    """``WEIGHT_METHODS["sample"]``: exact integer sums (order- and device-independent) catch a
    change anywhere; tied tensors are hashed once."""
    h = hashlib.sha256(b"dpo_fast/weights-sample/v1\0")
    seen: Dict[Tuple[int, int, Tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue
        t = t.detach()
        h.update(json.dumps([name, list(t.shape), _dtype_name(t.dtype)]).encode())
        ident = (t.data_ptr(), t.numel(), tuple(t.stride())) if t.numel() else None
        if ident is not None and ident in seen:
            h.update(f"alias:{seen[ident]}".encode())
            continue
        if ident is not None:
            seen[ident] = name
        if t.numel() == 0:
            continue
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


def _tokenizer_hash(tokenizer) -> Optional[str]:
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


def _model_dtype(model) -> torch.dtype:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and isinstance(getattr(head, "weight", None), Tensor):
        return head.weight.dtype
    return next(model.parameters()).dtype


def fingerprint(model, tokenizer=None, *, max_length: Optional[int] = None,
                truncation: str = "keep_start", softcap: Optional[float] = None,
                temperature: float = 1.0, dtype: Union[None, str, torch.dtype] = None,
                weights: str = "sample") -> Dict[str, Any]:
    """Everything that changes the cached numbers, as a JSON-able dict of fields.

    Fields: ``logprob_version`` (``LOGPROB_VERSION``), ``model_class``, ``model_config``
    (SHA-256 of the config without paths / versions / bookkeeping keys), ``model_weights`` and
    ``model_weights_method`` (see below), ``tokenizer`` (SHA-256 of its tokenization pipeline -- a fast
    tokenizer's backend JSON without runtime truncation / padding, else its class name --,
    vocabulary, special and added tokens and chat template; None without a tokenizer), ``max_length``,
    ``truncation``, ``softcap`` / ``temperature`` (effective values: ``softcap=None`` takes the
    config's ``final_logit_softcapping``; Granite / Cohere logit scales are folded into the
    temperature), ``dtype`` (the model's, unless given).

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
    softcap, temperature = _head_settings(model, softcap, temperature)
    with torch.no_grad():
        wh = _weights_sample_hash(model) if weights == "sample" else _weights_files_hash(model)
    return {
        "logprob_version": LOGPROB_VERSION,
        "model_class": type(model).__name__,
        "model_config": _config_hash(model),
        "model_weights": wh,
        "model_weights_method": WEIGHT_METHODS[weights],
        "tokenizer": _tokenizer_hash(tokenizer),
        "max_length": max_length,
        "truncation": truncation,
        "softcap": softcap,
        "temperature": temperature,
        "dtype": _dtype_name(dtype if dtype is not None else _model_dtype(model)),
    }


_fingerprint = fingerprint  # for functions whose `fingerprint` argument shadows it


def _fingerprint_differences(stored: Dict[str, Any], expected: Dict[str, Any]
                             ) -> Dict[str, Tuple[Any, Any]]:
    missing = "<absent>"
    return {f: (stored.get(f, missing), expected.get(f, missing))
            for f in sorted(set(stored) | set(expected))
            if stored.get(f, missing) != expected.get(f, missing)}


def _allowed_fields(allow_mismatch) -> set:
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


def _check_fingerprint(stored: Dict[str, Any], expected: Dict[str, Any], where: Path,
                       allow_mismatch=()) -> None:
    allowed = _allowed_fields(allow_mismatch)
    diffs = _fingerprint_differences(stored, expected)
    refused = {f: v for f, v in diffs.items() if f not in allowed}
    if refused:
        lines = "\n".join(f"  {f}: cache has {a!r}, this run has {b!r}"
                          for f, (a, b) in refused.items())
        raise FingerprintMismatchError(
            f"the reference cache at {where} was built with a different fingerprint; "
            f"differing field(s): {', '.join(refused)}\n{lines}\n"
            "Rebuild it (overwrite=True or a new directory), or, if you know the values are "
            "still right, open it with allow_mismatch=(field names) or allow_mismatch=True.",
            refused)
    if diffs:
        warnings.warn(f"reference cache at {where}: fingerprint field(s) {sorted(diffs)} differ "
                      "and were allowed by allow_mismatch", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """Deterministic split of the rows to compute: ``examples`` (unique, sorted by their
    longer sequence, longest first, then by key), shards of ``rows_per_shard`` consecutive
    rows, and within each shard batches of consecutive rows whose padded size (rows x 2 x
    longest sequence) fits ``batch_tokens`` (a longer single row is a batch of its own).
    Longest first: a batch too large for the device fails at the start, not hours in."""

    examples: List[PreferenceExample]
    shards: List[List[Tuple[int, int]]]  # per shard: [start, end) row ranges of its batches
    first_shard: int
    batch_tokens: int
    rows_per_shard: int
    per_token: bool
    sha256: str

    def shard_rows(self, s: int) -> Tuple[int, int]:
        return self.shards[s][0][0], self.shards[s][-1][1]

    def shard_tokens(self, s: int) -> int:
        a, b = self.shard_rows(s)
        return sum(ex.num_tokens for ex in self.examples[a:b])

    def record(self, complete: bool) -> Dict[str, Any]:
        return {"plan_sha256": self.sha256, "first_shard": self.first_shard,
                "num_shards": len(self.shards), "rows": len(self.examples),
                "tokens": sum(ex.num_tokens for ex in self.examples),
                "batch_tokens": self.batch_tokens, "rows_per_shard": self.rows_per_shard,
                "complete": complete}


def _make_plan(examples: List[PreferenceExample], *, batch_tokens: int, rows_per_shard: int,
               per_token: bool, first_shard: int) -> _Plan:
    exs = sorted(examples, key=lambda e: (-e.max_sequence_length, e.key_bytes))
    h = hashlib.sha256(b"dpo_fast/plan/v1\0")
    h.update(json.dumps({"batch_tokens": batch_tokens, "rows_per_shard": rows_per_shard,
                         "per_token": per_token, "first_shard": first_shard,
                         "logprob_version": LOGPROB_VERSION}, sort_keys=True).encode())
    shards = []
    for s0 in range(0, len(exs), rows_per_shard):
        s1 = min(s0 + rows_per_shard, len(exs))
        batches = []
        i = s0
        while i < s1:
            j = i + 1
            while j < s1 and (j + 1 - i) * 2 * exs[i].max_sequence_length <= batch_tokens:
                j += 1
            batches.append((i, j))
            i = j
        shards.append(batches)
        h.update(b"S")
        for a, b in batches:
            h.update(b"B")
            h.update(b"".join(e.key_bytes for e in exs[a:b]))
    return _Plan(exs, shards, first_shard, batch_tokens, rows_per_shard, per_token, h.hexdigest())


# ----------------------------------------------------------------------------- computing


def _model_parts(model):
    """(body, head weight [V, D], head bias [V] or None) of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("model.get_output_embeddings() must return the LM head (a module with "
                         f"a [V, D] weight), got {type(head).__name__}")
    body = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"cannot find the body of {type(model).__name__}: neither "
                         "get_decoder() nor base_model gives a sub-module")
    bias = getattr(head, "bias", None)
    return body, weight, bias if isinstance(bias, Tensor) else None


def _input_device(model, weight: Tensor) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.device if isinstance(w, Tensor) else weight.device


class _Computer:
    """Runs the forward for batches of examples (eval mode, inference mode)."""

    def __init__(self, model, softcap, temperature, per_token, verify_head):
        self.model = model
        self.body, self.weight, self.bias = _model_parts(model)
        self.device = _input_device(model, self.weight)
        self.softcap, self.temperature = softcap, temperature
        self.per_token = per_token
        self.verify_head = verify_head

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h.to(self.weight.device)

    def check_head(self, ex: PreferenceExample, max_tokens: int = 64) -> None:
        """Compares the fused head with the model's own full logits on the first
        ``max_tokens`` tokens of ``ex``'s prompt + chosen (every next token scored; logits of
        that short prefix only): catches a head transform (logit scale, softcap) that
        softcap / temperature do not describe."""
        seq = np.concatenate([ex.prompt_ids, ex.chosen_ids])[:max_tokens].astype(np.int64)
        ids = torch.from_numpy(seq)[None].to(self.device)
        mask = torch.ones_like(ids)
        tgt = ids[0, 1:].to(self.weight.device)
        ours = linear_logprobs(self.hidden(ids, mask)[0, :-1], self.weight, tgt, bias=self.bias,
                               softcap=self.softcap, temperature=self.temperature)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[0, :-1].float()
        full = torch.log_softmax(logits, -1).gather(-1, tgt.to(logits.device)[:, None])[:, 0]
        ours = ours.to(full.device)
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        tol = (0.25 + 0.02 * full.abs()) if half else (1e-3 + 1e-4 * full.abs())
        err = (ours - full).abs()
        if not bool((err <= tol).all()):
            raise RefCacheError(
                f"the model's own logits disagree with the fused head (max |diff| "
                f"{err.max().item():.3g} nats per token on example {ex.key}): the model "
                "transforms its logits in a way not given by softcap / temperature "
                f"(used softcap={self.softcap}, temperature={self.temperature}); pass the right "
                "softcap= / temperature=, or verify_head=False if this is expected")
        self.verify_head = False

    def rows(self, examples: Sequence[PreferenceExample]) -> Dict[str, Any]:
        """Per-row results for ``examples``: sums, lengths and (per_token) token arrays."""
        if self.verify_head:
            self.check_head(examples[0])
        r = len(examples)
        b = pack_pair_batch(examples, device=self.device)
        logp = linear_logprobs(self.hidden(b.input_ids, b.attention_mask), self.weight,
                               b.targets.to(self.weight.device), bias=self.bias,
                               softcap=self.softcap, temperature=self.temperature)
        lp = logp.float().cpu().numpy()
        sel = (b.targets != _IGNORE).cpu().numpy()
        flat = lp[sel].tolist()  # row-major: each sequence's response tokens in order
        lengths = b.lengths.cpu().numpy()
        offs = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.array([math.fsum(flat[offs[s]:offs[s + 1]]) for s in range(2 * r)],
                        dtype=np.float64).astype(np.float32)
        out = {"keys": np.frombuffer(b"".join(e.key_bytes for e in examples),
                                     dtype=np.uint8).reshape(r, KEY_BYTES),
               "chosen_logps": sums[:r], "rejected_logps": sums[r:],
               "chosen_lengths": lengths[:r].astype(np.int32),
               "rejected_lengths": lengths[r:].astype(np.int32)}
        if self.per_token:
            flat32 = lp[sel]
            out["token_logps"] = [np.concatenate([flat32[offs[i]:offs[i + 1]],
                                                  flat32[offs[r + i]:offs[r + i + 1]]])
                                  for i in range(r)]
        return out


def _encode_shard(parts: List[Dict[str, Any]], index: int, per_token: bool) -> Tuple[bytes, int]:
    """safetensors bytes of one shard from its batches' results, and its row count."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(np.concatenate([p[k] for p in parts]))
              for k in _SHARD_TENSORS}
    n = arrays["keys"].shape[0]
    if per_token:
        rows = [t for p in parts for t in p["token_logps"]]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([t.size for t in rows])
        arrays["token_logps"] = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
        arrays["token_offsets"] = offsets
    # one metadata entry: safetensors writes the metadata map in hash order, so several
    # entries would make the bytes differ from run to run
    meta = {FORMAT: json.dumps({"format_version": FORMAT_VERSION, "shard": index,
                                "logprob_version": LOGPROB_VERSION}, sort_keys=True)}
    return save(arrays, metadata=meta), n


# ----------------------------------------------------------------------------- the cache


def _keys_array(keys) -> np.ndarray:
    """Keys (hex strings, 16-byte bytes, PreferenceExamples, or a uint8 [B, 16] / S16 array)
    as a numpy "S16" array [B]."""
    if isinstance(keys, np.ndarray):
        if keys.dtype == np.dtype("S16"):
            return keys.reshape(-1)
        if keys.dtype == np.uint8 and keys.ndim == 2 and keys.shape[1] == KEY_BYTES:
            return np.ascontiguousarray(keys).view("S16").reshape(-1)
    if isinstance(keys, (str, bytes, PreferenceExample)):
        raise ValueError("keys must be a sequence of keys (wrap a single key in a list)")
    out = []
    for i, k in enumerate(keys):
        if isinstance(k, PreferenceExample):
            out.append(k.key_bytes)
        elif isinstance(k, str):
            try:
                b = bytes.fromhex(k)
            except ValueError:
                b = b""
            if len(b) != KEY_BYTES:
                raise ValueError(f"keys[{i}] = {k!r} is not a {2 * KEY_BYTES}-hex-digit key")
            out.append(b)
        elif isinstance(k, (bytes, bytearray)) and len(k) == KEY_BYTES:
            out.append(bytes(k))
        else:
            raise ValueError(f"keys[{i}] is a {type(k).__name__}; expected a hex key string, "
                             "16 bytes or a PreferenceExample")
    return np.array(out, dtype="S16").reshape(-1)


def _hex(k: bytes) -> str:
    """Hex of a key taken from an "S16" array (numpy strips trailing NUL bytes)."""
    return bytes(k).ljust(KEY_BYTES, b"\0").hex()


def _key_bytes_list(keys: np.ndarray) -> List[bytes]:
    """An "S16" array's keys as 16-byte ``bytes`` (trailing NULs kept)."""
    return [bytes(k).ljust(KEY_BYTES, b"\0") for k in keys.tolist()]


def _dist_rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int, bool]:
    """(rank, world_size, torch.distributed initialized)."""
    dist = torch.distributed
    inited = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        if inited:
            return dist.get_rank(), dist.get_world_size(), True
        return 0, 1, False
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
            and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, "
                         f"world_size={world_size!r}")
    if inited and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with torch.distributed "
                         f"({dist.get_rank()}, {dist.get_world_size()})")
    return rank, world_size, inited


class RefLogProbCache:
    """An opened (verified) reference log-prob cache; see the module docstring for the format.

    Create one with :meth:`build` / :meth:`ensure`, open an existing one with :meth:`open`.
    Lookups are vectorized (sorted key index + ``np.searchsorted``). The rows are held in
    memory once opened (about 45 bytes a row; per-token values 4 bytes a token).

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json``.
        last_build: :class:`BuildProgress` of the build / ensure that returned this object in
            this process ("done" event), or None.
    """

    def __init__(self, path: Path, manifest: Dict[str, Any], arrays: Dict[str, np.ndarray],
                 tokens: Optional[List[Tuple[np.ndarray, np.ndarray]]]):
        self.path = path
        self.manifest = manifest
        self.last_build: Optional[BuildProgress] = None
        keys = arrays["keys"]
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        if len(self._keys) > 1 and bool((self._keys[1:] == self._keys[:-1]).any()):
            dup = self._keys[1:][self._keys[1:] == self._keys[:-1]][0]
            raise CorruptCacheError(f"{path}: key {_hex(dup)} appears in more than one row")
        self._chosen = arrays["chosen_logps"][order]
        self._rejected = arrays["rejected_logps"][order]
        self._chosen_len = arrays["chosen_lengths"][order]
        self._rejected_len = arrays["rejected_lengths"][order]
        self._row_shard = arrays["row_shard"][order]
        self._row_in_shard = arrays["row_in_shard"][order]
        self._tokens = tokens

    # -- opening ---------------------------------------------------------------------

    @staticmethod
    def _load(path: Path, shards: List[Dict[str, Any]], per_token: bool):
        parts, tokens = [], [] if per_token else None
        for s, rec in enumerate(shards):
            a = _read_shard(path, rec)
            if per_token:
                if "token_logps" not in a:
                    raise CorruptCacheError(f"shard {path / rec['file']}: per-token cache "
                                            "without 'token_logps'")
                tokens.append((a["token_logps"], a["token_offsets"]))
            n = rec["rows"]
            a["row_shard"] = np.full(n, s, dtype=np.int32)
            a["row_in_shard"] = np.arange(n, dtype=np.int64)
            parts.append(a)
        names = _SHARD_TENSORS + ("row_shard", "row_in_shard")
        empty = {"keys": np.zeros((0, KEY_BYTES), np.uint8),
                 "chosen_logps": np.zeros(0, np.float32),
                 "rejected_logps": np.zeros(0, np.float32),
                 "chosen_lengths": np.zeros(0, np.int32),
                 "rejected_lengths": np.zeros(0, np.int32),
                 "row_shard": np.zeros(0, np.int32), "row_in_shard": np.zeros(0, np.int64)}
        arrays = {k: (np.concatenate([p[k] for p in parts]) if parts else empty[k]) for k in names}
        arrays["keys"] = np.ascontiguousarray(arrays["keys"]).view("S16").reshape(-1)
        return arrays, tokens

    @classmethod
    def open(cls, path, expect: Optional[Dict[str, Any]] = None,
             allow_mismatch: Union[bool, Sequence[str]] = ()) -> "RefLogProbCache":
        """Opens the cache at ``path``, verifying every shard's size and SHA-256.

        Args:
            path: cache directory.
            expect: the fingerprint of this run (see :func:`fingerprint`); a cache whose
                fingerprint differs is refused with :class:`FingerprintMismatchError` naming
                each differing field and both values. None skips the check.
            allow_mismatch: expert override: True, or the names of fields allowed to differ
                (a warning lists them).

        Raises:
            FileNotFoundError (no manifest), RefCacheError (incomplete build),
            CorruptCacheError (a shard missing, truncated or with a wrong SHA-256; the message
            names the file), FingerprintMismatchError.
        """
        path = Path(path)
        man = _read_manifest(path)
        if man is None:
            raise FileNotFoundError(f"no reference cache at {path} (no {MANIFEST})")
        if not man.get("complete"):
            done = sum(1 for _ in man["shards"])
            raise RefCacheError(f"the reference cache at {path} is incomplete ({done} shard(s) "
                                "written; the build was interrupted): run build / ensure again "
                                "to finish it")
        if expect is not None:
            _check_fingerprint(man["fingerprint"], expect, path, allow_mismatch)
        else:
            _allowed_fields(allow_mismatch)
        arrays, tokens = cls._load(path, man["shards"], bool(man["per_token"]))
        return cls(path, man, arrays, tokens)

    # -- lookups ---------------------------------------------------------------------

    @property
    def fingerprint(self) -> Dict[str, Any]:
        """The fingerprint the cache was built with (a copy)."""
        return dict(self.manifest["fingerprint"])

    @property
    def per_token(self) -> bool:
        return bool(self.manifest["per_token"])

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __contains__(self, key) -> bool:
        try:
            q = _keys_array([key])
        except ValueError:
            return False
        return bool(self._find(q)[1][0])

    def keys(self) -> List[str]:
        """All keys (hex), in sorted order."""
        return [_hex(k) for k in self._keys.tolist()]

    def _find(self, q: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if len(self._keys) == 0:
            return np.zeros(q.shape, np.int64), np.zeros(q.shape, bool)
        pos = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
        return pos, self._keys[pos] == q

    def _positions(self, keys) -> np.ndarray:
        q = _keys_array(keys)
        pos, found = self._find(q)
        if not bool(found.all()):
            miss = [_hex(k) for k in q[~found].tolist()]
            shown = ", ".join(miss[:5]) + (", ..." if len(miss) > 5 else "")
            raise MissingRowsError(
                f"{len(miss)} of {len(q)} key(s) are not in the reference cache at {self.path}: "
                f"{shown}. Compute them with RefLogProbCache.ensure(model, examples, path).",
                miss)
        return pos

    def lookup(self, keys, *, split: bool = False, device=None
               ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Reference log-probs of B examples.

        Args:
            keys: B keys: hex strings, 16-byte ``bytes``, :class:`PreferenceExample`s, or a
                uint8 [B, 16] / "S16" [B] numpy array (fastest).
            split: return ``(chosen [B], rejected [B])`` instead of one tensor.
            device: where to put the result (default CPU).

        Returns:
            float32 [2B] = ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` (the fused
            loss's ``ref_logps`` order), or the pair if ``split``.

        Raises:
            MissingRowsError (a KeyError) saying how many keys are missing and which (first 5).
        """
        pos = self._positions(keys)
        c = torch.from_numpy(self._chosen[pos])
        r = torch.from_numpy(self._rejected[pos])
        if split:
            return (c.to(device), r.to(device)) if device is not None else (c, r)
        out = torch.cat([c, r])
        return out.to(device) if device is not None else out

    def lengths(self, keys, *, split: bool = False, device=None
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Response token counts, int64 [2B] in :meth:`lookup`'s order (or a pair of [B])."""
        pos = self._positions(keys)
        c = torch.from_numpy(self._chosen_len[pos].astype(np.int64))
        r = torch.from_numpy(self._rejected_len[pos].astype(np.int64))
        if split:
            return (c.to(device), r.to(device)) if device is not None else (c, r)
        out = torch.cat([c, r])
        return out.to(device) if device is not None else out

    def token_logps(self, key) -> Tuple[Tensor, Tensor]:
        """Per-token reference log-probs of one example: ``(chosen [Lc], rejected [Lr])``
        float32 (needs a cache built with ``per_token=True``)."""
        if self._tokens is None:
            raise RefCacheError(f"the reference cache at {self.path} has no per-token values "
                                "(build it with per_token=True)")
        p = int(self._positions([key])[0])
        vals, offs = self._tokens[int(self._row_shard[p])]
        i = int(self._row_in_shard[p])
        row = vals[offs[i]:offs[i + 1]]
        lc = int(self._chosen_len[p])
        return torch.from_numpy(row[:lc].copy()), torch.from_numpy(row[lc:].copy())

    def __repr__(self):
        return (f"RefLogProbCache({str(self.path)!r}, rows={len(self)}, "
                f"shards={len(self.manifest['shards'])}, per_token={self.per_token})")

    # -- building --------------------------------------------------------------------

    @classmethod
    def build(cls, model, examples: Iterable[PreferenceExample], path, *,
              batch_tokens: int = 16384, fingerprint: Optional[Dict[str, Any]] = None,
              tokenizer=None, max_length: Optional[int] = None,
              dtype: Union[None, str, torch.dtype] = None, softcap: Optional[float] = None,
              temperature: float = 1.0, per_token: bool = False, rows_per_shard: int = 4096,
              progress: Optional[Callable[[BuildProgress], None]] = None,
              rank: Optional[int] = None, world_size: Optional[int] = None,
              overwrite: bool = False, verify_head: bool = True) -> Optional["RefLogProbCache"]:
        """Computes the reference log-probs of ``examples`` into a new cache at ``path``.

        Forward only: ``torch.inference_mode``, model in eval mode (restored after), the body
        gives [2R, T, D] hidden states, :func:`dpo_fast.linear_logprobs` the per-token
        log-probs (no logits). Duplicate examples (same key) are computed once.

        Args:
            model: a causal LM (``get_decoder()`` / ``base_model`` = body,
                ``get_output_embeddings()`` = head), on the device to compute on.
            examples: the :class:`PreferenceExample`s.
            path: cache directory (created if needed).
            batch_tokens: padded token budget per forward (rows x 2 x longest sequence).
            fingerprint: the run's fingerprint (:func:`fingerprint`, with tokenizer and
                max_length); default: computed from the model and ``tokenizer`` /
                ``max_length`` / the head settings. Its softcap / temperature / dtype /
                logprob_version must match what this build uses.
            tokenizer, max_length: only for the default fingerprint.
            dtype: if given, must equal the model's dtype (a check, no cast).
            softcap: logit soft-capping; None takes ``config.final_logit_softcapping``.
            temperature: logits are divided by it (after softcap).
            per_token: also store per-token log-probs.
            rows_per_shard: rows per shard file (the unit of resumption).
            progress: called with a :class:`BuildProgress` at start, after every batch and
                shard, and at the end.
            rank, world_size: distributed build (default: from torch.distributed if
                initialized). Each rank computes its slice into ``path/part-<rank>``; with
                torch.distributed initialized, rank 0 merges after a barrier and every rank
                returns the opened cache; without it this returns None and
                :meth:`merge` must be called once all ranks are done.
            overwrite: replace whatever the directory holds.
            verify_head: before the first batch, compare the fused head with the model's own
                full logits on one example (catches unsupported logit transforms).

        Returns:
            the opened cache (``last_build`` holds the final :class:`BuildProgress`).

        Raises:
            RefCacheError if ``path`` holds a cache of other examples or settings (including
            :class:`FingerprintMismatchError`), unless ``overwrite``.
        """
        return _run_build(cls, "build", model, examples, path, batch_tokens=batch_tokens,
                          fingerprint=fingerprint, tokenizer=tokenizer, max_length=max_length,
                          dtype=dtype, softcap=softcap, temperature=temperature,
                          per_token=per_token, rows_per_shard=rows_per_shard, progress=progress,
                          rank=rank, world_size=world_size, overwrite=overwrite,
                          verify_head=verify_head)

    @classmethod
    def ensure(cls, model, examples: Iterable[PreferenceExample], path, **kwargs
               ) -> Optional["RefLogProbCache"]:
        """Opens the cache at ``path`` and computes only the examples it lacks (appended as a
        new build of shards), creating the cache if absent; returns the opened cache.

        Takes :meth:`build`'s keyword arguments. The fingerprint must match the existing
        cache's (else :class:`FingerprintMismatchError`), and so must ``per_token``. An
        interrupted earlier ``ensure`` of the same rows is resumed; one of different rows is
        discarded. ``last_build.rows_computed`` says how many rows were computed.
        """
        return _run_build(cls, "ensure", model, examples, path, **kwargs)

    @classmethod
    def merge(cls, path, world_size: int) -> "RefLogProbCache":
        """Assembles the parts written by ``world_size`` ranks into the cache at ``path``.

        Checks that every ``part-<r>`` is complete and was made from the same plan, base
        cache and fingerprint, verifies each shard's SHA-256, moves the shards into ``path``,
        writes the manifest, and removes the part directories. Idempotent: safe to re-run
        after an interruption. Returns the opened cache.
        """
        path = Path(path)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        man = _read_manifest(path)
        part_dirs = [path / _PART_NAME.format(r) for r in range(world_size)]
        if man is not None and man.get("complete") and not any(d.exists() for d in part_dirs):
            return cls.open(path)  # already merged
        parts = []
        for r, d in enumerate(part_dirs):
            pm = _read_json(d / MANIFEST, f"manifest of rank {r}'s part")
            if pm.get("part") != {"rank": r, "world_size": world_size}:
                raise RefCacheError(f"{d}: written by {pm.get('part')}, expected rank {r} of "
                                    f"{world_size}")
            if not pm["build"]["complete"]:
                raise RefCacheError(f"{d} is incomplete: rank {r} has not finished its shards")
            parts.append(pm)
        p0 = parts[0]
        for r, pm in enumerate(parts[1:], 1):
            for field in ("fingerprint", "per_token", "build", "base"):
                if pm[field] != p0[field]:
                    raise RefCacheError(f"rank {r}'s part differs from rank 0's in {field!r} "
                                        "(ranks must build the same examples with the same "
                                        "settings)")
        base_builds: List[Dict[str, Any]] = []
        base_shards: List[Dict[str, Any]] = []
        if man is not None:
            _check_fingerprint(man["fingerprint"], p0["fingerprint"], path)
            base_builds = [b for b in man["builds"] if b["complete"]]
            n_base = sum(b["num_shards"] for b in base_builds)
            base_shards = [s for s in man["shards"] if s["index"] < n_base]
        if [b["plan_sha256"] for b in base_builds] != p0["base"]:
            raise RefCacheError(f"{path}: the cache changed since the parts were planned "
                                "(different completed builds); rebuild the parts")
        build = p0["build"]
        first, n = build["first_shard"], build["num_shards"]
        records = sorted((s for pm in parts for s in pm["shards"]), key=lambda s: s["index"])
        if [s["index"] for s in records] != list(range(first, first + n)):
            raise RefCacheError(f"the parts hold shards {[s['index'] for s in records]}, "
                                f"expected {first}..{first + n - 1} once each")
        for rec in records:
            src = part_dirs[(rec["index"] - first) % world_size] / rec["file"]
            dst = path / rec["file"]
            if src.exists():
                _read_shard(src.parent, rec)
                os.replace(src, dst)
            else:  # moved by an earlier, interrupted merge
                _read_shard(path, rec)
        _fsync_dir(path)
        new = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "fingerprint": p0["fingerprint"], "per_token": p0["per_token"],
               "key": KEY_DEFINITION, "logprob_version": LOGPROB_VERSION,
               "builds": base_builds + [dict(build, complete=True)],
               "shards": base_shards + records, "complete": True}
        _atomic_write(path / MANIFEST, _json_bytes(new))
        for d in part_dirs:
            shutil.rmtree(d, ignore_errors=True)
        _remove_temps(path)
        _remove_unlisted_shards(path, (s["file"] for s in new["shards"]))
        _fsync_dir(path)
        return cls.open(path)


# ----------------------------------------------------------------------------- build driver


def _unique_examples(examples: Iterable[PreferenceExample], vocab: int) -> List[PreferenceExample]:
    uniq: Dict[bytes, PreferenceExample] = {}
    for i, ex in enumerate(examples):
        if not isinstance(ex, PreferenceExample):
            raise ValueError(f"examples[{i}] is a {type(ex).__name__}, not a PreferenceExample")
        top = max(int(ex.prompt_ids.max()), int(ex.chosen_ids.max()), int(ex.rejected_ids.max()))
        if top >= vocab:
            raise ValueError(f"examples[{i}] (key {ex.key}) has token id {top}, outside the "
                             f"model's vocabulary of {vocab}")
        uniq.setdefault(ex.key_bytes, ex)
    return list(uniq.values())


def _new_manifest(fp: Dict[str, Any], per_token: bool) -> Dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp,
            "per_token": per_token, "key": KEY_DEFINITION, "logprob_version": LOGPROB_VERSION,
            "builds": [], "shards": [], "complete": True}


def _wipe(path: Path) -> None:
    for f in path.iterdir():
        if f.name == MANIFEST:
            continue
        if f.is_dir() and f.name.startswith("part-"):
            shutil.rmtree(f)
        elif f.is_file() and (f.name.startswith("shard-") or _TMP_MARK in f.name):
            f.unlink()
    (path / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(path)


def _validate_fingerprint(fp: Dict[str, Any], softcap, temperature, dtype: str) -> None:
    if not isinstance(fp, dict):
        raise ValueError(f"fingerprint must be a dict (see dpo_fast.refcache.fingerprint), got "
                         f"{type(fp).__name__}")
    want = {"softcap": softcap, "temperature": temperature, "dtype": dtype,
            "logprob_version": LOGPROB_VERSION}
    bad = {k: (fp.get(k, "<absent>"), v) for k, v in want.items() if fp.get(k, "<absent>") != v}
    if bad:
        raise ValueError("fingerprint disagrees with this build's settings: " + "; ".join(
            f"{k}: fingerprint has {a!r}, the build uses {b!r}" for k, (a, b) in bad.items()))


class _Tracker:
    """Progress counters of one build (or one rank's part) and the callback."""

    def __init__(self, cb, plan: _Plan, mine: Sequence[int], done: Iterable[int]):
        self.cb = cb
        self.t0 = time.perf_counter()
        done = set(done)
        rows = {s: plan.shard_rows(s)[1] - plan.shard_rows(s)[0] for s in mine}
        toks = {s: plan.shard_tokens(s) for s in mine}
        self.rows_total, self.tokens_total = sum(rows.values()), sum(toks.values())
        self.rows_done = sum(rows[s] for s in done)
        self.tokens_done = sum(toks[s] for s in done)
        self.shards_total, self.shards_done = len(mine), len(done)
        self.rows_computed = self.tokens_computed = 0

    def snapshot(self, event: str) -> BuildProgress:
        return BuildProgress(event, self.rows_done, self.rows_total, self.tokens_done,
                             self.tokens_total, self.shards_done, self.shards_total,
                             self.rows_computed, self.tokens_computed,
                             time.perf_counter() - self.t0)

    def emit(self, event: str) -> None:
        if self.cb is not None:
            self.cb(self.snapshot(event))


def _compute_shards(d: Path, plan: _Plan, mine: Sequence[int], done: Iterable[int],
                    computer: _Computer, tracker: _Tracker,
                    commit: Callable[[Dict[str, Any]], None]) -> None:
    """Computes the plan's shards ``mine`` (plan-relative) not in ``done`` into ``d``; after
    each shard is durable, ``commit(record)`` lists it in the manifest."""
    done = set(done)
    model = computer.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in mine:
                if s in done:
                    continue
                parts = []
                for a, b in plan.shards[s]:
                    exs = plan.examples[a:b]
                    parts.append(computer.rows(exs))
                    toks = sum(ex.num_tokens for ex in exs)
                    tracker.rows_done += b - a
                    tracker.rows_computed += b - a
                    tracker.tokens_done += toks
                    tracker.tokens_computed += toks
                    tracker.emit("batch")
                index = plan.first_shard + s
                data, n = _encode_shard(parts, index, plan.per_token)
                name = _SHARD_NAME.format(index)
                _atomic_write(d / name, data)
                commit({"file": name, "index": index, "rows": n, "tokens": plan.shard_tokens(s),
                        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                tracker.shards_done += 1
                tracker.emit("shard")
    finally:
        model.train(was_training)


def _build_single(cls, path: Path, man: Optional[Dict[str, Any]], fp: Dict[str, Any],
                  plan: _Plan, base_shards: List[Dict[str, Any]],
                  base_builds: List[Dict[str, Any]], computer: _Computer, progress):
    """Single-process build of ``plan`` on top of the completed builds ``base_builds``."""
    new_man = man is None
    if man is None:
        man = _new_manifest(fp, plan.per_token)
    last = man["builds"][-1] if man["builds"] else None
    n_all = len(plan.shards)
    if last is not None and last["plan_sha256"] == plan.sha256:  # resume, or already built
        done_recs = [s for s in man["shards"] if s["index"] >= plan.first_shard]
        for rec in done_recs:
            _read_shard(path, rec)
    else:  # a new build (an interrupted build of other rows, if any, is dropped)
        man["builds"] = list(base_builds)
        man["shards"] = list(base_shards)
        if n_all:
            man["builds"].append(plan.record(False))
            man["complete"] = False
        else:
            man["complete"] = True
        new_man = True
        done_recs = []
    if new_man:
        _atomic_write(path / MANIFEST, _json_bytes(man))
    _remove_temps(path)
    _remove_unlisted_shards(path, (s["file"] for s in man["shards"]))
    _fsync_dir(path)
    done = [rec["index"] - plan.first_shard for rec in done_recs]
    tracker = _Tracker(progress, plan, range(n_all), done)
    if not man["complete"]:
        tracker.emit("start")

        def commit(rec):
            man["shards"].append(rec)
            _atomic_write(path / MANIFEST, _json_bytes(man))

        _compute_shards(path, plan, range(n_all), done, computer, tracker, commit)
        man["builds"][-1]["complete"] = True
        man["complete"] = True
        _atomic_write(path / MANIFEST, _json_bytes(man))
    tracker.emit("done")
    cache = cls.open(path, expect=fp)
    cache.last_build = tracker.snapshot("done")
    return cache


def _build_part(path: Path, rank: int, world: int, fp: Dict[str, Any], plan: _Plan,
                base: List[str], computer: _Computer, progress) -> None:
    """Rank ``rank``'s shards of ``plan`` (those with ``i % world == rank``) into
    ``path/part-<rank>``, with the same write protocol as a single build."""
    d = path / _PART_NAME.format(rank)
    d.mkdir(parents=True, exist_ok=True)
    mine = [s for s in range(len(plan.shards)) if s % world == rank]
    want = {"part": {"rank": rank, "world_size": world}, "fingerprint": fp,
            "per_token": plan.per_token, "base": base}
    pm = _read_json(d / MANIFEST, "part manifest") if (d / MANIFEST).exists() else None
    if (pm is not None and pm["build"]["plan_sha256"] == plan.sha256
            and all(pm.get(k) == v for k, v in want.items())):
        for rec in pm["shards"]:
            _read_shard(d, rec)
    else:
        pm = {"format": FORMAT, "format_version": FORMAT_VERSION, **want,
              "build": plan.record(False), "shards": []}
        _atomic_write(d / MANIFEST, _json_bytes(pm))
    _remove_temps(d)
    _remove_unlisted_shards(d, (s["file"] for s in pm["shards"]))
    done = [rec["index"] - plan.first_shard for rec in pm["shards"]]
    tracker = _Tracker(progress, plan, mine, done)
    if not pm["build"]["complete"]:
        tracker.emit("start")

        def commit(rec):
            pm["shards"].append(rec)
            _atomic_write(d / MANIFEST, _json_bytes(pm))

        _compute_shards(d, plan, mine, done, computer, tracker, commit)
        pm["build"]["complete"] = True
        _atomic_write(d / MANIFEST, _json_bytes(pm))
    tracker.emit("done")


def _run_build(cls, mode: str, model, examples, path, *, batch_tokens: int = 16384,
               fingerprint: Optional[Dict[str, Any]] = None, tokenizer=None,
               max_length: Optional[int] = None, dtype=None, softcap: Optional[float] = None,
               temperature: float = 1.0, per_token: bool = False, rows_per_shard: int = 4096,
               progress: Optional[Callable[[BuildProgress], None]] = None,
               rank: Optional[int] = None, world_size: Optional[int] = None,
               overwrite: bool = False, verify_head: bool = True):
    """Shared driver of :meth:`RefLogProbCache.build` (``mode="build"``: the directory must
    hold this plan or nothing) and :meth:`RefLogProbCache.ensure` (``mode="ensure"``: add the
    rows it lacks)."""
    for name, v in (("batch_tokens", batch_tokens), ("rows_per_shard", rows_per_shard)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be None or a callable taking a BuildProgress")
    rank, world, inited = _dist_rank_world(rank, world_size)
    per_token = bool(per_token)
    path = Path(path)

    eff_softcap, eff_temperature = _head_settings(model, softcap, temperature)
    _, weight, _ = _model_parts(model)
    model_dtype = _dtype_name(weight.dtype)
    if dtype is not None and _dtype_name(dtype) != model_dtype:
        raise ValueError(f"dtype={_dtype_name(dtype)} but the model is {model_dtype}; load or "
                         "cast the model to the dtype the cache should reflect")
    if fingerprint is None:
        fp = _fingerprint(model, tokenizer, max_length=max_length, softcap=softcap,
                          temperature=temperature, dtype=model_dtype)
    else:
        fp = dict(fingerprint)
        _validate_fingerprint(fp, eff_softcap, eff_temperature, model_dtype)
    uniq = _unique_examples(examples, int(weight.shape[0]))

    if overwrite and path.exists():
        if world > 1 and not inited:
            raise ValueError("overwrite=True with an explicit rank / world_size needs "
                             "torch.distributed (rank 0 clears the directory); clear it first")
        if rank == 0:
            _wipe(path)
        if inited and world > 1:
            torch.distributed.barrier()
    path.mkdir(parents=True, exist_ok=True)

    man = _read_manifest(path)
    if man is not None:
        _check_fingerprint(man["fingerprint"], fp, path)
        if bool(man["per_token"]) != per_token:
            raise RefCacheError(f"the reference cache at {path} has per_token="
                                f"{bool(man['per_token'])}; this run asks per_token={per_token}")
    builds = man["builds"] if man is not None else []
    complete = [b for b in builds if b["complete"]]
    if any(not b["complete"] for b in builds[:-1]):
        raise CorruptCacheError(f"{path / MANIFEST}: only the last build may be incomplete")

    settings = dict(batch_tokens=batch_tokens, rows_per_shard=rows_per_shard, per_token=per_token)
    if mode == "build":
        plan = _make_plan(uniq, first_shard=0, **settings)
        if builds and not (len(builds) == 1 and builds[0]["plan_sha256"] == plan.sha256):
            raise RefCacheError(
                f"{path} already holds a reference cache of other examples or build settings "
                f"(plan {builds[0]['plan_sha256'][:12]}..., this run's {plan.sha256[:12]}...); "
                "use overwrite=True, another directory, or RefLogProbCache.ensure to add rows")
        base_shards: List[Dict[str, Any]] = []
        complete = []
    else:
        n_base = sum(b["num_shards"] for b in complete)
        base_shards = [s for s in man["shards"] if s["index"] < n_base] if man else []
        have_keys = set(_key_bytes_list(cls._load(path, base_shards, False)[0]["keys"]))
        plan = _make_plan([ex for ex in uniq if ex.key_bytes not in have_keys],
                          first_shard=n_base, **settings)

    computer = _Computer(model, eff_softcap, eff_temperature, per_token, verify_head)
    done_already = bool(builds) and builds[-1]["plan_sha256"] == plan.sha256 and \
        builds[-1]["complete"]
    if world == 1 or not plan.shards or done_already:
        # nothing to split: one process finishes (or just opens) the cache
        if world > 1 and inited:
            if rank == 0:
                _build_single(cls, path, man, fp, plan, base_shards, complete, computer,
                              progress)
            torch.distributed.barrier()
            return cls.open(path, expect=fp)
        if world > 1 and rank != 0:
            return None
        return _build_single(cls, path, man, fp, plan, base_shards, complete, computer,
                             progress)
    _build_part(path, rank, world, fp, plan, [b["plan_sha256"] for b in complete], computer,
                progress)
    if not inited:
        return None
    torch.distributed.barrier()
    if rank == 0:
        cls.merge(path, world)
    torch.distributed.barrier()
    return cls.open(path, expect=fp)
