"""``dpo-fast <command>``: the top-level parser (it lists the commands), the dispatch to the
command's own module, warnings as one line each, and every error through the one map
(:func:`.errors.error_message`) to a one-line message and an exit status."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Dict, List, Optional

from . import evaluate, info, precompute, train
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, error_message

#: The commands, in the order ``dpo-fast --help`` lists them. Each module has NAME, HELP,
#: ``parse(argv)`` (a namespace with ``debug``), ``run(args, err, state)`` -> exit status and
#: ``interrupted(state)`` -> what Ctrl-C left.
COMMANDS = {m.NAME: m for m in (train, evaluate, info, precompute)}


def parser() -> argparse.ArgumentParser:
    """The top-level parser: the commands and their one-line help (each command parses its
    own arguments)."""
    p = argparse.ArgumentParser(prog="dpo-fast", description="dpo_fast command line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub.add_parser(name, help=module.HELP, add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``dpo-fast``; returns the exit status (0 ok, 1 error, 2 usage,
    130 interrupted). A process that ran in a torch.distributed job (under torchrun) exits
    here instead, once its exit handlers ran and its output is flushed, skipping interpreter
    finalization (:func:`dpo_fast.train.distributed.end_process`: gloo's worker threads
    outlive the process group and abort a process that finalizes under them)."""
    code = _run(argv)
    dist_mod = sys.modules.get("dpo_fast.train.distributed")
    if dist_mod is not None and dist_mod.group_ended():
        dist_mod.end_process(code)
    return code


def _run(argv: Optional[List[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv)  # help, or a usage error (exit 2)
        return EXIT_USAGE
    command = COMMANDS[argv[0]]
    args = command.parse(argv[1:])
    err = sys.stderr

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(f"dpo-fast: warning: {message}\n")

    state: Dict[str, Any] = {}
    old_show = warnings.showwarning
    warnings.showwarning = show
    try:
        return command.run(args, err, state)
    except KeyboardInterrupt:
        if args.debug:
            raise
        bar = state.get("bar")
        if bar is not None and bar.tty and bar.drawn:
            err.write("\n")
        err.write(f"dpo-fast {command.NAME}: {command.interrupted(state)}\n")
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        msg, code = error_message(e)
        err.write(f"dpo-fast {command.NAME}: error: {msg}\n")
        return code
    finally:
        warnings.showwarning = old_show
