"""How this process's OpenMP threads wait between parallel regions; set before torch loads.

torch's CPU ops, MKL and dpo_fast's C++ kernel share one OpenMP (libgomp) thread pool, whose
idle threads by default spin for ``GOMP_SPINCOUNT`` = 300,000 iterations (milliseconds) at the
end of every parallel region before they sleep. A training step on the CPU runs thousands of
short parallel regions (elementwise ops, small GEMMs). With another process on the same cores
the spinning threads take the cores away from the thread that still has work, and each region
then ends a scheduler time slice late: measured on 2 cores (SmolLM2-135M, 4 pairs, max_length
128), the median step went from 2.17 s alone to 14.2 s next to a 2-thread torch job of short
ops and to 29.7 s next to a 2-thread matmul loop, with torch's elementwise ops 10-14x slower
and its GEMMs 2.8x (``benchmarks/bench_contention.py``, README "Performance").

Threads that block at once (``OMP_WAIT_POLICY=PASSIVE``) give the cores back, but waking a
blocked thread takes longer than finding a spinning one: alone, steps about 1.2x slower. A
short spin keeps most of both: a thread that waits spins :data:`SPIN_COUNT` iterations (tens
of microseconds) and then blocks. Measured on 2 cores (2026-12-03, 8-10-step runs
interleaved, median steps): alone, a spin of 3,000 was 1.02-1.07x the default's step (1.11x
in the committed table), 1,000 about 1.1x, passive about 1.2x, 10,000 and 30,000 within the
noise of the default; next to a 2-thread torch matmul loop 3.0-3.1 s with 3,000 against
21.5 s with the default, 3.6 s with 10,000, 5.2 s with 30,000 and 2.5-2.7 s passive.

libgomp reads its settings once, when it is loaded (with torch), and offers no call to change
them later, so :func:`configure` runs when ``dpo_fast`` is imported: if no OpenMP runtime is
loaded yet and the user set neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``, it sets
``GOMP_SPINCOUNT``. Other OpenMP runtimes (LLVM's libomp, which torch's macOS wheels load)
ignore that variable and keep their defaults. The ``dpo-fast`` command always imports dpo_fast
first; a script that imports torch first keeps the long default spin (:func:`wait_policy` says
so, ``dpo-fast info`` and the trainer report it). Results do not change: the setting decides
only how idle threads wait.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 3000
"""Iterations an idle libgomp thread spins before it blocks (libgomp's default: 300,000)."""

_RUNTIMES = ("libgomp", "libiomp", "libomp")
_state: str = "not configured"


def _runtime_loaded() -> bool:
    """Whether an OpenMP runtime is already mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any(name in line for line in f for name in _RUNTIMES)
    except OSError:  # no /proc (macOS, Windows): torch is what loads the runtime
        return "torch" in sys.modules


def configure() -> str:
    """Sets ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` when that can still take effect and the
    user chose no wait policy; returns (and remembers) a one-line description of the policy in
    effect."""
    global _state
    user = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    if user:
        _state = ", ".join(f"{k}={v}" for k, v in user.items()) + " (from the environment)"
    elif _runtime_loaded():
        _state = ("long spin (OpenMP's default: torch was loaded before dpo_fast; import "
                  f"dpo_fast first or set GOMP_SPINCOUNT={SPIN_COUNT}, which keeps CPU "
                  "training fast next to other processes)")
    else:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        _state = (f"short spin (GOMP_SPINCOUNT={SPIN_COUNT} set by dpo_fast: idle threads "
                  "spin briefly, then block)")
    return _state


def wait_policy() -> str:
    """The description :func:`configure` returned when dpo_fast was imported."""
    return _state


def spinning() -> bool:
    """True when the OpenMP threads of this process keep OpenMP's long default spin (torch
    loaded before dpo_fast and no policy chosen)."""
    return _state.startswith("long spin")
