"""From rows to tokenized examples: :func:`prepare` checks every row (:mod:`.checks`),
applies the bad-row policy, tokenizes the rest (:func:`tokenize_rows`, cached on disk as
``.npz`` by content hash) and says what was left out and why (:class:`PreparedData`). The
trainer and ``dpo-fast precompute`` both call it. Also the held-out split (:func:`split_eval`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..fileio import atomic_write
from .checks import (
    REASONS,
    DataError,
    RowPolicy,
    check_policy,
    check_rows,
    describe_dropped,
    policy_for,
    refusal,
)
from .examples import PreferenceExample
from .tokenization import tokenize_dataset

TOKENIZED_VERSION = 1
DEFAULT_COLUMNS = ("prompt", "chosen", "rejected")
#: What :func:`prepare` appends to the message of a row that stops the run, by default.
SKIP_HINT = " (set bad_rows='skip' to leave such rows out)"


@dataclass
class PreparedData:
    """One split, tokenized.

    Attributes:
        examples: the kept rows as :class:`dpo_fast.PreferenceExample`, in input order.
        row_names: for each example, where it came from (e.g. ``"train.jsonl line 7"``).
        skipped: reason -> number of rows left out (see :data:`REASONS`).
        skipped_rows: reason -> the first few row names left out for it.
        total_rows: rows read.
        from_cache: the tokenized data came from the on-disk cache.
    """

    examples: List[PreferenceExample]
    row_names: List[str]
    skipped: Dict[str, int] = field(default_factory=dict)
    skipped_rows: Dict[str, List[str]] = field(default_factory=dict)
    total_rows: int = 0
    from_cache: bool = False

    def describe_skipped(self, limit: int = 5, verb: str = "skipped") -> str:
        """One line per reason: count, ``verb``, why, first rows."""
        return describe_dropped(self.skipped_rows, self.skipped, limit, verb=verb)


# ------------------------------------------------------------------------------ tokenizing


def _cache_key(rows: List[Dict[str, Any]], tok_hash: Optional[str], max_length: Optional[int],
               truncation_mode: str, keep_identical: bool) -> str:
    settings = {"v": TOKENIZED_VERSION, "tokenizer": tok_hash, "max_length": max_length,
                "truncation_mode": truncation_mode}
    if keep_identical:  # only then: the keys of every other setting stay as they were
        settings["keep_identical"] = True
    h = hashlib.sha256(json.dumps(settings).encode())
    for r in rows:
        h.update(json.dumps([r["prompt"], r["chosen"], r["rejected"]], sort_keys=True,
                            ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:32]


def _save_tokenized(path: Path, examples: List[PreferenceExample], kept: List[int],
                    reasons: Dict[int, str]) -> None:
    arrays: Dict[str, np.ndarray] = {"kept": np.asarray(kept, dtype=np.int64)}
    for part in ("prompt", "chosen", "rejected"):
        ids = [getattr(e, f"{part}_ids") for e in examples]
        arrays[f"{part}_ids"] = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        arrays[f"{part}_offsets"] = np.cumsum([0] + [a.size for a in ids]).astype(np.int64)
    codes = sorted(REASONS)
    arrays["dropped"] = np.asarray(sorted(reasons), dtype=np.int64)
    arrays["dropped_reason"] = np.asarray([codes.index(reasons[i]) for i in sorted(reasons)],
                                          dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def _load_tokenized(path: Path) -> Optional[Tuple[List[PreferenceExample], List[int],
                                                  Dict[int, str]]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        codes = sorted(REASONS)
        n = a["kept"].size
        parts = []
        for part in ("prompt", "chosen", "rejected"):
            ids, off = a[f"{part}_ids"], a[f"{part}_offsets"]
            if off.size != n + 1:
                return None
            parts.append([ids[off[j]:off[j + 1]] for j in range(n)])
        examples = [PreferenceExample(p, c, r) for p, c, r in zip(*parts)]
        reasons = {int(i): codes[int(c)] for i, c in zip(a["dropped"], a["dropped_reason"])}
        return examples, [int(k) for k in a["kept"]], reasons
    except Exception:
        return None  # a damaged cache file is recomputed, never trusted


def tokenize_rows(tokenizer, rows: List[Dict[str, Any]], *, max_length: Optional[int],
                  truncation_mode: str, names: List[str], bad_rows: RowPolicy,
                  keep_identical: bool = False,
                  progress: Optional[Callable[[int, int], None]] = None, chunk: int = 2048
                  ) -> Tuple[List[PreferenceExample], List[int], Dict[int, str]]:
    """Tokenizes checked rows (``{"prompt", "chosen", "rejected"}``), ``chunk`` at a time,
    calling ``progress(done, total)``. Returns (examples, kept row positions, position ->
    reason): ``"prompt_too_long"``, ``"too_long"`` (``truncation_mode="drop"``),
    ``"identical"`` (unless ``keep_identical``), ``"tokenizer_error"`` (a row the tokenizer
    refuses; DataError instead where that reason's policy is "error")."""
    cut = None if truncation_mode == "drop" else max_length
    examples: List[PreferenceExample] = []
    kept_pos: List[int] = []
    reasons: Dict[int, str] = {}
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        try:
            ex, dropped = tokenize_dataset(tokenizer, part, max_length=cut, identical="keep",
                                           row_names=names[start:start + chunk])
            gone = set(dropped)
            examples += ex
            kept_pos += [start + j for j in range(len(part)) if j not in gone]
            reasons.update({start + j: dropped.reasons[j] for j in dropped})
        except ValueError as e:  # a row the tokenizer refuses: find it (and any others)
            if policy_for(bad_rows, "tokenizer_error") == "error":
                raise DataError(str(e)) from e
            for j, r in enumerate(part):
                try:
                    ex, dr = tokenize_dataset(tokenizer, [r], max_length=cut, identical="keep")
                except ValueError:
                    reasons[start + j] = "tokenizer_error"
                    continue
                if dr:
                    reasons[start + j] = dr.reasons[0]
                else:
                    examples.append(ex[0])
                    kept_pos.append(start + j)
        if progress is not None:
            progress(min(start + chunk, len(rows)), len(rows))
    out_ex, out_pos = [], []
    for ex, j in zip(examples, kept_pos):
        if truncation_mode == "drop" and max_length is not None and \
                ex.max_sequence_length > max_length:
            reasons[j] = "prompt_too_long" if ex.prompt_ids.size >= max_length else "too_long"
            continue
        if ex.identical and not keep_identical:
            reasons[j] = "identical"
            continue
        out_ex.append(ex)
        out_pos.append(j)
    return out_ex, out_pos, reasons


def prepare(rows: Sequence[Any], names: Sequence[str], tokenizer, *,
            columns: Tuple[str, str, str] = DEFAULT_COLUMNS, max_length: Optional[int] = None,
            truncation_mode: str = "keep_start", bad_rows: RowPolicy = "skip",
            hint: str = SKIP_HINT, cache_dir: Optional[Path] = None,
            tok_hash: Optional[str] = None, pre_skipped: Optional[Dict[str, List[str]]] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> PreparedData:
    """Checks, tokenizes (through the on-disk cache if ``cache_dir``) and reports one split.

    Args:
        rows, names: rows and their names, as :func:`~dpo_fast.data.read_source` gives them.
        tokenizer: a Hugging Face tokenizer.
        columns: the prompt, chosen and rejected columns; without a prompt column in any row,
            the prompt is the shared prefix of chosen and rejected (implicit prompt).
        max_length, truncation_mode: ``"keep_start"`` cuts ``prompt + response`` to its first
            ``max_length`` tokens; ``"drop"`` leaves such rows out as ``"too_long"``.
        bad_rows: the policy per reason (:data:`~dpo_fast.data.REASONS`): "skip" (left out and
            counted) or "error" (:class:`DataError` naming the row, plus ``hint``); one for
            all, or a mapping reason -> policy (unnamed reasons: "error"), where
            ``"identical"`` may also be "keep".
        cache_dir, tok_hash: where tokenized rows are cached, and the tokenizer's hash (part
            of the cache key).
        pre_skipped: rows the reader left out (reason -> names), counted in the report.
        progress: ``progress(done, total)`` while tokenizing (not called for cached data).
    """
    check_policy(bad_rows)
    implicit = bool(len(rows)) and all(
        isinstance(r, Mapping) and columns[0] not in r for r in rows)
    if hasattr(rows, "column_names"):
        implicit = columns[0] not in rows.column_names
    good, bad, why = check_rows(rows, names, columns, implicit)
    refused = [i for reason, idx in bad.items() if policy_for(bad_rows, reason) == "error"
               for i in idx]
    if refused:
        raise DataError(f"{why[min(refused)]}{hint}")
    checked = [r for _, r in good]
    good_names = [names[i] for i, _ in good]
    keep_identical = policy_for(bad_rows, "identical") == "keep"
    cached = None
    path = None
    if cache_dir is not None and checked:
        path = Path(cache_dir) / (_cache_key(checked, tok_hash, max_length, truncation_mode,
                                             keep_identical) + ".npz")
        if path.is_file():
            cached = _load_tokenized(path)
    if cached is not None:
        examples, kept_pos, reasons = cached
    else:
        examples, kept_pos, reasons = tokenize_rows(
            tokenizer, checked, max_length=max_length, truncation_mode=truncation_mode,
            names=good_names, bad_rows=bad_rows, keep_identical=keep_identical,
            progress=progress)
        if path is not None:
            try:
                _save_tokenized(path, examples, kept_pos, reasons)
            except OSError:
                pass  # the cache is an optimization; a read-only cache dir is not an error
    refused = [j for j in sorted(reasons) if policy_for(bad_rows, reasons[j]) == "error"]
    if refused:
        reason = reasons[refused[0]]
        raise DataError(refusal(reason, [good_names[j] for j in refused
                                         if reasons[j] == reason], hint))
    skipped_rows: Dict[str, List[str]] = {k: list(v) for k, v in (pre_skipped or {}).items()}
    for reason, idx in bad.items():
        skipped_rows.setdefault(reason, []).extend(names[i] for i in idx)
    for j in sorted(reasons):
        skipped_rows.setdefault(reasons[j], []).append(good_names[j])
    return PreparedData(
        examples=examples, row_names=[good_names[j] for j in kept_pos],
        skipped={k: len(v) for k, v in skipped_rows.items()},
        skipped_rows={k: v[:20] for k, v in skipped_rows.items()},
        total_rows=len(rows) + sum(len(v) for v in (pre_skipped or {}).values()),
        from_cache=cached is not None)


# ------------------------------------------------------------------------------ splitting


def split_eval(rows: Sequence[Any], names: List[str], fraction: float, seed: int,
               group_column: Optional[str]) -> Tuple[List[Any], List[str], List[Any], List[str]]:
    """Deterministic held-out split: ``fraction`` of the groups (``group_column``'s values,
    e.g. movies) or of the rows, chosen by ``seed``. Returns (train rows, names, eval rows,
    names)."""
    n = len(rows)
    if group_column is not None:
        keys = []
        for i in range(n):
            r = rows[i]
            if not isinstance(r, Mapping) or group_column not in r:
                raise DataError(f"{names[i]}: eval_group_column {group_column!r} is missing")
            keys.append(json.dumps(r[group_column], sort_keys=True, default=str))
        groups = sorted(set(keys))
        random.Random(seed).shuffle(groups)
        held = set(groups[:max(1, int(round(fraction * len(groups))))])
        is_eval = [k in held for k in keys]
    else:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held_idx = set(order[:max(1, int(round(fraction * n)))])
        is_eval = [i in held_idx for i in range(n)]
    tr = [i for i in range(n) if not is_eval[i]]
    ev = [i for i in range(n) if is_eval[i]]
    take = (lambda idx: rows.select(idx)) if hasattr(rows, "select") else \
        (lambda idx: [rows[i] for i in idx])
    return take(tr), [names[i] for i in tr], take(ev), [names[i] for i in ev]


def count_reasons(prepared: Sequence[PreparedData]) -> Dict[str, int]:
    """Skipped rows by reason over several splits."""
    c: Counter = Counter()
    for p in prepared:
        c.update(p.skipped)
    return dict(c)
