"""``dpo-fast info``: versions, the available backends (and why one is missing), the
machine."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any, Dict, List, Optional, TextIO

NAME = "info"
HELP = "versions, available backends (and why not), the machine"


def _version(mod: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        return None


def info_lines() -> List[str]:
    """Versions, backends (and why one is missing), the machine."""
    import torch

    import dpo_fast

    from ..kernels import logprobs_cpu

    lines = [f"dpo_fast {dpo_fast.__version__} (python {platform.python_version()}, "
             f"{platform.system()} {platform.machine()})"]
    from .. import threads
    from ..kernels import TRITON_TESTED

    for name in ("torch", "triton", "transformers", "datasets", "peft", "flash-attn",
                 "tensorboard", "matplotlib", "vaderSentiment", "jsonargparse"):
        v = _version(name)
        note = ""
        if name == "triton" and v:
            tested = ".".join(v.split(".")[:2]) in TRITON_TESTED
            note = f" ({'' if tested else 'not '}tested: CI covers {', '.join(TRITON_TESTED)})"
        lines.append(f"  {name:<16}{v or 'not installed'}{note}")
    lines.append("backends:")
    cpp = logprobs_cpu.available()
    lines.append("  C++ CPU kernel   " + ("yes (dpo_fast._C)" if cpp else
                                        f"no: {logprobs_cpu.load_error()}; the PyTorch twin "
                                        "is used (reinstall with --no-build-isolation)"))
    if torch.cuda.is_available():
        lines.append(f"  CUDA             yes: {torch.cuda.get_device_name()} (CUDA "
                     f"{torch.version.cuda})")
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "no GPU visible"
        lines.append(f"  CUDA             no: {why}")
    triton_ok = _version("triton") is not None
    lines.append("  Triton kernels   " + ("yes" if triton_ok and torch.cuda.is_available() else
                                        "no: " + ("needs a CUDA GPU (CPU tests run them under "
                                                  "TRITON_INTERPRET=1)" if triton_ok else
                                                  "triton is not installed")))
    fa = _version("flash-attn")
    cuda = torch.cuda.is_available()
    lines.append("  flash-attn       " + ("yes (packed rows' segments in one varlen call)"
                                        if fa and cuda else
                                        "no: " + ("needs CUDA" if fa else
                                                  "not installed (pip install flash-attn)")))
    from ..ops.segment_attention import choose_impl

    dev = torch.device("cuda" if cuda else "cpu")
    impl = choose_impl(dev, None, None)
    what = {"cpu-flash": "PyTorch's CPU flash kernel per segment",
            "sdpa": "PyTorch SDPA per segment", "flash-varlen": "flash-attn varlen",
            "chunked": "score tiles"}[impl]
    lines.append(f"  packed attention segments on {dev.type}: {what} (softcap / short "
                 f"windows: {choose_impl(dev, 1.0, None)}), no [L, L] mask")
    lines.append("  LoRA (peft)      " + ("yes" if _version("peft") else
                                        "no: pip install peft"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.1f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    lines.append(f"machine: {cores} cores{mem}, torch threads {torch.get_num_threads()}")
    lines.append(f"  OpenMP waits     {threads.wait_policy()}")
    return lines


def parser() -> argparse.ArgumentParser:
    """The parser of ``dpo-fast info``."""
    p = argparse.ArgumentParser(prog=f"dpo-fast {NAME}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def parse(argv: List[str]) -> argparse.Namespace:
    """The arguments (argparse exits with status 2 on a bad command line)."""
    return parser().parse_args(argv)


def run(args: argparse.Namespace, err: TextIO, state: Dict[str, Any]) -> int:
    """Prints :func:`info_lines` to stdout."""
    sys.stdout.write("\n".join(info_lines()) + "\n")
    return 0


def interrupted(state: Dict[str, Any]) -> str:
    """What Ctrl-C left: nothing to resume."""
    return "interrupted"
