"""The run's train and held-out splits from a :class:`TrainConfig`: ``train_data`` read and
checked, ``eval_data`` (or ``eval_fraction`` of the train rows, by ``eval_group_column``),
``max_eval_samples`` spread evenly, both tokenized through the on-disk cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..assets import default_cache_dir
from ..refcache import tokenizer_hash
from .config import TrainConfig
from ..data import DataError, PreparedData, prepare, read_source, split_eval


def _eval_split_name(source) -> str:
    """The held-out split of a ``datasets.DatasetDict`` (test, validation or eval)."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return next((s for s in ("test", "validation", "eval") if s in source), "test")
    return "test"


def load_splits(cfg: TrainConfig, tokenizer, *, stage: Callable[[str], None],
                progress: Callable[[int, int], None]
                ) -> Tuple[PreparedData, Optional[PreparedData]]:
    """``(train, eval or None)``; skipped rows are warned about (and staged), and a split
    left with no usable row is a DataError naming it."""
    cols = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    cache = None if cfg.data_cache_dir == "" else Path(
        cfg.data_cache_dir or default_cache_dir() / "tokenized")
    stage("reading the data")
    rows, names, pre = read_source(cfg.train_data, what="train_data", bad_rows=cfg.bad_rows)
    ev_rows = ev_names = None
    ev_pre: Dict[str, List[str]] = {}
    if cfg.eval_data is not None:
        ev_rows, ev_names, ev_pre = read_source(cfg.eval_data, what="eval_data",
                                                split=_eval_split_name(cfg.eval_data),
                                                bad_rows=cfg.bad_rows)
    elif cfg.eval_fraction:
        rows, names, ev_rows, ev_names = split_eval(rows, names, cfg.eval_fraction, cfg.seed,
                                                    cfg.eval_group_column)
    stage(f"tokenizing {len(rows) + (len(ev_rows) if ev_rows is not None else 0)} rows")
    kw = dict(columns=cols, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
              bad_rows=cfg.bad_rows, cache_dir=cache, tok_hash=tokenizer_hash(tokenizer),
              progress=progress)
    train = prepare(rows, names, tokenizer, pre_skipped=pre, **kw)
    if ev_rows is not None and cfg.max_eval_samples is not None and \
            cfg.max_eval_samples < len(ev_rows):
        # evenly spread over the split (held-out splits are often grouped, e.g. by movie)
        n, k = len(ev_rows), cfg.max_eval_samples
        keep = [i * n // k for i in range(k)]
        ev_rows = ev_rows.select(keep) if hasattr(ev_rows, "select") else \
            [ev_rows[i] for i in keep]
        ev_names = ev_names[:len(keep)]
    held_out = prepare(ev_rows, ev_names, tokenizer, pre_skipped=ev_pre, **kw) \
        if ev_rows is not None else None
    for what, d in (("train", train), ("eval", held_out)):
        if d is not None and d.skipped:
            msg = f"{what} data: {sum(d.skipped.values())} of {d.total_rows} rows " \
                  f"skipped:\n{d.describe_skipped()}"
            warnings.warn(msg, UserWarning, stacklevel=3)
            stage(msg)
    if not train.examples:
        raise DataError(f"train_data: no usable rows ({train.total_rows} read)"
                        + (f":\n{train.describe_skipped()}" if train.skipped else ""))
    if held_out is not None and not held_out.examples:
        raise DataError(f"eval_data: no usable rows ({held_out.total_rows} read)")
    return train, held_out
