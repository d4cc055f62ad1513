"""``dpo-fast precompute``: the reference model's log-probs of a preference data set into a
cache directory (:class:`dpo_fast.RefLogProbCache`); re-running resumes an interrupted run and
adds only rows the cache lacks.

Checks that need no model (arguments, the data and every row, ``--out``, the cache's lock) run
before the model loads. The data is read and checked as the trainer does
(:func:`dpo_fast.data.read_source`, :func:`dpo_fast.data.prepare`): a bad row stops the run
naming it, except rows whose prompt alone reaches ``--max-length`` (dropped, as TRL does) and
identical pairs (``--identical``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

from .. import threads as cpu_threads
from ..progress import ProgressBar
from .errors import EXIT_USAGE, CliError

NAME = "precompute"
HELP = "cache the reference model's log-probs of a preference data set"
DTYPES = ("float32", "bfloat16", "float16")


def parser() -> argparse.ArgumentParser:
    """The parser of ``dpo-fast precompute``."""
    p = argparse.ArgumentParser(
        prog=f"dpo-fast {NAME}",
        description="Compute the reference log-probs of every row of --data with the model in "
                    "--model into the cache directory --out (resumable; adds only missing "
                    "rows to an existing cache of the same fingerprint). One writer at a time: "
                    "a second run on the same --out waits for the first.")
    p.add_argument("--model", metavar="PATH",
                   help="model folder (config.json + weights + tokenizer), a .gguf file, or a "
                        "Hugging Face hub id in the local cache")
    p.add_argument("--gguf-file", metavar="NAME", default=None,
                   help="load the model and tokenizer from this GGUF file inside --model")
    p.add_argument("--data", metavar="FILE",
                   help=".jsonl / .json / .csv (UTF-8) or .parquet with prompt, chosen, "
                        "rejected columns (or chosen / rejected sharing the prompt), a saved "
                        "datasets folder or a datasets name")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    p.add_argument("--batch-tokens", type=int, default=16384, metavar="N",
                   help="padded tokens per forward (rows x 2 x longest sequence); default "
                        "%(default)s")
    p.add_argument("--max-length", type=int, default=None, metavar="L",
                   help="truncate prompt+response to L tokens (keep the start); rows whose "
                        "prompt alone reaches L are dropped")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="model dtype (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--per-token", action="store_true", help="also store per-token log-probs")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N rows")
    p.add_argument("--rows-per-shard", type=int, default=4096, metavar="N",
                   help="rows per shard file; default %(default)s")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0, metavar="S",
                   help="save the rows computed so far at least every S seconds of compute, "
                        "so an interruption loses at most that much work; default %(default)s")
    p.add_argument("--weights-hash", choices=("sample", "files"), default="sample",
                   help="how the fingerprint hashes the weights (default %(default)s; see "
                        "dpo_fast.refcache.fingerprint)")
    p.add_argument("--identical", choices=("skip", "error", "keep"), default="skip",
                   help="rows whose chosen and rejected responses tokenize the same (no "
                        "preference to learn): skip them with a warning (default), fail, or "
                        "keep them")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept data with no usable rows (default: an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache at --out that was built with another fingerprint")
    p.add_argument("--repair", action="store_true",
                   help="drop shards of --out that fail their checksum and recompute their rows")
    p.add_argument("--compact", action="store_true",
                   help="rewrite the cache as few whole shards (after computing; without "
                        "--model / --data: only compact --out)")
    p.add_argument("--no-wait", action="store_true",
                   help="fail at once (naming the holder) if another process is writing --out, "
                        "instead of waiting for it")
    p.add_argument("--no-progress", action="store_true", help="only the summary line")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def parse(argv: List[str]) -> argparse.Namespace:
    """The arguments (argparse exits with status 2 on a bad command line)."""
    return parser().parse_args(argv)


# ----------------------------------------------------------------------------- checks


def check_args(args: argparse.Namespace) -> None:
    """CliError (status 2) for values argparse's types do not catch."""
    for name in ("batch_tokens", "rows_per_shard"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                           code=EXIT_USAGE)
    if args.limit is not None and args.limit < 0:
        raise CliError(f"--limit must be >= 0, got {args.limit}", code=EXIT_USAGE)
    if args.max_length is not None and args.max_length < 2:
        raise CliError(f"--max-length must be >= 2, got {args.max_length}", code=EXIT_USAGE)
    if not args.checkpoint_seconds >= 0:
        raise CliError(f"--checkpoint-seconds must be >= 0, got {args.checkpoint_seconds}",
                       code=EXIT_USAGE)
    if not (args.model and args.data) and not (args.compact and not args.model
                                               and not args.data):
        missing = [f for f, v in (("--model", args.model), ("--data", args.data)) if not v]
        raise CliError(f"the following arguments are required: {', '.join(missing)} (only "
                       "--compact runs without them)", code=EXIT_USAGE)


