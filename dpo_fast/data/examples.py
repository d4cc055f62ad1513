"""Tokenized preference examples, their content keys, and the padded model input for a batch.

A :class:`PreferenceExample` holds three int32 id arrays: the prompt, the chosen response and
the rejected response (EOS already appended to each response, see ``docs/losses.md``). Its
:attr:`~PreferenceExample.key` is a content hash of those ids, so a row keeps its key however
the dataset is shuffled, filtered or re-ordered; the reference log-prob cache
(:mod:`dpo_fast.refcache`) is indexed by it.

Key definition (version 1): the first 16 bytes of
``SHA-256(b"dpo_fast/pref/v1\\0" + uint64-LE(len(prompt), len(chosen), len(rejected))
+ int32-LE(prompt) + int32-LE(chosen) + int32-LE(rejected))``, written as 32 hex characters.
The length header makes the encoding unambiguous (no two id triples share an encoding).

:func:`pack_pair_batch` pads R examples into the 2R-row model input (:class:`PairBatch`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

KEY_VERSION = 1
KEY_BYTES = 16
_KEY_PREFIX = b"dpo_fast/pref/v1\0"
_INT32_MAX = 2**31 - 1


def _as_ids(name: str, value: Any) -> np.ndarray:
    """``value`` (sequence of ints, int numpy array or int tensor) as a read-only int32 [L]."""
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must hold integer token ids, got a {value.dtype} tensor")
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1:
        if arr.size == 0:  # e.g. [] from an empty list: float64 by default
            arr = arr.reshape(0).astype(np.int64)
        else:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT32_MAX):
        raise ValueError(f"{name}: token ids must be in [0, 2**31), got min {int(arr.min())}, "
                         f"max {int(arr.max())}")
    out = np.ascontiguousarray(arr, dtype=np.int32)
    if out is arr or np.shares_memory(out, arr):
        out = out.copy()
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class PreferenceExample:
    """One tokenized preference row.

    Attributes:
        prompt_ids: int32 [P], P >= 1 (the first response token needs a context).
        chosen_ids: int32 [C], C >= 1, the preferred response (EOS appended, possibly truncated).
        rejected_ids: int32 [R], R >= 1, the dispreferred response.

    Any sequence of ints, integer numpy array or integer tensor is accepted and stored as a
    read-only int32 array. Equality and hashing go by :attr:`key`.
    """

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray

    def __post_init__(self):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = _as_ids(name, getattr(self, name))
            if ids.size == 0:
                what = ("the first response token needs a context token (e.g. BOS)"
                        if name == "prompt_ids" else "a response needs at least one token")
                raise ValueError(f"{name} is empty: {what}")
            object.__setattr__(self, name, ids)

    @cached_property
    def key_bytes(self) -> bytes:
        """16-byte content key (see the module docstring for the exact definition)."""
        h = hashlib.sha256(_KEY_PREFIX)
        h.update(struct.pack("<3Q", self.prompt_ids.size, self.chosen_ids.size,
                             self.rejected_ids.size))
        for ids in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            h.update(ids.astype("<i4", copy=False).tobytes())
        return h.digest()[:KEY_BYTES]

    @property
    def key(self) -> str:
        """Content key as 32 lowercase hex characters."""
        return self.key_bytes.hex()

    @property
    def chosen_length(self) -> int:
        """Number of scored tokens of the chosen sequence (= len(chosen_ids))."""
        return int(self.chosen_ids.size)

    @property
    def rejected_length(self) -> int:
        """Number of scored tokens of the rejected sequence (= len(rejected_ids))."""
        return int(self.rejected_ids.size)

    @property
    def identical(self) -> bool:
        """Chosen and rejected are the same ids: the pair's DPO gradient is zero."""
        return np.array_equal(self.chosen_ids, self.rejected_ids)

    @property
    def max_sequence_length(self) -> int:
        """Length of the longer of prompt+chosen and prompt+rejected."""
        return int(self.prompt_ids.size + max(self.chosen_ids.size, self.rejected_ids.size))

    @property
    def num_tokens(self) -> int:
        """Tokens in both sequences together (prompt counted twice), padding excluded."""
        return int(2 * self.prompt_ids.size + self.chosen_ids.size + self.rejected_ids.size)

    def __eq__(self, other):
        if not isinstance(other, PreferenceExample):
            return NotImplemented
        return self.key_bytes == other.key_bytes

    def __hash__(self):
        return hash(self.key_bytes)

    def __repr__(self):
        return (f"PreferenceExample(key={self.key}, prompt={self.prompt_ids.size}, "
                f"chosen={self.chosen_ids.size}, rejected={self.rejected_ids.size} tokens)")


# ------------------------------------------------------------------------------ batching


class PairBatch(NamedTuple):
    """Padded model input for R preference examples (2R sequences).

    Rows ``0..R-1`` are prompt+chosen, rows ``R..2R-1`` prompt+rejected (pair j = (j, R+j),
    the fused loss's order). T = the longest sequence.

    Attributes:
        input_ids: int64 [2R, T], right-padded with ``pad_token_id``.
        attention_mask: int64 [2R, T], 1 on real tokens, 0 on padding.
        targets: int64 [2R, T], ``targets[s, t] = input_ids[s, t + 1]`` where position t + 1
            is a response token, else ``ignore_index`` (prompt, padding, last column): the sum
            of the log-probs of the targets of row s is log p(response | prompt).
        lengths: int64 [2R], response tokens per sequence (= non-ignored targets per row).
    """

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    lengths: Tensor


def pack_pair_batch(examples: Sequence[PreferenceExample], *, pad_token_id: int = 0,
                    ignore_index: int = -100, device=None) -> PairBatch:
    """Builds the right-padded :class:`PairBatch` of ``examples`` (R >= 1 of them)."""
    if len(examples) == 0:
        raise ValueError("examples is empty")
    for i, ex in enumerate(examples):
        if not isinstance(ex, PreferenceExample):
            raise ValueError(f"examples[{i}] is a {type(ex).__name__}, not a PreferenceExample")
    r = len(examples)
    seqs = [(ex.prompt_ids, ex.chosen_ids) for ex in examples] + \
           [(ex.prompt_ids, ex.rejected_ids) for ex in examples]
    t = max(p.size + y.size for p, y in seqs)
    ids = np.full((2 * r, t), pad_token_id, dtype=np.int64)
    mask = np.zeros((2 * r, t), dtype=np.int64)
    tgt = np.full((2 * r, t), ignore_index, dtype=np.int64)
    lengths = np.empty(2 * r, dtype=np.int64)
    for s, (p, y) in enumerate(seqs):
        lp, ly = p.size, y.size
        ids[s, :lp] = p
        ids[s, lp: lp + ly] = y
        mask[s, : lp + ly] = 1
        tgt[s, lp - 1: lp + ly - 1] = y  # the position before each response token predicts it
        lengths[s] = ly
    out = PairBatch(*(torch.from_numpy(a) for a in (ids, mask, tgt, lengths)))
    if device is not None:
        out = PairBatch(*(x.to(device) for x in out))
    return out
