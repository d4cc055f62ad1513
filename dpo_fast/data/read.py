"""The one reader of preference rows, for the trainer and ``dpo-fast precompute``.

A source is a file (``.jsonl``, ``.json`` = a list of objects, ``.csv``, ``.parquet``), a folder
written by ``datasets`` (``save_to_disk``), a ``datasets.Dataset`` / ``DatasetDict``, a list of
mappings, a ``datasets`` name (hub or local script) or a bundled data set
(:data:`BUNDLED_DATA`). Files are read through ``datasets``. Text files must be UTF-8: a
line that is not stops the read with its line and column, or (JSONL, ``bad_rows="skip"``) is
left out and counted as ``"undecodable"``; a file ``datasets`` cannot parse is scanned for
the first line (JSONL) or item (JSON) that is not a JSON object, which the message names.

Rows are named in messages as ``"<label> line 7"`` (JSONL: the line in the file),
``"<label> row 3"`` (CSV: the data row, 1-based; in-memory rows and datasets: the index) or
``"<label> item 3"`` (JSON, Parquet: the index).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import first_line
from .checks import DataError, RowPolicy, policy_for

#: Data names that stand for the bundled Rotten Tomatoes pairs (dpo_fast.assets), split by
#: movie (10% of the movies held out, seed 0).
BUNDLED_DATA = ("bundled:rotten-tomatoes/train", "bundled:rotten-tomatoes/eval")
#: File suffixes of data files.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
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


def read_source(source: Any, *, what: str = "train_data", split: str = "train",
                bad_rows: RowPolicy = "skip", label: Optional[str] = None
                ) -> Tuple[Any, List[str], Dict[str, List[str]]]:
    """Reads a data source into ``(rows, row_names, skipped)``.

    ``rows`` is a ``datasets.Dataset`` or a list of mappings; ``row_names[i]`` names row i in
    messages (``label`` starts each name: default the file's name, ``what`` for in-memory rows
    and saved folders, the name of a bundled or hub data set); ``skipped`` holds lines of a
    text file left out for bad UTF-8 (policy of ``"undecodable"`` in ``bad_rows`` is "skip";
    with "error" such a line raises :class:`DataError`). ``what`` names the setting in
    messages; ``split`` picks the split of a ``DatasetDict`` or a hub data set.
    """
    import datasets

    skipped: Dict[str, List[str]] = {}
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"{what}: the DatasetDict has splits {sorted(source)}, not "
                            f"{split!r}")
        source = source[split]
    if isinstance(source, (datasets.Dataset, list, tuple)):
        rows = source if isinstance(source, datasets.Dataset) else list(source)
        return rows, [f"{label or what} row {i}" for i in range(len(rows))], skipped
    if isinstance(source, str) and source.startswith("bundled:"):
        if source not in BUNDLED_DATA:
            raise DataError(f"{what}: unknown bundled data {source!r}; use one of "
                            f"{list(BUNDLED_DATA)}")
        from ..assets import rotten_tomatoes_pairs

        rows = rotten_tomatoes_pairs(eval_fraction=0.1, seed=0)[BUNDLED_DATA.index(source)]
        return rows, [f"{label or source} row {i}" for i in range(len(rows))], skipped
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
        return read_source(ds, what=what, split=split, bad_rows=bad_rows, label=label)
    if p.is_file():
        return _read_file(p, what, bad_rows, label or p.name)
    if suffix in DATA_SUFFIXES or os.sep in str(source):
        raise DataError(f"{what}: data file {p} does not exist")
    try:  # a datasets name (hub or local script), if one is reachable
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as e:
        raise DataError(f"{what}: {source!r} is neither a file nor a dataset that datasets can "
                        f"load ({type(e).__name__}: {first_line(e)})") from e
    return ds, [f"{label or source} row {i}" for i in range(len(ds))], skipped


def _read_file(p: Path, what: str, bad_rows: RowPolicy, label: str):
    import datasets

    suffix = p.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{what}: {p}: unknown data format {suffix!r}; use .jsonl, .json, "
                        ".csv or .parquet")
    if suffix in _TEXT_SUFFIXES:
        bad = _utf8_lines(p)
        if bad:
            line, col, byte = bad[0]
            if policy_for(bad_rows, "undecodable") == "error" or suffix != ".jsonl":
                raise DataError(f"{what}: {p}:{line}: not valid UTF-8 (byte 0x{byte:02x} "
                                f"at column {col}); save the file as UTF-8")
            return _read_jsonl_skipping(p, {b[0] for b in bad}, what, label)
        if p.stat().st_size == 0:
            return [], [], {}
    try:
        ds = datasets.load_dataset(_TEXT_SUFFIXES.get(suffix, "parquet"),
                                   data_files=str(p), split="train")
    except Exception as e:
        where = _json_error(p) if suffix in (".jsonl", ".json") else None
        if where is not None:
            raise DataError(f"{what}: {where}") from e
        raise DataError(f"{what}: cannot read {p} ({type(e).__name__}: "
                        f"{first_line(e)})") from e
    if suffix == ".jsonl":
        lines = _nonblank_lines(p)
        names = [f"{label} line {n}" for n in lines] if len(lines) == len(ds) else \
            [f"{label} row {i}" for i in range(len(ds))]
    elif suffix == ".csv":
        names = [f"{label} row {i + 1}" for i in range(len(ds))]
    else:
        names = [f"{label} item {i}" for i in range(len(ds))]
    return ds, names, {}


def _nonblank_lines(p: Path) -> List[int]:
    with open(p, "rb") as f:
        return [n for n, raw in enumerate(f, 1) if raw.strip()]


def _read_jsonl_skipping(p: Path, bad_lines: set, what: str, label: str):
    rows, names = [], []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno in bad_lines or not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except json.JSONDecodeError as e:
                raise DataError(f"{what}: {p}:{lineno}: not valid JSON ({e})") from None
            names.append(f"{label} line {lineno}")
    skipped = {"undecodable": [f"{label} line {n}" for n in sorted(bad_lines)]}
    return rows, names, skipped


def _json_error(p: Path) -> Optional[str]:
    """Where the UTF-8 JSON / JSONL file ``p`` stops being JSON objects (``"<p>:7: not valid
    JSON (...)"``, ``"<p>: item 3: expected a JSON object, got int"``), or None."""
    def not_object(obj) -> Optional[str]:
        return None if isinstance(obj, dict) else \
            f"expected a JSON object, got {type(obj).__name__}"

    if p.suffix.lower() == ".jsonl":
        with open(p, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{p}:{lineno}: not valid JSON ({e})"
                if not_object(obj):
                    return f"{p}:{lineno}: {not_object(obj)}"
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        return f"{p}: not valid JSON ({e})"
    if not isinstance(data, list):
        return f"{p}: expected a JSON list of objects, got {type(data).__name__}"
    return next((f"{p}: item {i}: {not_object(obj)}" for i, obj in enumerate(data)
                 if not_object(obj)), None)


def read_rows(path, *, limit: Optional[int] = None) -> List[dict]:
    """The rows of one data file (:data:`DATA_SUFFIXES`) as a list of dicts, at most
    ``limit``, read by :func:`read_source` (any bad line is an error).

    Raises:
        DataError (a ValueError) naming the file and the line (JSONL) or item (JSON) for an
        unknown suffix, a directory, text that is not UTF-8 or not JSON objects;
        FileNotFoundError for a missing file.
    """
    p = Path(path)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{p}: unknown data format {p.suffix.lower()!r}; use .jsonl, .json, "
                        ".csv or .parquet")
    if p.is_dir():
        raise DataError(f"{p} is a directory, not a data file")
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    rows, _, _ = read_source(p, what="data", bad_rows="error")
    if limit is not None and limit < len(rows):
        rows = rows.select(range(limit)) if hasattr(rows, "select") else rows[:limit]
    return [dict(r) for r in rows]
