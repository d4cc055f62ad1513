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

Tokenization follows TRL 1.16's ``DPOTrainer`` for string rows: EOS is appended to each
response string (unless it already ends with it), the prompt and ``prompt + response`` are
tokenized separately with the tokenizer's default special tokens (so they are joined with no
separator: give responses a leading space), the response is what follows the longest common
prefix of the prompt ids and both ``prompt + response`` ids, ``(prompt + response)[:max_length]``
keeps the start, and a row whose prompt alone reaches ``max_length`` is dropped. Conversational
rows (lists of ``{"role", "content"}`` messages) go through the tokenizer's chat template the
same way TRL does (``add_generation_prompt=True`` for the prompt; the template supplies the end
of turn, so no EOS is appended).
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

KEY_VERSION = 1
KEY_BYTES = 16
_KEY_PREFIX = b"dpo_fast/pref/v1\0"
_INT32_MAX = 2**31 - 1


class PromptTooLongError(ValueError):
    """The tokenized prompt alone reaches ``max_length``: no response token would remain."""


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


# ------------------------------------------------------------------------------ tokenization


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def _split_ids(prompt_ids: Sequence[int], prompt_chosen_ids: Sequence[int],
               prompt_rejected_ids: Sequence[int], max_length: Optional[int]) -> PreferenceExample:
    """TRL 1.16's split of tokenized ``prompt`` / ``prompt + response`` into an example."""
    plen = min(_common_prefix_length(prompt_ids, prompt_chosen_ids),
               _common_prefix_length(prompt_ids, prompt_rejected_ids))
    prompt = list(prompt_ids[:plen])
    chosen = list(prompt_chosen_ids[plen:])
    rejected = list(prompt_rejected_ids[plen:])
    if max_length is not None:
        if plen >= max_length:
            raise PromptTooLongError(
                f"the prompt has {plen} tokens, max_length={max_length}: no response token "
                "would remain (TRL drops such rows)")
        chosen = chosen[: max_length - plen]
        rejected = rejected[: max_length - plen]
    return PreferenceExample(prompt, chosen, rejected)


def _check_max_length(max_length: Optional[int]) -> None:
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")


