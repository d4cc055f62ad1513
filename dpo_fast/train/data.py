"""Preference data for the trainer: read (through ``datasets``), check every row, split off the
held-out set, tokenize (cached on disk), and say what was left out and why.

Row formats (TRL's):

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: lists of ``{"role", "content"}`` messages, rendered with the tokenizer's chat
  template (:func:`dpo_fast.tokenize_preference`);
- implicit prompt: only ``chosen`` / ``rejected`` (strings or conversations) sharing a prefix,
  which becomes the prompt (TRL's ``extract_prompt``).

Bad rows -- not a mapping, a missing field, a value that is neither a string nor a list of
messages, an empty response, text that cannot be encoded as UTF-8 (lone surrogates), a line of
a text file that is not valid UTF-8, a prompt alone over ``max_length``, chosen == rejected --
either stop the run with a message naming the row and the field (``bad_rows="error"``) or are
left out and counted by reason (``"skip"``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..data import PreferenceExample, tokenize_dataset
from ..fileio import atomic_write

#: Why a row was left out (keys of :attr:`PreparedData.skipped`).
REASONS = {
    "not_a_mapping": "not a mapping of columns",
    "missing_field": "a field is missing",
    "bad_type": "a field is neither a string nor a list of messages",
    "empty": "an empty prompt or response",
    "undecodable": "text that is not valid UTF-8",
    "no_prompt": "implicit prompt: chosen and rejected share no prefix",
    "prompt_too_long": "the prompt alone reaches max_length",
    "too_long": "prompt + response over max_length (truncation_mode='drop')",
    "identical": "chosen == rejected after tokenization",
    "tokenizer_error": "the tokenizer refused the row",
}
TOKENIZED_VERSION = 1
#: Data names that stand for the bundled Rotten Tomatoes pairs (dpo_fast.assets), split by
#: movie (10% of the movies held out, seed 0).
BUNDLED_DATA = ("bundled:rotten-tomatoes/train", "bundled:rotten-tomatoes/eval")


class DataError(ValueError):
    """Bad training data: the message names the source, the row and the field."""


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

    def describe_skipped(self, limit: int = 5) -> str:
        """One line per reason: count, why, first rows."""
        lines = []
        for reason, n in sorted(self.skipped.items()):
            rows = ", ".join(self.skipped_rows.get(reason, [])[:limit])
            lines.append(f"{n} row(s) skipped, {REASONS[reason]}: {rows}"
                         + (", ..." if n > limit else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------ reading

_TEXT_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}


def _utf8_lines(path: Path) -> List[Tuple[int, int, int]]:
    """(line, column, byte) of every line of ``path`` that is not valid UTF-8."""
    bad = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((lineno, e.start + 1, raw[e.start]))
    return bad


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_source(source: Any, *, what: str = "train_data", split: str = "train",
                bad_rows: str = "skip") -> Tuple[Any, List[str], Dict[str, List[str]]]:
    """Reads a data source into ``(rows, row_names, skipped)``.

    ``rows`` is a ``datasets.Dataset`` or a list of mappings; ``row_names[i]`` names row i in
    messages; ``skipped`` holds lines of a text file dropped for bad UTF-8 (``bad_rows="skip"``;
    with "error" such a line raises :class:`DataError`).
    """
    import datasets

    skipped: Dict[str, List[str]] = {}
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"{what}: the DatasetDict has splits {sorted(source)}, not "
                            f"{split!r}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source, [f"{what} row {i}" for i in range(len(source))], skipped
    if isinstance(source, (list, tuple)):
        return list(source), [f"{what} row {i}" for i in range(len(source))], skipped
    if isinstance(source, str) and source.startswith("bundled:"):
        if source not in BUNDLED_DATA:
            raise DataError(f"{what}: unknown bundled data {source!r}; use one of "
                            f"{list(BUNDLED_DATA)}")
        from ..assets import rotten_tomatoes_pairs

        rows = rotten_tomatoes_pairs(eval_fraction=0.1, seed=0)[BUNDLED_DATA.index(source)]
        return rows, [f"{source} row {i}" for i in range(len(rows))], skipped
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"{what} must be a file path, a datasets Dataset, a list of dicts or a "
                        f"datasets name, got {type(source).__name__}")
    p = Path(source)
    suffix = p.suffix.lower()
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{what}: {p} is a directory but not a saved datasets Dataset "
                            f"({first_line(e)})") from e
        return read_source(ds, what=what, split=split, bad_rows=bad_rows)
    if p.is_file():
        if suffix not in _TEXT_SUFFIXES and suffix != ".parquet":
            raise DataError(f"{what}: {p}: unknown data format {suffix!r}; use .jsonl, .json, "
                            ".csv or .parquet")
        name = p.name
        if suffix in _TEXT_SUFFIXES:
            bad = _utf8_lines(p)
            if bad:
                line, col, byte = bad[0]
                if bad_rows == "error" or suffix != ".jsonl":
                    raise DataError(f"{what}: {p}:{line}: not valid UTF-8 (byte 0x{byte:02x} "
                                    f"at column {col}); save the file as UTF-8")
                return _read_jsonl_skipping(p, {b[0] for b in bad}, what)
            if p.stat().st_size == 0:
                return [], [], skipped
        try:
            ds = datasets.load_dataset(_TEXT_SUFFIXES.get(suffix, "parquet"),
                                       data_files=str(p), split="train")
        except Exception as e:
            raise DataError(f"{what}: cannot read {p} ({type(e).__name__}: "
                            f"{first_line(e)})") from e
        if suffix == ".jsonl":
            lines = _nonblank_lines(p)
            names = [f"{name} line {n}" for n in lines] if len(lines) == len(ds) else \
                [f"{name} row {i}" for i in range(len(ds))]
        elif suffix == ".csv":
            names = [f"{name} row {i + 1}" for i in range(len(ds))]
        else:
            names = [f"{name} item {i}" for i in range(len(ds))]
        return ds, names, skipped
    if suffix in _TEXT_SUFFIXES or suffix == ".parquet" or os.sep in str(source):
        raise DataError(f"{what}: data file {p} does not exist")
    try:  # a datasets name (hub or local script), if one is reachable
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as e:
        raise DataError(f"{what}: {source!r} is neither a file nor a dataset that datasets can "
                        f"load ({type(e).__name__}: {first_line(e)})") from e
    return ds, [f"{source} row {i}" for i in range(len(ds))], skipped


def _nonblank_lines(p: Path) -> List[int]:
    with open(p, "rb") as f:
        return [n for n, raw in enumerate(f, 1) if raw.strip()]


def _read_jsonl_skipping(p: Path, bad_lines: set, what: str):
    rows, names = [], []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno in bad_lines or not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except json.JSONDecodeError as e:
                raise DataError(f"{what}: {p}:{lineno}: not valid JSON ({e})") from None
            names.append(f"{p.name} line {lineno}")
    skipped = {"undecodable": [f"{p.name} line {n}" for n in sorted(bad_lines)]}
    return rows, names, skipped


# ------------------------------------------------------------------------------ checking


def _is_messages(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in v)


def _undecodable(v: Any) -> bool:
    texts = [v] if isinstance(v, str) else [m.get("content") for m in v] if _is_messages(v) \
        else []
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _empty(v: Any) -> bool:
    if isinstance(v, str):
        return not v.strip()
    return len(v) == 0 or all(not str(m.get("content") or "").strip() for m in v)


def extract_prompt(chosen, rejected) -> Tuple[Any, Any, Any]:
    """TRL's implicit prompt: the longest shared prefix of ``chosen`` and ``rejected``
    (characters of strings, messages of conversations) becomes the prompt; a string prompt
    gives its trailing space to the responses."""
    n = min(len(chosen), len(rejected))
    idx = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def check_rows(rows: Sequence[Any], names: Sequence[str], columns: Tuple[str, str, str],
               implicit: bool) -> Tuple[List[Tuple[int, Dict[str, Any]]], Dict[str, List[int]],
                                        Dict[int, str]]:
    """Checks each row; returns ``(good, bad, why)``: good = [(row index, {"prompt", "chosen",
    "rejected"})], bad = reason -> row indices, why = row index -> a message naming the field."""
    pcol, ccol, rcol = columns
    good: List[Tuple[int, Dict[str, Any]]] = []
    bad: Dict[str, List[int]] = {}
    why: Dict[int, str] = {}

    def reject(i: int, reason: str, msg: str) -> None:
        bad.setdefault(reason, []).append(i)
        why[i] = f"{names[i]}: {msg}"

    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            reject(i, "not_a_mapping", f"expected a mapping with columns "
                   f"{[ccol, rcol] if implicit else list(columns)}, got {type(row).__name__}")
            continue
        cols = (ccol, rcol) if implicit else columns
        missing = [c for c in cols if c not in row or row[c] is None]
        if missing:
            reject(i, "missing_field", f"field {missing[0]!r} is missing (the row has "
                   f"{sorted(k for k, v in row.items() if v is not None)})")
            continue
        vals = {c: row[c] for c in cols}
        wrong = [c for c, v in vals.items() if not (isinstance(v, str) or _is_messages(v))]
        if wrong:
            reject(i, "bad_type", f"field {wrong[0]!r} must be a string or a list of "
                   f"{{'role', 'content'}} messages, got {type(vals[wrong[0]]).__name__}")
            continue
        kinds = {c: isinstance(v, str) for c, v in vals.items()}
        if len(set(kinds.values())) != 1:
            reject(i, "bad_type", "fields mix strings and message lists: "
                   + ", ".join(f"{c} is {'a string' if s else 'messages'}"
                               for c, s in kinds.items()))
            continue
        undec = [c for c, v in vals.items() if _undecodable(v)]
        if undec:
            reject(i, "undecodable", f"field {undec[0]!r} holds text that cannot be encoded as "
                   "UTF-8 (a lone surrogate: the source was decoded wrongly)")
            continue
        if implicit:
            p, c, r = extract_prompt(vals[ccol], vals[rcol])
            if len(p) == 0:
                reject(i, "no_prompt", f"no {pcol!r} field and {ccol!r} / {rcol!r} share no "
                       "prefix to use as the prompt")
                continue
        else:
            p, c, r = vals[pcol], vals[ccol], vals[rcol]
        empty = [n for n, v in ((pcol, p), (ccol, c), (rcol, r)) if _empty(v)]
        if empty:
            reject(i, "empty", f"field {empty[0]!r} is empty")
            continue
        good.append((i, {"prompt": p, "chosen": c, "rejected": r}))
    return good, bad, why


# ------------------------------------------------------------------------------ tokenizing


def _cache_key(rows: List[Dict[str, Any]], tok_hash: Optional[str], max_length: Optional[int],
               truncation_mode: str) -> str:
    h = hashlib.sha256(json.dumps({"v": TOKENIZED_VERSION, "tokenizer": tok_hash,
                                   "max_length": max_length,
                                   "truncation_mode": truncation_mode}).encode())
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


def _tokenize(tokenizer, rows: List[Dict[str, Any]], max_length: Optional[int],
              truncation_mode: str, names: List[str], bad_rows: str,
              progress: Optional[Callable[[int, int], None]] = None, chunk: int = 2048
              ) -> Tuple[List[PreferenceExample], List[int], Dict[int, str]]:
    """Tokenizes checked rows (``chunk`` at a time, calling ``progress(done, total)``).
    Returns (examples, kept row positions, position -> reason)."""
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
            if bad_rows == "error":
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
        if np.array_equal(ex.chosen_ids, ex.rejected_ids):
            reasons[j] = "identical"
            continue
        out_ex.append(ex)
        out_pos.append(j)
    return out_ex, out_pos, reasons


def prepare(rows: Sequence[Any], names: Sequence[str], tokenizer, *,
            columns: Tuple[str, str, str], max_length: Optional[int], truncation_mode: str,
            bad_rows: str, cache_dir: Optional[Path], tok_hash: Optional[str],
            pre_skipped: Optional[Dict[str, List[str]]] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> PreparedData:
    """Checks, tokenizes (through the on-disk cache if ``cache_dir``) and reports one split."""
    implicit = bool(len(rows)) and all(
        isinstance(r, Mapping) and columns[0] not in r for r in rows)
    if hasattr(rows, "column_names"):
        implicit = columns[0] not in rows.column_names
    good, bad, why = check_rows(rows, names, columns, implicit)
    if bad and bad_rows == "error":
        first = min(i for idx in bad.values() for i in idx)
        raise DataError(f"{why[first]} (set bad_rows='skip' to leave such rows out)")
    checked = [r for _, r in good]
    good_names = [names[i] for i, _ in good]
    cached = None
    path = None
    if cache_dir is not None and checked:
        path = Path(cache_dir) / (_cache_key(checked, tok_hash, max_length, truncation_mode)
                                  + ".npz")
        if path.is_file():
            cached = _load_tokenized(path)
    if cached is not None:
        examples, kept_pos, reasons = cached
    else:
        examples, kept_pos, reasons = _tokenize(tokenizer, checked, max_length,
                                                truncation_mode, good_names, bad_rows,
                                                progress=progress)
        if path is not None:
            try:
                _save_tokenized(path, examples, kept_pos, reasons)
            except OSError:
                pass  # the cache is an optimization; a read-only cache dir is not an error
    if reasons and bad_rows == "error":
        j = min(reasons)
        raise DataError(f"{good_names[j]}: {REASONS[reasons[j]]} (set bad_rows='skip' to "
                        "leave such rows out)")
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
