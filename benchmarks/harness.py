"""Shared benchmark harness: timing, steady-state peak memory, the machine's matmul peak,
subprocess isolation per measurement, and JSON + markdown output (atomically written).

Every measured case runs in its own fresh process, so one method's allocator state,
compiled caches or thread pools cannot bias another's memory reading.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- memory


def disable_thp() -> None:
    """Transparent huge pages make RSS jump in 2 MiB steps; off for this process so memory
    readings count 4 KiB pages. Call before allocating."""
    import ctypes

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class RssSampler:
    """A daemon thread reading this process's RSS (``/proc/self/statm``) every ``period_s``
    and keeping the largest value since :meth:`reset`.

    Why: the kernel's own high-water mark (VmHWM) is updated lazily and can read far below
    the RSS the process actually reached. On this project's CI machines (Linux 6.18 VMs) one
    1k-token dpo_fast step read VmHWM 2,433 MiB while RSS sampled every millisecond in the
    same process peaked at 4,304 MiB (glibc's mmap threshold fixed at 128 KiB), and 4,507
    against 4,788 MiB with the default allocator. A sample misses a peak shorter than the
    period; buffers that large take longer than that to fill, so the miss is a few MiB."""

    def __init__(self, period_s: float = 0.001):
        import threading

        self.period_s = period_s
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = resource.getpagesize()
        self.peak = self.read()
        threading.Thread(target=self._run, name="rss-sampler", daemon=True).start()

    def read(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def _run(self) -> None:
        while True:
            r = self.read()
            if r > self.peak:
                self.peak = r
            time.sleep(self.period_s)

    def reset(self) -> None:
        self.peak = self.read()


_SAMPLER: Optional[RssSampler] = None


def start_rss_sampler(period_s: float = 0.001) -> RssSampler:
    """Starts (once per process) the :class:`RssSampler` that :func:`hwm_bytes` also reads."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = RssSampler(period_s)
    return _SAMPLER


def hwm_bytes() -> int:
    """Peak resident set size since the last :func:`reset_hwm`: Linux VmHWM, or the sampled
    RSS peak when :func:`start_rss_sampler` runs and saw more (VmHWM can lag: see
    :class:`RssSampler`)."""
    with open("/proc/self/status") as f:
        hwm = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
    return max(hwm, _SAMPLER.peak) if _SAMPLER is not None else hwm


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if _SAMPLER is not None:
        _SAMPLER.reset()


# ----------------------------------------------------------------------------- time


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], None], reps: int, device: str = "cpu") -> Dict[str, float]:
    """Median / p20 / p80 seconds of ``fn`` over ``reps`` runs (after the caller's warm-up)."""
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return dict(_quantiles(ts), reps=reps)


def _quantiles(ts: List[float]) -> Dict:
    """Median / p20 / p80 of step times, and the sorted times."""
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, int(round(f * (len(ts) - 1))))]  # noqa: E731
    return {"median": statistics.median(ts), "p20": q(0.2), "p80": q(0.8), "times": ts}


def merge_rounds(method: str, runs: List[dict]) -> dict:
    """One method's worker results from several rounds -> median / p20 / p80 over all their
    timed steps and the largest extra-memory reading (an error if any round failed)."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return {"method": method, "error": bad[0]["error"]}
    qs = _quantiles([t for r in runs for t in r.get("times", [r["time"]])])
    return {"method": method, "time": qs.pop("median"), **qs,
            "extra_bytes": max(r["extra_bytes"] for r in runs)}


def peak_matmul_gflops(device: str = "cpu", reps: int = 5,
                       dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul rate in ``dtype`` with a preallocated output (GFLOP/s), the floor's
    unit. On CUDA the shapes are GPU-sized and the time is do_bench's median."""
    best = 0.0
    shapes = ((1024, 1024, 1024), (512, 576, 4096), (2048, 576, 8192))
    if device == "cuda":
        shapes = ((8192, 8192, 8192), (8192, 4096, 16384), (4096, 576, 49152))
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        if device == "cuda":
            import triton.testing

            t = triton.testing.do_bench(lambda: torch.mm(a, b, out=out), rep=200,
                                        return_mode="median") / 1e3
        else:
            t = time_fn(lambda: torch.mm(a, b, out=out), reps, device)["median"]
        best = max(best, 2 * m * k * n / t / 1e9)
    return best


# ------------------------------------------------------------------------ machinery


def machine() -> Dict[str, str]:
    info = {
        "host_cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                info["host_cpu"] = m.group(1).strip()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_worker(script: Path, args: List[str], timeout: int = 3600,
               live_rss: bool = True) -> dict:
    """Runs ``python script --worker args...`` in a fresh process; returns its last JSON line.

    ``live_rss``: glibc's mmap threshold fixed at 128 KiB, so freed buffers go back to the OS
    and RSS follows live memory (kernel-level memory comparisons); False keeps the default
    allocator, what a user's process gets (end-to-end training comparisons)."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if live_rss:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(name: str, payload: dict, markdown: str) -> None:
    atomic_write(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write(RESULTS / f"{name}.md", markdown)


def md_table(headers: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)
