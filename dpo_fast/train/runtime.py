"""The process the run lives in: device choice, peak memory, seeds, stop signals, quiet
libraries. Nothing here knows about models or data."""

from __future__ import annotations

import os
import random
import signal
import threading
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other name as given (a CUDA name
    without CUDA is a ValueError naming ``TrainConfig.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r} but CUDA is not available")
    return dev


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA allocated bytes on a GPU,
    else the process's peak RSS (``VmHWM``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return host_peak_mb()


def host_peak_mb() -> float:
    """The process's peak RSS in MiB since start or the last reset (``VmHWM``; elsewhere
    than Linux ``ru_maxrss``, never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak: CUDA's counters, or ``VmHWM`` reset to the current RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    reset_host_peak()


def reset_host_peak() -> None:
    """``VmHWM`` reset to the current RSS (Linux ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def return_freed_memory() -> bool:
    """glibc: serve allocations of 128 KiB and more by ``mmap`` (so each goes back to the
    system when freed) instead of the heap, which keeps what it once held. FSDP2 on the CPU
    gathers and frees every layer's parameters and gradients each step; with the default
    (adaptive) threshold those buffers land on the heap and a process's RSS keeps the sum of
    everything ever gathered (measured on SmolLM2-135M, 2 processes: train-phase peak 3,170
    MiB by default, 2,034 MiB with this). True if set (Linux glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "sched_getaffinity"):
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class PhaseMemory:
    """Peak memory of each phase of a run: :meth:`end` records the peak since the previous
    phase ended (host RSS; CUDA allocated on a GPU) and starts a new one. The first phase
    includes everything since the process started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: Dict[str, float] = {}
        self.cuda: Dict[str, float] = {}

    def end(self, phase: str) -> None:
        self.host[phase] = max(self.host.get(phase, 0.0), host_peak_mb())
        reset_host_peak()
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.cuda[phase] = max(self.cuda.get(phase, 0.0), peak)
            torch.cuda.reset_peak_memory_stats(self.device)


def seed_everything(seed: int) -> None:
    """The torch, numpy and Python RNGs from one seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def quiet_libraries() -> None:
    """No progress bars or info logs from transformers / datasets in this process."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)


class SignalStop:
    """SIGINT / SIGTERM set :attr:`signum`, which the loop checks after each step (a second
    signal raises KeyboardInterrupt at once). Handlers are installed on the main thread only
    and restored on exit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._prev: Dict[int, Any] = {}

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._prev.items():
            signal.signal(s, h)
        return False
