"""CPU threads that give the cores back when other processes need them.

torch's CPU ops, MKL and dpo_fast's C++ kernel share one OpenMP (libgomp) thread pool, whose
idle threads spin for ``GOMP_SPINCOUNT`` = 300,000 iterations (milliseconds) at the end
of every parallel region before they sleep. A training step on the CPU runs thousands of short
parallel regions. Alone, the spin is what makes them fast: a thread that spins picks up the
next region at once. Next to another process on the same cores, the spinning threads take the
cores away from the thread that still has work, and each region then ends a scheduler time
slice late. Measured on 2 cores (SmolLM2-135M, 4 pairs, max_length 128, 2 threads), the
median step went from 1.41 s alone to 21.5 s next to a 2-thread torch matmul loop, with
torch's elementwise ops 10-14x slower and its GEMMs 2.8x (``benchmarks/bench_contention.py``).

A shorter spin cannot have both. Idle threads that block at once (``OMP_WAIT_POLICY=PASSIVE``)
or after a short spin give the cores back, but waking a blocked thread costs more than finding
a spinning one: alone, steps were about 1.2x slower passive and 1.02-1.11x with a 3,000-spin.
libgomp also reads these settings once, when it loads, so they cannot follow the machine.

The thread count can. :class:`ThreadGovernor` keeps OpenMP's defaults and watches how much of
this process's cores other processes use (``/proc/stat`` of the CPUs in this process's
affinity, minus this process's own time from ``/proc/self/stat``), at most every
:data:`WINDOW_S` seconds, from the trainer's micro-batch loop and reference pass. When they
need more than the cores this process leaves free, it lowers torch's intra-op threads to what
is left (one thread on 2 cores: a one-thread team has no barrier to spin at); when they are
gone again for :data:`QUIET_WINDOWS` windows in a row, it raises them back. Alone, nothing
changes, so the idle speed is OpenMP's. While the threads are lowered, the C++ head kernel's
vocabulary split stays the one it had (``logprobs_cpu.pin_vocab_groups``), so its results do
not change; torch's own backward kernels reduce in a thread-count-dependent order, so
gradients can differ in the last bits from a run that kept its threads
(``adaptive_threads=false`` keeps them fixed, for bit-for-bit reproducible runs on a shared
machine). Linux only (``/proc``); elsewhere the thread count stays fixed.
"""

from __future__ import annotations

import math
import os
import time
from typing import List, Optional, Tuple

WINDOW_S = 0.5
"""Shortest window over which other processes' CPU use is measured (seconds)."""
BUSY_MARGIN = 0.25
"""Threads drop to ``floor(free + BUSY_MARGIN)``, with free = this process's cores minus what
other processes used (in cores): on 2 cores, to one thread once others use more than 0.25."""
QUIET_MARGIN = 0.15
"""Threads rise to ``floor(free + QUIET_MARGIN)`` (at most the starting count) after
:data:`QUIET_WINDOWS` windows in a row ask for more; the gap to :data:`BUSY_MARGIN` keeps a
neighbour on the threshold from flipping the count every window."""
QUIET_WINDOWS = 2

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def wait_policy() -> str:
    """One line on how this process's OpenMP threads wait between parallel regions."""
    user = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    if user:
        return ", ".join(f"{k}={v}" for k, v in user.items()) + " (from the environment)"
    return ("OpenMP's default spin; on the CPU the trainer lowers its threads while other "
            "processes use these cores (adaptive_threads)")


def affinity_cpus() -> List[int]:
    """The CPUs this process may run on (its affinity mask), sorted."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: List[int]) -> Optional[int]:
    """Non-idle ticks (user, nice, system, irq, softirq) of ``cpus`` since boot, from
    ``/proc/stat``; None without it. Steal and guest time are not counted (guest time is
    already in user)."""
    want = {f"cpu{c}" for c in cpus}
    total, seen = 0, 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                parts = line.split()
                if parts[0] in want:
                    v = [int(x) for x in parts[1:8]]
                    total += v[0] + v[1] + v[2] + v[5] + v[6]
                    seen += 1
    except (OSError, ValueError, IndexError):
        return None
    return total if seen == len(want) else None


def _self_ticks() -> Optional[int]:
    """This process's user + system ticks (all its threads), from ``/proc/self/stat``."""
    try:
        with open("/proc/self/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def sample_ticks(cpus: List[int]) -> Optional[Tuple[float, int, int]]:
    """(monotonic time, busy ticks of ``cpus``, this process's ticks); None without /proc."""
    busy, own = _busy_ticks(cpus), _self_ticks()
    if busy is None or own is None:
        return None
    return time.monotonic(), busy, own


def other_cores(a: Tuple[float, int, int], b: Tuple[float, int, int]) -> float:
    """Other processes' CPU use between samples ``a`` and ``b`` of :func:`sample_ticks`, in
    cores: the CPUs' busy time minus this process's own, over the elapsed time."""
    dt = b[0] - a[0]
    if dt <= 0:
        return 0.0
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / _HZ / dt)


