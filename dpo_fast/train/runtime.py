"""The process the run lives in: device choice, peak memory, seeds, stop signals, quiet
libraries. Nothing here knows about models or data."""

from __future__ import annotations

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
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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
