"""Command line: ``dpo-fast <command>`` (console entry point) or ``python -m dpo_fast``.

Commands:
    precompute   compute the reference log-probs of a preference data file into a cache
                 directory (:class:`dpo_fast.RefLogProbCache`); re-running resumes an
                 interrupted run and adds only rows the cache lacks.

Example::

    dpo-fast precompute --model ./SmolLM2-135M-Instruct --data pairs.jsonl --out ref_cache \\
        --max-length 512 --batch-tokens 16384

``--model`` is a Hugging Face model folder (``config.json`` + weights + tokenizer), a
``.gguf`` file (or a folder holding exactly one), or a hub id already in the local Hugging Face
cache (or downloadable, when the hub is reachable). The data file is JSONL, JSON (a list of
objects) or CSV (UTF-8) with ``prompt`` / ``chosen`` / ``rejected`` columns (strings; in
JSON/JSONL also conversational message lists), tokenized as TRL 1.16 does (see
:mod:`dpo_fast.data`). Progress goes to stderr: a bar refreshed at most 10 times a second on a
terminal (a line every 10 s otherwise), then one summary line.

Failures print one message naming the argument, file or row and exit non-zero (1: the run
failed; 2: bad command line; 130: interrupted), with no traceback unless ``--debug``. Checks
that need no model (paths, data, the cache directory, its lock) run before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple

from . import _openmp
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
    """A tqdm bar for :meth:`dpo_fast.RefLogProbCache.build`'s ``progress`` callback.

    Shows examples done / total, tokens/s (this run's computed tokens over its elapsed time)
    and the ETA (remaining tokens at that rate). Redrawn at most every ``min_interval``
    seconds on a terminal, every ``log_interval`` seconds otherwise; :meth:`finish` closes it
    and writes one summary line.

    Args:
        stream: where to write (default ``sys.stderr``).
        total: all examples of the run; those outside the build's plan (already cached)
            count as done. Default: the plan's rows.
        min_interval / log_interval: refresh limits in seconds (terminal / not a terminal).
    """

    def __init__(self, stream: Optional[TextIO] = None, *, total: Optional[int] = None,
                 min_interval: float = 0.1, log_interval: float = 10.0, width: int = 28):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.interval = min_interval if self.tty else log_interval
        self.width = width
        self.bar = None
        self.last: Optional[BuildProgress] = None

    @property
    def drawn(self) -> bool:
        """Whether the bar is on the stream (its line then needs ending before more text)."""
        return self.bar is not None

    def status(self, p: BuildProgress) -> str:
        """``"<rate> tok/s | ETA <mm:ss>"`` of progress ``p``."""
        rate = p.tokens_computed / p.elapsed_s if p.elapsed_s > 0 else 0.0
        left = p.tokens_total - p.tokens_done
        eta = left / rate if rate > 0 else (0.0 if left == 0 else float("nan"))
        return f"{rate:,.0f} tok/s | ETA {_fmt_duration(eta)}"

    def __call__(self, p: BuildProgress) -> None:
        from tqdm.auto import tqdm

        self.last = p
        total = p.rows_total if self.total is None else self.total
        if self.bar is None:
            # The status rides in tqdm's description field (a postfix would get a ", ").
            self.bar = tqdm(total=total, file=self.stream, desc=self.status(p), ascii=".#",
                            mininterval=self.interval, miniters=1, ncols=1000, leave=True,
                            bar_format="precompute [{bar:%d}] {n}/{total} examples | {desc}"
                            % self.width)
        done = total - (p.rows_total - p.rows_done)
        self.bar.set_description_str(self.status(p), refresh=False)
        self.bar.update(done - self.bar.n)
        if p.event == "done":
            self.bar.refresh()

    def finish(self, summary: str) -> None:
        """Closes the bar and writes ``summary`` on its own line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stream.write(summary + "\n")
        self.stream.flush()


class CliError(Exception):
    """A problem the command reports in one line and exits with ``code`` (2: usage)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(prog="dpo-fast", description="dpo_fast command line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", add_help=False,
                       help="train a model with DPO (no arguments: the demo run; "
                            "`dpo-fast train --help` lists every setting)")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    commands.add_eval_parser(sub)
    i = sub.add_parser("info", help="versions, available backends (and why not), the machine")
    i.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p = sub.add_parser(
        "precompute", help="cache the reference model's log-probs of a preference data set",
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
                   help=".jsonl / .json / .csv (UTF-8) with prompt, chosen, rejected columns")
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
    return parser


# ----------------------------------------------------------------------------- checks


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_tokens", "rows_per_shard"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                           code=2)
    if args.limit is not None and args.limit < 0:
        raise CliError(f"--limit must be >= 0, got {args.limit}", code=2)
    if args.max_length is not None and args.max_length < 2:
        raise CliError(f"--max-length must be >= 2, got {args.max_length}", code=2)
    if not args.checkpoint_seconds >= 0:
        raise CliError(f"--checkpoint-seconds must be >= 0, got {args.checkpoint_seconds}",
                       code=2)
    if not (args.model and args.data) and not (args.compact and not args.model
                                               and not args.data):
        missing = [f for f, v in (("--model", args.model), ("--data", args.data)) if not v]
        raise CliError(f"the following arguments are required: {', '.join(missing)} (only "
                       "--compact runs without them)", code=2)


def _check_out(out: Path) -> Optional[str]:
    """Checks ``--out`` before any model is loaded; returns None if it can be written, else
    why not (then it must already hold a cache, which is then only read)."""
    from .refcache import RefCacheError
    from .refcache.build import check_target
    from .refcache.store import MANIFEST

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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co",
                                       url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_model(model: str, gguf_file: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """``(name_or_path, from_pretrained kwargs)`` for ``--model`` / ``--gguf-file``, or a
    CliError saying what is wrong (checked without loading anything, and without waiting on
    a network that is not there)."""
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CliError(f"--model {model}: a file that is not a .gguf model; give a model "
                           "folder (with config.json) or a .gguf file")
        if gguf_file:
            raise CliError("--gguf-file names a file inside a --model folder; --model is "
                           "already a .gguf file")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if gguf_file:
            if not (p / gguf_file).is_file():
                raise CliError(f"--gguf-file {gguf_file}: no such file in {model}")
            return str(p), {"gguf_file": gguf_file}
        if (p / "config.json").is_file():
            return str(p), {}
        ggufs = sorted(f.name for f in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), {"gguf_file": ggufs[0]}
        if ggufs:
            raise CliError(f"--model {model} holds several .gguf files ({', '.join(ggufs)}): "
                           "pick one with --gguf-file")
        raise CliError(f"--model {model}: no config.json (not a Hugging Face model folder) and "
                       "no .gguf file in it")
    looks_local = (model.startswith((".", "/", "~")) or model.count("/") > 1
                   or (os.sep != "/" and os.sep in model) or not _HUB_ID.match(model))
    if looks_local:
        raise CliError(f"--model {model}: no such file or directory")
    if gguf_file:
        raise CliError(f"--model {model}: not found locally (--gguf-file needs a local folder)")
    from huggingface_hub import constants, try_to_load_from_cache

    offline = str(os.environ.get("HF_HUB_OFFLINE", "")).upper() in ("1", "ON", "YES", "TRUE")
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        # in the local cache: load from there without asking an unreachable hub
        return model, ({"local_files_only": True} if offline or not _hub_reachable() else {})
    if offline or not _hub_reachable():
        why = ("HF_HUB_OFFLINE is set" if offline
               else "the Hugging Face hub cannot be reached from this machine")
        raise CliError(f"--model {model}: not found locally (no such folder or file, and not in "
                       f"the Hugging Face cache at {constants.HF_HUB_CACHE}) and {why}; give a "
                       "local model folder or .gguf file")
    return model, {}


# ----------------------------------------------------------------------------- precompute


def _precompute(args: argparse.Namespace, err: TextIO, state: Dict[str, Any]) -> int:
    _check_args(args)
    out = Path(args.out)
    read_only = _check_out(out)

    from .refcache import RefLogProbCache, fingerprint, hold_lock
    from .refcache.store import is_read_only_error

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

    from .data import read_rows, tokenize_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    try:
        rows = read_rows(args.data, limit=args.limit)
    except FileNotFoundError:
        raise CliError(f"--data {args.data}: no such file") from None
    if not rows and not args.allow_empty:
        raise CliError(f"{args.data}: no rows (the file is empty); --allow-empty accepts that")
    name_or_path, kw = _resolve_model(args.model, args.gguf_file)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
    except Exception as e:
        raise CliError(f"--model {args.model}: cannot load its tokenizer ({type(e).__name__}: "
                       f"{_first_line(e)})") from e
    names = [f"{args.data} {loc}" for loc in rows.locations]
    with warnings.catch_warnings():  # skipped identical rows are listed below with the rest
        warnings.filterwarnings("ignore", r".*chosen == rejected", UserWarning)
        try:  # before loading the model: a bad row fails fast
            examples, dropped = tokenize_dataset(tokenizer, rows, max_length=args.max_length,
                                                 identical=args.identical, row_names=names)
        except ValueError as e:
            raise CliError(str(e)) from None
    unique = len({ex.key_bytes for ex in examples})
    err.write(f"dpo-fast: {len(rows)} rows from {args.data}: {unique} examples"
              + (f", {len(examples) - unique} duplicate(s)" if len(examples) > unique else "")
              + (f", {len(dropped)} dropped" if dropped else "") + "\n")
    if dropped:
        text = dropped.describe().replace("max_length", f"--max-length {args.max_length}")
        for line in text.splitlines():
            err.write(f"dpo-fast: warning: {line}\n")
    if not examples and not args.allow_empty:
        raise CliError(f"{args.data}: none of its {len(rows)} rows is usable (see above); "
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
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path,
                                                         dtype=getattr(torch, args.dtype), **kw)
        except Exception as e:
            raise CliError(f"--model {args.model}: cannot load the model ({type(e).__name__}: "
                           f"{_first_line(e)})") from e
        model.to(device)
        model.eval()
        nparams = sum(p.numel() for p in model.parameters())
        err.write(f"dpo-fast: loaded {type(model).__name__} ({nparams / 1e6:.1f}M params, "
                  f"{args.dtype}, {device}) in {time.perf_counter() - t0:.1f} s\n")
        err.flush()

        fp = fingerprint(model, tokenizer, max_length=args.max_length, dtype=args.dtype,
                         weights=args.weights_hash)
        bar = ProgressBar(err, total=unique) if not args.no_progress else None
        state.update(out=out, total=unique, bar=bar)

        # Fewer threads while other processes use the cores (dpo_fast/_openmp.py).
        threads = _openmp.ThreadGovernor(enabled=torch.device(device).type == "cpu")

        def progress(p: BuildProgress) -> None:
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def _interrupted(state: Dict[str, Any]) -> str:
    last: Optional[BuildProgress] = state.get("last")
    if last is None:
        return "interrupted before any row was computed; run the same command again to start"
    kept = state["total"] - (last.rows_total - last.rows_saved)
    return (f"interrupted: {kept} of {state['total']} examples are saved in {state['out']}; "
            "run the same command again to resume from there")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``dpo-fast``; returns the exit status (0 ok, 1 error, 2 usage,
    130 interrupted)."""
    from . import commands

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # train has its own parser (every TrainConfig field, YAML, key=value overrides)
        args = argparse.Namespace(command="train", debug="--debug" in argv, rest=argv[1:])
    else:
        args = _parser().parse_args(argv)
    err = sys.stderr
    from .assets import AssetMissingError
    from .refcache import RefCacheError
    from .train import CheckpointError, TrainingError

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(f"dpo-fast: warning: {message}\n")

    state: Dict[str, Any] = {}
    old_show = warnings.showwarning
    warnings.showwarning = show
    try:
        if args.command == "precompute":
            return _precompute(args, err, state)
        if args.command == "train":
            return commands.train_command(args.rest, err)
        if args.command == "eval":
            return commands.eval_command(args, err)
        if args.command == "info":
            return commands.info_command(err)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        if state.get("bar") is not None and state["bar"].tty and state["bar"].drawn:
            err.write("\n")
        what = _interrupted(state) if args.command == "precompute" else (
            "interrupted; for train, `resume_from_checkpoint=true` continues from the last "
            "checkpoint")
        err.write(f"dpo-fast {args.command}: {what}\n")
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, CliError):
            msg, code = str(e), e.code
        elif isinstance(e, commands.UsageError):
            msg, code = str(e), 2
        elif isinstance(e, RefCacheError):
            msg = e.message + (f"\n{e.cli_hint}" if e.cli_hint else "")
            code = 1
        elif isinstance(e, (ValueError, FileNotFoundError, OSError, ImportError,
                            AssetMissingError, TrainingError, CheckpointError)):
            msg, code = str(e), 1
        else:
            msg = f"unexpected {type(e).__name__}: {e} (--debug shows the traceback)"
            code = 1
        err.write(f"dpo-fast {args.command}: error: {msg}\n")
        return code
    finally:
        warnings.showwarning = old_show