class ThreadGovernor:
    """Lowers torch's intra-op threads while other processes use this process's cores and
    raises them back when they stop (see the module docstring).

    Create it in the thread that runs the training (torch's thread count is per thread), call
    :meth:`poll` between pieces of work (cheap: it samples at most every ``window_s``), and
    :meth:`close` at the end, which restores the starting count.

    Attributes:
        full: torch's thread count when the governor started (the most it raises to).
        threads: the count now.
        enabled: False when there is nothing to govern (one thread, no ``/proc``), it was
            created with ``enabled=False``, or it was closed.
        governed: :attr:`enabled` as it started.
        others: other processes' CPU use in the last window, in cores.
        switches: how many times the count changed.
        low_seconds: seconds spent below :attr:`full` so far.
    """

    def __init__(self, enabled: bool = True, window_s: float = WINDOW_S):
        import torch

        self.full = torch.get_num_threads()
        self.threads = self.full
        self.cpus = affinity_cpus()
        self.window_s = float(window_s)
        self.others = 0.0
        self.switches = 0
        self.low_seconds = 0.0
        self._quiet = 0
        self._low_since: Optional[float] = None
        self._last = sample_ticks(self.cpus) if enabled and self.full > 1 else None
        self.enabled = self._last is not None
        self.governed = self.enabled
        self._pinned_before = 0
        if self.enabled:
            from .kernels import logprobs_cpu

            self._pinned_before = logprobs_cpu.pin_vocab_groups(self.full)

    def poll(self) -> Optional[Tuple[int, int]]:
        """Measures other processes' CPU use if a window has passed and sets the thread count
        from it; returns (old, new) when the count changed, else None."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if now - self._last[0] < self.window_s:
            return None
        s = sample_ticks(self.cpus)
        if s is None:
            return None
        self.others = other_cores(self._last, s)
        self._last = s
        return self.decide(self.others)

    def decide(self, others: float) -> Optional[Tuple[int, int]]:
        """Sets the thread count for ``others`` cores used by other processes: down at once to
        floor(free + BUSY_MARGIN), up to floor(free + QUIET_MARGIN) after QUIET_WINDOWS such
        windows in a row, within [1, :attr:`full`]; returns (old, new) on a change."""
        free = len(self.cpus) - others
        down = max(1, min(self.full, math.floor(free + BUSY_MARGIN)))
        up = max(1, min(self.full, math.floor(free + QUIET_MARGIN)))
        new = self.threads
        if down < self.threads:
            new, self._quiet = down, 0
        elif up > self.threads:
            self._quiet += 1
            if self._quiet >= QUIET_WINDOWS:
                new, self._quiet = up, 0
        else:
            self._quiet = 0
        if new == self.threads:
            return None
        return self._set(new)

    def _set(self, n: int) -> Tuple[int, int]:
        import torch

        old, now = self.threads, time.monotonic()
        torch.set_num_threads(n)
        self.threads = n
        self.switches += 1
        if n < self.full and self._low_since is None:
            self._low_since = now
        elif n == self.full and self._low_since is not None:
            self.low_seconds += now - self._low_since
            self._low_since = None
        return old, n

    def close(self) -> None:
        """Restores the starting thread count and the kernel's default vocabulary split."""
        if not self.enabled:
            return
        if self.threads != self.full:
            self._set(self.full)
        from .kernels import logprobs_cpu

        logprobs_cpu.pin_vocab_groups(self._pinned_before)
        self.enabled = False

    def summary(self) -> str:
        """One line for the run report."""
        if self.switches == 0:
            n = f"{self.full} thread{'s' if self.full != 1 else ''}"
            return n + (" throughout" if self.governed else " (fixed)")
        low = self.low_seconds + (time.monotonic() - self._low_since
                                  if self._low_since is not None else 0.0)
        return (f"{self.full} threads, fewer for {low:.0f} s while other processes used "
                f"these cores ({self.switches} change{'s' if self.switches != 1 else ''})")
