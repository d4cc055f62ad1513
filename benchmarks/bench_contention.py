"""Training speed next to other processes: dpo_fast and TRL default side by side, on a quiet
machine and next to each kind of neighbour, in one run.

Users train next to tokenizers, data loaders, notebooks and other jobs. This benchmark runs
the training benchmark's workers (``bench_train.py``: SmolLM2-135M-Instruct, fp32, Rotten
Tomatoes pairs, 4 pairs per step, max_length 128, AdamW, sigmoid DPO; every case trains on
the same pairs in the same order) while a neighbour process keeps running:

    none          nothing else runs (the baseline)
    busy          a one-thread Python busy loop
    matmul1       a one-thread torch job: 512 x 512 matmuls in a loop
    torch2        a two-thread torch job: the same matmuls on torch's default 2 threads
    torch2_short  a two-thread torch job of short ops (an elementwise op on 64k floats in a
                  loop: thousands of tiny parallel regions a second, like a data pipeline
                  doing its tensor work on torch's thread pool)
    pinned        a one-thread Python busy loop pinned to core 0 (sched_setaffinity)

Cases (each in its own fresh process, the neighbour started 2 s before it and stopped after):

    trl_default    TRL ``DPOTrainer`` as its users run it (live reference, gradient
                   checkpointing), torch imported as usual
    dpo_fast        dpo_fast's trainer with its defaults: OpenMP's default spin, and its
                    threads lowered while other processes use the cores
                    (``adaptive_threads``, ``dpo_fast/threads.py``)
    dpo_fast_fixed  the same trainer with ``adaptive_threads=false``: the thread count fixed,
                    i.e. dpo_fast before the governor (the idle baseline)

Per case: the median step time over steps ``--warmup``+1..S, tokens/s over those steps, and
the slowdown = median step next to the neighbour / median step alone. The neighbour reports
how much work it got done per second (its loop iterations), so a faster trainer that starves
its neighbour would show.

    python benchmarks/bench_contention.py                  # all neighbours (~50 minutes)
    python benchmarks/bench_contention.py --neighbours none torch2_short --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
NEIGHBOURS = ("none", "busy", "matmul1", "torch2", "torch2_short", "pinned")
CASES = ("trl_default", "dpo_fast", "dpo_fast_fixed")
LABELS = {"trl_default": "TRL default", "dpo_fast": "dpo_fast",
          "dpo_fast_fixed": "dpo_fast, threads fixed (adaptive_threads=false)"}
NEIGHBOUR_LABELS = {
    "none": "none (alone)", "busy": "1-thread Python busy loop",
    "matmul1": "1-thread torch matmul loop", "torch2": "2-thread torch matmul loop",
    "torch2_short": "2-thread torch job of short ops", "pinned": "busy loop pinned to core 0"}

# The neighbour programs: each counts its loop iterations and prints the count and the
# seconds it ran when it gets SIGTERM. Run with a clean OpenMP environment (OpenMP's defaults).
_NEIGHBOUR_CODE = r"""
import os, signal, sys, time
kind = sys.argv[1]
n = 0
t0 = time.perf_counter()
def done(*_):
    print(f"{n} {time.perf_counter() - t0}", flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, done)
if kind == "pinned":
    os.sched_setaffinity(0, {0})
if kind in ("busy", "pinned"):
    while True:
        n += 1
import torch
torch.set_num_threads(1 if kind == "matmul1" else 2)
if kind == "torch2_short":
    a = torch.randn(1 << 16)
    while True:
        a.mul_(1.0000001)
        n += 1
a = torch.randn(512, 512)
while True:
    a @ a
    n += 1
