"""How this process's OpenMP threads wait between parallel regions; set before torch loads.

torch's CPU ops, MKL and dpo_fast's C++ kernel share one OpenMP (libgomp) thread pool, which
by default spins for a while at the end of every parallel region before it sleeps. A
training step on the CPU runs thousands of short parallel regions (elementwise ops, small
GEMMs). With another process on the same cores the spinning threads take the cores away
from the thread that still has work, and each region then ends a scheduler time slice late:
measured on 2 cores (SmolLM2-135M, 4 pairs, max_length 128), the median step went from
2.17 s alone to 14.2 s next to a 2-thread torch job of short ops (single steps up to 33 s)
and to 29.7 s next to a 2-thread matmul loop, with torch's elementwise ops 10-14x slower and
its GEMMs 2.8x (``benchmarks/bench_contention.py``, README "Performance"). Threads that block
instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) give the cores back at once: 3.6 s next to
either, at a cost alone of 2.40 s instead of 2.17 s (1.10x: waking a blocked thread takes
longer than finding a spinning one).

libgomp reads the policy once, when it is loaded (with torch), and offers no call to change it
later, so :func:`configure` runs when ``dpo_fast`` is imported: if no OpenMP runtime is loaded
yet and the user set neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``, it sets
``OMP_WAIT_POLICY=PASSIVE``. The ``dpo-fast`` command always imports dpo_fast first; a script
that imports torch first keeps the spinning default (:func:`wait_policy` says so, ``dpo-fast
info`` and the trainer report it). Results do not change: the policy decides only how idle
threads wait.
"""

from __future__ import annotations

import os
import sys

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
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` when that can still take effect and the user chose no
    policy; returns (and remembers) a one-line description of the policy in effect."""
    global _state
    user = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    if user:
        _state = ", ".join(f"{k}={v}" for k, v in user.items()) + " (from the environment)"
    elif _runtime_loaded():
        _state = ("spin then sleep (OpenMP's default: torch was loaded before dpo_fast; "
                  "import dpo_fast first or set OMP_WAIT_POLICY=PASSIVE, which keeps CPU "
                  "training fast next to other processes)")
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _state = "passive (set by dpo_fast: idle threads block instead of spinning)"
    return _state


def wait_policy() -> str:
    """The description :func:`configure` returned when dpo_fast was imported."""
    return _state


def spinning() -> bool:
    """True when the OpenMP threads of this process spin (torch loaded before dpo_fast and
    no policy chosen)."""
    return _state.startswith("spin")
