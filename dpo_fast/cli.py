"""Command line: ``dpo-fast <command>`` (console entry point) or ``python -m dpo_fast``.

Commands:
    precompute   compute the reference log-probs of a preference data file into a cache
                 directory (:class:`dpo_fast.RefLogProbCache`); re-running resumes an
                 interrupted run and adds only rows the cache lacks.

Example::

    dpo-fast precompute --model ./SmolLM2-135M-Instruct --data pairs.jsonl --out ref_cache \\
        --max-length 512 --batch-tokens 16384

The data file is JSONL, JSON (a list of objects) or CSV with ``prompt`` / ``chosen`` /
``rejected`` columns (strings; in JSON/JSONL also conversational message lists), tokenized as
TRL 1.16 does (see :mod:`dpo_fast.data`). Progress goes to stderr: a bar refreshed at most
10 times a second on a terminal (a line every 10 s otherwise), then one summary line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, TextIO

from .refcache import BuildProgress

_DTYPES = ("float32", "bfloat16", "float16")


def _fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Progress display for :meth:`dpo_fast.RefLogProbCache.build`'s ``progress`` callback.

    Shows examples done / total, tokens/s (this run's computed tokens over its elapsed time)
    and the ETA (remaining tokens at that rate). On a terminal the line is redrawn in place at
    most every ``min_interval`` seconds; on a pipe or file a plain line is written at most
    every ``log_interval`` seconds. :meth:`finish` ends it with one summary line.

    Args:
        stream: where to write (default ``sys.stderr``).
        total: all examples of the run; those outside the build's plan (already cached)
            count as done. Default: the plan's rows.
        min_interval / log_interval: refresh limits in seconds (terminal / not a terminal).
        clock: time source (seconds), for tests.
    """

    def __init__(self, stream: Optional[TextIO] = None, *, total: Optional[int] = None,
                 min_interval: float = 0.1, log_interval: float = 10.0, clock=time.monotonic,
                 width: int = 28):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.interval = min_interval if self.tty else log_interval
        self.clock = clock
        self.width = width
        self.last_draw: Optional[float] = None
        self.last: Optional[BuildProgress] = None
        self.drawn = 0
        self._line_len = 0

    def format(self, p: BuildProgress) -> str:
        total = p.rows_total if self.total is None else self.total
        done = total - (p.rows_total - p.rows_done)
        frac = done / total if total else 1.0
        filled = int(round(frac * self.width))
        rate = p.tokens_computed / p.elapsed_s if p.elapsed_s > 0 else 0.0
        left = p.tokens_total - p.tokens_done
        eta = left / rate if rate > 0 else (0.0 if left == 0 else float("nan"))
        return (f"precompute [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                f"examples | {rate:,.0f} tok/s | ETA {_fmt_duration(eta)}")

    def __call__(self, p: BuildProgress) -> None:
        self.last = p
        now = self.clock()
        if p.event in ("batch", "shard") and self.last_draw is not None \
                and now - self.last_draw < self.interval:
            return
        if p.event == "done" and not self.tty:
            return  # the summary line follows
        self.last_draw = now
        line = self.format(p)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._line_len))
            self._line_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn += 1

    def finish(self, summary: str) -> None:
        """Ends the bar's line (terminal) and writes ``summary`` on its own line."""
        if self.tty and self.drawn:
            self.stream.write("\n")
        self.stream.write(summary + "\n")
        self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-fast", description="dpo_fast command line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "precompute", help="cache the reference model's log-probs of a preference data set",
        description="Compute the reference log-probs of every row of --data with the model in "
                    "--model into the cache directory --out (resumable; adds only missing "
                    "rows to an existing cache of the same fingerprint).")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model directory (AutoModelForCausalLM / AutoTokenizer)")
    p.add_argument("--gguf-file", metavar="NAME", default=None,
                   help="load the model and tokenizer from this GGUF file inside --model")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=".jsonl / .json / .csv with prompt, chosen, rejected columns")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    p.add_argument("--batch-tokens", type=int, default=16384, metavar="N",
                   help="padded tokens per forward (rows x 2 x longest sequence); default "
                        "%(default)s")
    p.add_argument("--max-length", type=int, default=None, metavar="L",
                   help="truncate prompt+response to L tokens (keep the start); rows whose "
                        "prompt alone reaches L are dropped")
    p.add_argument("--dtype", choices=_DTYPES, default="float32",
                   help="model dtype (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--per-token", action="store_true", help="also store per-token log-probs")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N rows")
    p.add_argument("--rows-per-shard", type=int, default=4096, metavar="N",
                   help="rows per shard file, the unit of resumption; default %(default)s")
    p.add_argument("--weights-hash", choices=("sample", "files"), default="sample",
                   help="how the fingerprint hashes the weights (default %(default)s; see "
                        "dpo_fast.refcache.fingerprint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache at --out that was built with another fingerprint")
    p.add_argument("--no-progress", action="store_true", help="only the summary line")
    return parser


def _precompute(args: argparse.Namespace, err: TextIO) -> int:
    import torch

    from .data import read_rows, tokenize_dataset
    from .refcache import RefLogProbCache, fingerprint

    for name in ("batch_tokens", "rows_per_shard"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")

    rows = read_rows(args.data, limit=args.limit)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **kw)
    try:  # before loading the model: a bad row fails fast
        examples, dropped = tokenize_dataset(tokenizer, rows, max_length=args.max_length)
    except ValueError as e:
        raise ValueError(f"{args.data}: {e}") from None
    unique = len({ex.key_bytes for ex in examples})
    err.write(f"dpo-fast: {len(rows)} rows from {args.data}: {unique} examples"
              + (f", {len(examples) - unique} duplicate(s)" if len(examples) > unique else "")
              + (f", {len(dropped)} dropped (prompt >= --max-length {args.max_length})"
                 if dropped else "") + "\n")

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 **kw)
    model.to(device)
    model.eval()
    nparams = sum(p.numel() for p in model.parameters())
    err.write(f"dpo-fast: loaded {type(model).__name__} ({nparams / 1e6:.1f}M params, "
              f"{args.dtype}, {device}) in {time.perf_counter() - t0:.1f} s\n")
    err.flush()

    fp = fingerprint(model, tokenizer, max_length=args.max_length, dtype=args.dtype,
                     weights=args.weights_hash)
    bar = ProgressBar(err, total=unique) if not args.no_progress else None
    cache = RefLogProbCache.ensure(model, examples, args.out, fingerprint=fp,
                                   batch_tokens=args.batch_tokens, per_token=args.per_token,
                                   rows_per_shard=args.rows_per_shard, progress=bar,
                                   overwrite=args.overwrite)
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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``dpo-fast``; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    err = sys.stderr
    from .refcache import RefCacheError

    try:
        if args.command == "precompute":
            return _precompute(args, err)
    except (ValueError, FileNotFoundError, RefCacheError) as e:
        err.write(f"dpo-fast {args.command}: error: {e}\n")
        return 1
    return 2