"""


def start_neighbour(kind: str):
    if kind == "none":
        return None
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR_CODE, kind], env=env,
                            stdout=subprocess.PIPE, text=True)
    time.sleep(2.0)
    return proc


def stop_neighbour(proc) -> float:
    """Stops the neighbour; its loop iterations per second."""
    if proc is None:
        return float("nan")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    n, secs = out.split()
    return int(n) / float(secs)


def worker(args) -> None:
    """One case in this fresh process: the training benchmark's worker."""
    sys.path.insert(0, str(HERE))
    import bench_train
    import harness
    import torch

    from dpo_fast import threads

    torch.set_num_threads(args.threads)
    harness.disable_thp()
    wargs = argparse.Namespace(
        variant="short", steps=args.steps, max_length=128, batch_size=4, lr=5e-6,
        seed=42, threads=args.threads, device="cpu", precision="fp32", arch=None,
        synthetic=0, prompt_share=0.5, case="trl_default" if args.case == "trl_default"
        else "dpo_fast", ref_cache=args.ref_cache, workdir=args.workdir,
        adaptive_threads=args.case != "dpo_fast_fixed")
    model_dir = bench_train.prepared_model_dir(wargs, Path(args.workdir))
    fn = bench_train.WORKERS[wargs.case]
    rec = fn(wargs, model_dir)
    rec.pop("ids", None)
    rec["openmp"] = threads.wait_policy()
    print(json.dumps(rec))


def run_case(args, case: str, neighbour: str, work: Path) -> Dict[str, Any]:
    proc = start_neighbour(neighbour)
    try:
        r = _run_worker(args, case, work)
    finally:
        rate = stop_neighbour(proc)
    r["neighbour_rate"] = rate
    return r