def check_out(out: Path) -> Optional[str]:
    """Checks ``--out`` before any model is loaded; returns None if it can be written, else
    why not (then it must already hold a cache, which is then only read)."""
    from ..refcache import MANIFEST, RefCacheError
    from ..refcache.build import check_target

    try:
        check_target(out)
    except RefCacheError as e:
        raise CliError(f"--out {e.message}; give a directory path (it is created if "
                       "missing)") from None
    if out.is_dir():
        if os.access(out, os.W_OK | os.X_OK):
            return None
        why = f"{out} cannot be written (read-only file system or no permission)"
        if not (out / MANIFEST).is_file():
            raise CliError(f"--out {why}, and it holds no reference cache; give a writable "
                           "directory")
        return why
    parent = next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: cannot create it, {parent} cannot be written (read-only "
                       "file system or no permission)")
    return None


def row_policy(args: argparse.Namespace) -> Dict[str, str]:
    """The bad-row policy (:func:`dpo_fast.data.prepare`): every bad row stops the run, but
    rows whose prompt alone reaches --max-length are dropped and identical pairs follow
    --identical."""
    return {"prompt_too_long": "skip", "identical": args.identical}


def read_data(args: argparse.Namespace):
    """``(rows, names)`` of ``--data`` (its first ``--limit`` rows), named by the path as
    given (``"pairs.jsonl line 7"``)."""
    import datasets

    from ..data import DATA_SUFFIXES, read_source

    if Path(args.data).suffix.lower() in DATA_SUFFIXES and not Path(args.data).exists():
        raise CliError(f"--data {args.data}: no such file")
    datasets.disable_progress_bars()  # precompute draws its own progress
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)  # errors come as one line
    rows, names, _ = read_source(args.data, what="--data", bad_rows=row_policy(args),
                                 label=args.data)
    if args.limit is not None and args.limit < len(rows):
        rows = rows.select(range(args.limit)) if hasattr(rows, "select") else rows[:args.limit]
        names = names[:args.limit]
    return rows, names


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, err: TextIO, state: Dict[str, Any]) -> int:
    """Runs ``dpo-fast precompute``; ``state`` keeps what an interruption reports."""
    check_args(args)
    out = Path(args.out)
    read_only = check_out(out)

    from ..refcache import RefLogProbCache, fingerprint, hold_lock
    from ..refcache.store import is_read_only_error

    def waiting(msg: str) -> None:
        err.write(f"dpo-fast: {msg}; waiting for it to finish (--no-wait exits instead)\n")
        err.flush()

    lock_timeout = 0 if args.no_wait else None
    if not args.model:  # --compact alone
        t0 = time.perf_counter()
        cache = RefLogProbCache.compact(out, rows_per_shard=args.rows_per_shard,
                                        lock_timeout=lock_timeout, on_lock_wait=waiting)
        err.write(f"dpo-fast precompute: compacted {out}: {len(cache)} rows in "
                  f"{len(cache.manifest['shards'])} shard(s) ({time.perf_counter() - t0:.1f} s)\n")
        return 0

    import torch

    from ..data import prepare
    from ..models import load_model, load_tokenizer, locate_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    rows, names = read_data(args)
    if not len(rows) and not args.allow_empty:
        raise CliError(f"{args.data}: no rows (the file is empty); --allow-empty accepts that")
    name_or_path, kw = locate_model(args.model, args.gguf_file)
    tokenizer = load_tokenizer(name_or_path, what="--model", **kw)
    # before loading the model: a bad row fails fast
    data = prepare(rows, names, tokenizer, max_length=args.max_length,
                   bad_rows=row_policy(args), hint="")
    examples = data.examples
    unique = len({ex.key_bytes for ex in examples})
    dropped = sum(data.skipped.values())
    err.write(f"dpo-fast: {data.total_rows} rows from {args.data}: {unique} examples"
              + (f", {len(examples) - unique} duplicate(s)" if len(examples) > unique else "")
              + (f", {dropped} dropped" if dropped else "") + "\n")
    if dropped:
        text = data.describe_skipped(verb="dropped").replace(
            "max_length", f"--max-length {args.max_length}")
        for line in text.splitlines():
            err.write(f"dpo-fast: warning: {line}\n")
    if not examples and not args.allow_empty:
        raise CliError(f"{args.data}: none of its {data.total_rows} rows is usable (see above); "
                       "--allow-empty accepts that")
    err.flush()

    with contextlib.ExitStack() as stack:
        if read_only is None:  # take the lock before the model loads: a refusal is instant
            try:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(hold_lock(out, lock_timeout, waiting))
            except OSError as e:
                if not is_read_only_error(e):
                    raise
        t0 = time.perf_counter()
        model = load_model(name_or_path, dtype=getattr(torch, args.dtype), device=device,
                           what="--model", attn_implementation=None, **kw)
        model.eval()
        nparams = sum(p.numel() for p in model.parameters())
        err.write(f"dpo-fast: loaded {type(model).__name__} ({nparams / 1e6:.1f}M params, "
                  f"{args.dtype}, {device}) in {time.perf_counter() - t0:.1f} s\n")
        err.flush()

        fp = fingerprint(model, tokenizer, max_length=args.max_length, dtype=args.dtype,
                         weights=args.weights_hash)
        bar = ProgressBar(err, total=unique) if not args.no_progress else None
        state.update(out=out, total=unique, bar=bar)

        # Fewer threads while other processes use the cores (dpo_fast/threads.py).
        threads = cpu_threads.ThreadGovernor(enabled=torch.device(device).type == "cpu")

        def progress(p) -> None:
            state["last"] = p
            threads.poll()
            if bar is not None:
                bar(p)

        try:
            cache = RefLogProbCache.ensure(
                model, examples, out, fingerprint=fp, batch_tokens=args.batch_tokens,
                per_token=args.per_token, rows_per_shard=args.rows_per_shard,
                progress=progress, overwrite=args.overwrite,
                checkpoint_seconds=args.checkpoint_seconds, lock_timeout=lock_timeout,
                on_lock_wait=waiting, compact=True if args.compact else "auto",
                repair=args.repair, allow_empty=args.allow_empty)
        finally:
            threads.close()
    p = cache.last_build
    rate = p.tokens_computed / p.elapsed_s if p.elapsed_s > 0 else 0.0
    summary = (f"dpo-fast precompute: {unique} examples ({p.rows_computed} computed, "
               f"{unique - p.rows_computed} already cached) in {p.elapsed_s:.1f} s, "
               f"{rate:,.0f} tok/s -> {args.out} ({len(cache)} rows, "
               f"{len(cache.manifest['shards'])} shards)")
    if bar is not None:
        bar.finish(summary)
    else:
        err.write(summary + "\n")
    return 0


def interrupted(state: Dict[str, Any]) -> str:
    """What Ctrl-C kept: the examples saved in the cache, and how to resume."""
    last = state.get("last")
    if last is None:
        return "interrupted before any row was computed; run the same command again to start"
    kept = state["total"] - (last.rows_total - last.rows_saved)
    return (f"interrupted: {kept} of {state['total']} examples are saved in {state['out']}; "
            "run the same command again to resume from there")