def _input_ids(encoded) -> List[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") \
        else encoded
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch dimension of 1
        if len(ids) != 1:
            raise ValueError("expected one tokenized sequence, got a batch")
        ids = ids[0]
    return list(ids)


def _eos_token(tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("add_eos=True needs tokenizer.eos_token, which is not set; set it or "
                         "pass add_eos=False")
    return eos


def tokenize_preference(tokenizer, prompt, chosen, rejected, *, max_length: Optional[int] = None,
                        add_eos: bool = True) -> PreferenceExample:
    """Tokenizes one preference row the way TRL 1.16's ``DPOTrainer`` does.

    Args:
        tokenizer: a Hugging Face tokenizer (``__call__`` / ``apply_chat_template``).
        prompt, chosen, rejected: strings, or (conversational rows) lists of message dicts;
            the three must be of the same kind.
        max_length: if set, each ``prompt + response`` is cut to its first ``max_length``
            tokens (the prompt is kept whole); a prompt of ``max_length`` tokens or more raises
            :class:`PromptTooLongError`.
        add_eos: append ``tokenizer.eos_token`` to string responses that do not end with it.

    Returns:
        the :class:`PreferenceExample`.
    """
    _check_max_length(max_length)
    kinds = {name: ("str" if isinstance(v, str) else "conversation" if _is_conversation(v)
                    else type(v).__name__)
             for name, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}
    bad = {k: v for k, v in kinds.items() if v not in ("str", "conversation")}
    if bad:
        raise ValueError("prompt / chosen / rejected must be strings or lists of message dicts; "
                         + ", ".join(f"{k} is {v}" for k, v in bad.items()))
    if len(set(kinds.values())) != 1:
        raise ValueError("prompt / chosen / rejected must all be strings or all be "
                         f"conversations, got {kinds}")
    if kinds["prompt"] == "conversation":
        def chat(messages, **kw):
            return _input_ids(tokenizer.apply_chat_template(messages, tokenize=True,
                                                            return_dict=True, **kw))

        p = chat(prompt, add_generation_prompt=True)
        pc = chat(list(prompt) + list(chosen))
        pr = chat(list(prompt) + list(rejected))
        return _split_ids(p, pc, pr, max_length)
    if add_eos:
        eos = _eos_token(tokenizer)
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    p = _input_ids(tokenizer(prompt))
    pc = _input_ids(tokenizer(prompt + chosen))
    pr = _input_ids(tokenizer(prompt + rejected))
    return _split_ids(p, pc, pr, max_length)


PROMPT_TOO_LONG = "prompt_too_long"
IDENTICAL = "identical"
_REASON_TEXT = {PROMPT_TOO_LONG: "the prompt alone reaches max_length",
                IDENTICAL: "chosen == rejected after tokenization (no preference to learn)"}
_IDENTICAL_POLICIES = ("skip", "error", "keep")


class DroppedRows(list):
    """The rows :func:`tokenize_dataset` left out: a sorted list of their indices (0-based,
    in input order), with ``reasons[i]`` saying why: ``"prompt_too_long"`` (the prompt alone
    reaches ``max_length``; TRL drops these too) or ``"identical"`` (chosen and rejected
    tokenize to the same ids, so the pair's DPO gradient is zero)."""

    def __init__(self, reasons: Optional[Mapping[int, str]] = None,
                 names: Optional[Sequence[str]] = None):
        reasons = dict(reasons or {})
        super().__init__(sorted(reasons))
        self.reasons = reasons
        self._names = names

    def of(self, reason: str) -> List[int]:
        """The indices dropped for ``reason``."""
        return [i for i in self if self.reasons[i] == reason]

    def name(self, i: int) -> str:
        return self._names[i] if self._names is not None else f"row {i}"

    def describe(self, limit: int = 5) -> str:
        """One line per reason: the count, why, and the first ``limit`` rows by name."""
        lines = []
        for reason, text in _REASON_TEXT.items():
            idx = self.of(reason)
            if idx:
                shown = ", ".join(self.name(i) for i in idx[:limit])
                lines.append(f"{len(idx)} row(s) dropped, {text}: {shown}"
                             + (f", ... ({len(idx) - limit} more)" if len(idx) > limit else ""))
        return "\n".join(lines)


def tokenize_dataset(tokenizer, rows: Iterable[Mapping[str, Any]], *,
                     max_length: Optional[int] = None, add_eos: bool = True,
                     columns: Tuple[str, str, str] = ("prompt", "chosen", "rejected"),
                     batch_size: int = 1024, identical: str = "skip",
                     row_names: Optional[Sequence[str]] = None,
                     ) -> Tuple[List[PreferenceExample], DroppedRows]:
    """Tokenizes preference rows (mappings with prompt / chosen / rejected columns).

    String rows are tokenized in batches (same ids as one call per row);
    conversational rows one by one through the chat template.

    Args:
        tokenizer: a Hugging Face tokenizer.
        rows: iterable of mappings (dicts, dataset rows).
        max_length, add_eos: as in :func:`tokenize_preference`.
        columns: names of the prompt, chosen and rejected columns.
        batch_size: rows per tokenizer call.
        identical: what to do with a row whose chosen and rejected responses tokenize to the
            same ids (after truncation): ``"skip"`` it with a warning (default), raise an
            ``"error"``, or ``"keep"`` it (its DPO gradient is zero, but it still counts in
            a batch mean, as in TRL).
        row_names: how messages name row i (e.g. ``"line 7"`` of a file); default
            ``"row i"``.

    Returns:
        ``(examples, dropped)``: the examples of the kept rows in input order, and a
        :class:`DroppedRows` (a sorted list of the indices of the rows left out, with their
        reasons).

    Raises:
        ValueError naming the row and column for a row that is not a mapping, lacks a
        column, holds a value that is neither a string nor a list of messages, mixes kinds, or
        tokenizes to an empty prompt / response; and for identical responses if
        ``identical="error"``.
    """
    _check_max_length(max_length)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if identical not in _IDENTICAL_POLICIES:
        raise ValueError(f"identical must be one of {_IDENTICAL_POLICIES}, got {identical!r}")
    pcol, ccol, rcol = columns
    eos = _eos_token(tokenizer) if add_eos else None
    examples: List[Optional[PreferenceExample]] = []
    reasons: Dict[int, str] = {}
    pending: List[Tuple[int, str, str, str]] = []  # (row, prompt, prompt+chosen, prompt+rejected)

    def name(i: int) -> str:
        return row_names[i] if row_names is not None else f"row {i}"

    def finish(i: int, make) -> None:
        try:
            ex = make()
        except PromptTooLongError:
            reasons[i] = PROMPT_TOO_LONG
            return
        except ValueError as e:
            raise ValueError(f"{name(i)}: {e}") from e
        if identical != "keep" and np.array_equal(ex.chosen_ids, ex.rejected_ids):
            reasons[i] = IDENTICAL
            return
        examples[i] = ex

    def flush() -> None:
        if not pending:
            return
        texts = [t for _, p, c, r in pending for t in (p, c, r)]
        ids = tokenizer(texts)["input_ids"]
        for j, (i, _, _, _) in enumerate(pending):
            p, pc, pr = ids[3 * j: 3 * j + 3]
            finish(i, lambda: _split_ids(list(p), list(pc), list(pr), max_length))
        pending.clear()

    for i, row in enumerate(rows):
        examples.append(None)
        if not isinstance(row, Mapping):
            raise ValueError(f"{name(i)}: expected a mapping with columns {list(columns)}, got "
                             f"{type(row).__name__}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{name(i)}: missing column(s) {missing}; it has {sorted(row)}")
        vals = [row[c] for c in columns]
        for c, v in zip(columns, vals):
            if not (isinstance(v, str) or _is_conversation(v)):
                raise ValueError(f"{name(i)}, column {c!r}: expected a string or a list of "
                                 f"message dicts, got {type(v).__name__}")
        if all(isinstance(v, str) for v in vals):
            p, c, r = vals
            if eos is not None:
                c = c if c.endswith(eos) else c + eos
                r = r if r.endswith(eos) else r + eos
            pending.append((i, p, p + c, p + r))
            if len(pending) >= batch_size:
                flush()
        else:
            p, c, r = vals
            finish(i, lambda: tokenize_preference(tokenizer, p, c, r, max_length=max_length,
                                                  add_eos=add_eos))
    flush()
    dropped = DroppedRows(reasons, row_names)
    same = dropped.of(IDENTICAL)
    if same and identical == "error":
        raise ValueError(f"{len(same)} row(s) have chosen == rejected after tokenization: "
                         + ", ".join(name(i) for i in same[:5]) + (", ..." if len(same) > 5
                                                                   else ""))
    if same:
        warnings.warn(DroppedRows({i: IDENTICAL for i in same}, row_names).describe(),
                      UserWarning, stacklevel=2)
    return [e for e in examples if e is not None], dropped


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


# ------------------------------------------------------------------------------ files


class Rows(list):
    """The rows :func:`read_rows` read (a list of dicts), with ``locations[i]`` naming where
    row i came from in the file (``"line 7"`` for JSONL and CSV, ``"item 3"`` for JSON)."""

    def __init__(self, rows: Iterable[dict] = (), locations: Sequence[str] = ()):
        super().__init__(rows)
        self.locations = list(locations)


def _decode(p, data: bytes, offset_line: int = 1) -> str:
    """``data`` as UTF-8 (a leading byte-order mark dropped); a bad byte is a ValueError naming
    the file, line and column."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + offset_line
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{p}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                         f"{col}); save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_rows(path, *, limit: Optional[int] = None) -> Rows:
    """Reads preference rows from a ``.jsonl`` (one JSON object per line), ``.json`` (a list
    of objects) or ``.csv`` (header row) file; at most ``limit`` rows if given.

    The file must be UTF-8 (a byte-order mark is allowed). Returns a :class:`Rows` (a list of
    dicts that also says where each row came from). Errors (ValueError) name the file and
    the line (JSONL, CSV) or list index (JSON); an empty file gives no rows.
    """
    import csv
    import io
    import json
    from pathlib import Path

    p = Path(path)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"{p}: unknown data format {suffix!r}; use .jsonl, .json or .csv")
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a data file")
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    rows: List[dict] = []
    where: List[str] = []
    if suffix == ".jsonl":
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                line = _decode(p, raw, lineno)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{p}:{lineno}: expected a JSON object, got "
                                     f"{type(obj).__name__}")
                rows.append(obj)
                where.append(f"line {lineno}")
    elif suffix == ".json":
        text = _decode(p, p.read_bytes())
        if not text.strip():
            return Rows()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
        for i, obj in enumerate(data[:limit] if limit is not None else data):
            if not isinstance(obj, dict):
                raise ValueError(f"{p}: item {i}: expected a JSON object, got "
                                 f"{type(obj).__name__}")
            rows.append(obj)
            where.append(f"item {i}")
    else:
        reader = csv.DictReader(io.StringIO(_decode(p, p.read_bytes()), newline=""))
        try:
            for row in reader:
                if limit is not None and len(rows) >= limit:
                    break
                if None in row:
                    raise ValueError(f"{p}:{reader.line_num}: more fields than the header has")
                rows.append(dict(row))
                where.append(f"line {reader.line_num}")
        except csv.Error as e:
            raise ValueError(f"{p}:{reader.line_num}: not valid CSV ({e})") from None
    return Rows(rows, where)