def _run_worker(args, case: str, work: Path) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__)), "--worker", "--case", case,
           "--steps", str(args.steps), "--threads", str(args.threads),
           "--workdir", str(work), "--ref-cache", str(work / "ref_cache")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if p.returncode != 0:
        raise SystemExit(f"{case} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fill_cache(args, work: Path) -> None:
    """The reference cache the dpo_fast cases read (a first run, alone, not timed here)."""
    sys.path.insert(0, str(HERE))
    import harness

    common = ["--variant", "short", "--steps", str(args.steps), "--max-length", "128",
              "--batch-size", "4", "--lr", "5e-6", "--seed", "42", "--threads",
              str(args.threads), "--device", "cpu", "--precision", "fp32", "--synthetic",
              "0", "--prompt-share", "0.5", "--workdir", str(work), "--ref-cache",
              str(work / "ref_cache")]
    r = harness.run_worker(HERE / "bench_train.py", [*common, "--case", "dpo_fast_precompute"],
                           timeout=3600, live_rss=False)
    if "error" in r:
        raise SystemExit(f"precompute failed: {r['error']}")


def summarize(runs: List[Dict[str, Any]], warmup: int) -> Dict[str, Any]:
    """One case next to one neighbour: the timed steps of all its runs pooled."""
    t = [x for r in runs for x in r["times"][warmup:]]
    k = [x for r in runs for x in r["tokens"][warmup:]]
    rates = [r["neighbour_rate"] for r in runs]
    return {"median_step_s": statistics.median(t), "tokens_per_s": sum(k) / sum(t),
            "max_step_s": max(t), "neighbour_rate": statistics.mean(rates),
            "runs": len(runs), "losses": runs[0]["losses"], "openmp": runs[0].get("openmp"),
            "cpu_threads": [r.get("cpu_threads") for r in runs]}


def report(res: Dict[str, Dict[str, Any]], args, info: Dict[str, str]) -> Tuple[str, List[str]]:
    rows, targets = [], []
    base = {c: res["none"][c]["median_step_s"] for c in CASES if c in res.get("none", {})}
    for n in res:
        for c in CASES:
            if c not in res[n]:
                continue
            s = res[n][c]
            slow = s["median_step_s"] / base[c] if c in base else float("nan")
            trl = res[n].get("trl_default")
            vs = s["tokens_per_s"] / trl["tokens_per_s"] if trl else float("nan")
            rate = s["neighbour_rate"]
            rows.append([NEIGHBOUR_LABELS[n], LABELS[c], f"{s['median_step_s']:.2f}",
                         f"{s['max_step_s']:.2f}", f"{s['tokens_per_s']:.0f}",
                         f"{slow:.2f}x", f"{vs:.2f}x",
                         "—" if rate != rate else f"{rate:,.0f}/s",
                         "; ".join(x for x in s.get("cpu_threads") or [] if x) or "—"])
        f, t = res[n].get("dpo_fast"), res[n].get("trl_default")
        if f and t and n != "none" and "dpo_fast" in base and "trl_default" in base:
            sf = f["median_step_s"] / base["dpo_fast"]
            st = t["median_step_s"] / base["trl_default"]
            r = f["tokens_per_s"] / t["tokens_per_s"]
            targets.append(f"{n}: dpo_fast slowdown {sf:.2f}x vs TRL's {st:.2f}x "
                           f"({'met' if sf <= st else 'NOT met'}: no worse than TRL's); "
                           f"tokens/s {r:.2f}x TRL's ({'met' if r >= 2.0 else 'NOT met'}: "
                           ">= 2x)")
    if "dpo_fast" in base and "dpo_fast_fixed" in base:
        r = base["dpo_fast"] / base["dpo_fast_fixed"]
        targets.append(f"alone: dpo_fast's median step {base['dpo_fast']:.2f} s vs "
                       f"{base['dpo_fast_fixed']:.2f} s with its threads fixed ({r:.2f}x: "
                       f"{'met' if r <= 1.0 else 'NOT met'}: no slower than before; threads "
                       f"alone: {', '.join(res['none']['dpo_fast']['cpu_threads'])})")
    md = (f"# Training next to other processes ({info['date']})\n\n"
          f"{info['host_cpu']}, {os.cpu_count()} cores, {args.threads} threads per trainer, "
          f"torch {info['torch']}; SmolLM2-135M-Instruct fp32, 4 pairs per step, max_length "
          f"128, {args.steps} steps, timings over steps {args.warmup + 1}..{args.steps}; each "
          "case a fresh process next to a fresh neighbour; the quiet baseline run first and "
          "again last, its steps pooled. Slowdown = median step next to the "
          "neighbour / median step alone (same case); neighbour work = its loop iterations "
          "per second while that case ran.\n\n"
          "| neighbour | trainer | median step s | slowest step s | tokens/s | slowdown | "
          "tokens/s vs TRL | neighbour work | dpo_fast's CPU threads |\n"
          "|---|---|---|---|---|---|---|---|---|\n"
          + "".join("| " + " | ".join(r) + " |\n" for r in rows)
          + "\n" + "".join(f"- {t}\n" for t in targets))
    return md, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--neighbours", nargs="+", default=list(NEIGHBOURS), choices=NEIGHBOURS)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="contention_cpu")
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case")
    p.add_argument("--ref-cache")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(HERE))
    import harness

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_contention_"))
    fill_cache(args, work)
    # The quiet baseline runs first and again last, its steps pooled, so a slow drift of the
    # machine over the ~45 minutes does not bias every slowdown one way.
    order = ["none"] + [n for n in args.neighbours if n != "none"] + ["none"]
    raw: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for n in order:
        for c in args.cases:
            t0 = time.perf_counter()
            r = run_case(args, c, n, work)
            raw.setdefault(n, {}).setdefault(c, []).append(r)
            t = r["times"][args.warmup:]
            print(f"{n}/{c}: median step {statistics.median(t):.2f} s "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    res = {n: {c: summarize(runs, args.warmup) for c, runs in cs.items()}
           for n, cs in raw.items()}
    info = harness.machine()
    md, targets = report(res, args, info)
    harness.write_results(args.name, {"machine": info, "args": vars(args), "results": res,
                                      "targets": targets}, md)
    print(md)


if __name__ == "__main__":
    main()
