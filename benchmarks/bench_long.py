"""Long pairs: step time, peak memory and tokens/s from 1k to 8k tokens per sequence, dpo_fast
with segment attention (its defaults; and with ``gradient_checkpointing=true``), dpo_fast
with the dense block mask (``attention=block_mask``) and TRL 1.16's ``DPOTrainer`` with its
defaults, side by side in one run; and the longest pair each fits in 16 GiB.

Data: real Rotten Tomatoes text (``bench_train.long_review_rows``): a prompt quoting critics'
reviews end to end (75% of each sequence), a chosen response of fresh reviews and a rejected
one of rotten reviews (25% each), cut to exact token counts by SmolLM2's tokenizer. One pair
per step (the pair is over dpo_fast's default 4,096-token micro-batch budget from 4k on, so
its layers are checkpointed there: ``checkpoint_long_pairs``, the default). SmolLM2-135M, fp32,
CPU. Every case runs in its own fresh process through ``bench_train``'s workers (the same
pairs in the same order, AdamW, sigmoid DPO); dpo_fast's reference cache is filled first
(``dpo_fast_precompute``, not timed in the steps).

Measured per case: the median step time after the first step, tokens/s over those steps (both
sequences' tokens, a shared prompt counted twice), the training loop's peak RSS (reset
when the loop starts; sampled every millisecond, as VmHWM lags: ``harness.RssSampler``) and
the whole process's. A case whose peak, extrapolated from the
shorter lengths, would pass ``--skip-above`` GiB is skipped (the machine has 24 GiB). "Fits in
16 GiB": the longest length whose process peak stays under 16 GiB, measured if a measured
peak passes 16 GiB, else on the line through the two longest lengths (said so in the table).

    python benchmarks/bench_long.py                      # 1k, 2k, 4k, 8k (~50 minutes)
    python benchmarks/bench_long.py --lengths 256 512 --name scratch   # quick look
    python benchmarks/bench_long.py --from-json benchmarks/results/long_cpu.json  # re-render

GPU mode (``benchmarks/gpu_session.sh long``): ``--device cuda --precision bf16 --arch llama-1b
--synthetic`` (random ids: no data assets on a bare GPU machine), with an MFU column.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import harness
import numpy as np

BENCH_TRAIN = Path(__file__).with_name("bench_train.py")
CASES = {  # name -> (bench_train worker case, TrainConfig.attention, share_prompt)
    "dpo_fast": ("dpo_fast", "auto", True),
    "dpo_fast_mask": ("dpo_fast", "block_mask", True),
    "dpo_fast_ckpt": ("dpo_fast_ckpt", "auto", True),
    "dpo_fast_noshare": ("dpo_fast", "segments", False),
    "trl_default": ("trl_default", "auto", True),
}
DEFAULT_CASES = ("dpo_fast", "dpo_fast_ckpt", "dpo_fast_mask", "trl_default")
LABELS = {"dpo_fast": "dpo_fast (segment attention)",
          "dpo_fast_ckpt": "dpo_fast + gradient_checkpointing",
          "dpo_fast_mask": "dpo_fast, dense block mask",
          "dpo_fast_noshare": "dpo_fast segments, prompt not shared",
          "trl_default": "TRL default (live ref, grad ckpt)"}
FIT_MIB = 16 * 1024


def worker_args(args, t: int, steps: int, work: Path) -> List[str]:
    data = ["--synthetic", str(t)] if args.synthetic else ["--synthetic", "0",
                                                           "--long-reviews", str(t)]
    return ["--variant", "short", "--steps", str(steps), "--max-length", str(t + 64),
            "--batch-size", "1", "--lr", str(args.lr), "--seed", str(args.seed),
            "--threads", str(args.threads), "--device", args.device,
            "--precision", args.precision, "--prompt-share", str(args.prompt_share), *data,
            "--workdir", str(work), "--ref-cache", str(work / f"ref_cache_{t}")
            ] + (["--arch", args.arch] if args.arch else [])


def projected(points: Dict[int, float], t: int) -> Optional[float]:
    """Peak at length ``t`` from the measured ``points`` (length -> MiB): a line through the
    last two (convex growth makes it a lower bound; the skip rule only needs an estimate)."""
    if len(points) < 2:
        return None
    (t1, m1), (t2, m2) = sorted(points.items())[-2:]
    return m2 + (m2 - m1) / (t2 - t1) * (t - t2)


def longest_fit(points: Dict[int, float]) -> Optional[Dict[str, Any]]:
    """Largest length whose peak stays under 16 GiB: measured when a measured peak passes it,
    else on the line through the two longest measured lengths (past the micro-batch budget
    dpo_fast's memory grows linearly; a dense mask adds an L^2 term the line leaves out)."""
    if len(points) < 2:
        return None
    ts = sorted(points)
    if max(points.values()) > FIT_MIB:
        inside = [t for t in ts if points[t] <= FIT_MIB]
        return {"tokens": max(inside) if inside else None, "measured": True}
    (t1, m1), (t2, m2) = [(t, points[t]) for t in ts[-2:]]
    slope = (m2 - m1) / (t2 - t1)
    if slope <= 0:
        return {"tokens": None, "measured": False}
    return {"tokens": int((t2 + (FIT_MIB - m2) / slope) // 256 * 256), "measured": False,
            "from": [t1, t2]}


def run_case(args, name: str, t: int, steps: int, work: Path) -> Dict[str, Any]:
    case, attention, share = CASES[name]
    common = worker_args(args, t, steps, work)
    r = harness.run_worker(BENCH_TRAIN, [*common, "--case", case, "--attention", attention,
                                         *([] if share else ["--no-share-prompt"])],
                           timeout=3600, live_rss=args.live_rss)
    if "error" in r:
        return r
    times, tokens = r["times"][1:], r["tokens"][1:]
    out = {"median_step_s": float(np.median(times)), "tokens_per_s": sum(tokens) / sum(times),
           "peak_rss_mb": r["peak_rss_mb"], "process_peak_mb": r["process_peak_mb"],
           "device_peak_mb": r.get("device_peak_mb"), "attention": r.get("attention"),
           "pair_tokens": r["tokens"][0], "times": r["times"], "losses": r["losses"]}
    if args.device == "cuda":  # the policy's training FLOPs (bench_train.model_flops)
        import bench_train
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(bench_train.prepared_model_dir(
            argparse.Namespace(arch=args.arch), work))
        p = int(t * args.prompt_share)
        flops = bench_train.model_flops(cfg, [[[0] * p, [0] * (t - p), [0] * (t - p)]])
        out["mfu"] = flops / out["median_step_s"] / (args.peak_gflops * 1e9)
    return out


def peak_key(args) -> str:
    """The memory figure compared: the GPU's allocator peak on CUDA, else the loop's RSS."""
    return "device_peak_mb" if args.device == "cuda" else "peak_rss_mb"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(res: Dict[int, Dict[str, Any]], fits: Dict[str, Any], args, info) -> str:
    rows = []
    for t in sorted(res):
        trl = res[t].get("trl_default", {})
        for name in CASES:
            r = res[t].get(name)
            if r is None:
                continue
            if "error" in r or "skipped" in r:
                rows.append([str(t), LABELS[name], "-", "-", "-", "-",
                             r.get("skipped") or r["error"][:80], "", ""])
                continue
            k = peak_key(args)
            rows.append([str(t), LABELS[name], str(r["pair_tokens"]),
                         f"{r['median_step_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                         f"{r[k]:,.0f}", f"{r['process_peak_mb']:,.0f}",
                         ratio(r["tokens_per_s"], trl.get("tokens_per_s")),
                         ratio(r[k], trl.get(k))]
                        + ([f"{r['mfu']:.0%}"] if "mfu" in r else []))
    mem = "GPU peak MiB" if args.device == "cuda" else "loop peak MiB"
    table = harness.md_table(
        ["tokens / sequence", "case", "pair tokens", "step s", "tokens/s", mem,
         "process peak MiB", "tokens/s vs TRL", mem.replace(" MiB", "") + " vs TRL"]
        + (["MFU"] if args.device == "cuda" else []), rows)
    fit_rows = []
    for name, f in fits.items():
        if f is None or f["tokens"] is None:
            fit_rows.append([LABELS[name], "-"])
        else:
            how = ("measured" if f["measured"] else
                   "extrapolated on the line through the peaks at {} and {}".format(*f["from"]))
            fit_rows.append([LABELS[name], f"{f['tokens']:,} ({how})"])
    model = f"random {args.arch}-shaped model" if args.arch else "SmolLM2-135M-Instruct"
    where = info.get("gpu") if args.device == "cuda" else f"CPU ({info['host_cpu']}"
    data = ("random token ids" if args.synthetic
            else "Rotten Tomatoes reviews end to end")
    return (f"# Long pairs: dpo_fast vs TRL {info['trl']} ({info['date']})\n\n"
            f"{model}, {args.precision}, {where}, {args.threads} threads), "
            f"torch {info['torch']}, transformers {info['transformers']}; one pair per step, "
            f"the prompt {args.prompt_share:.0%} of each sequence ({data}), AdamW lr "
            f"{args.lr}, sigmoid DPO beta 0.1; the same pairs in the same order for every "
            "case; step time = median after the first step; memory = peak RSS (the "
            "kernel's VmHWM or the RSS sampled every millisecond in the worker, whichever is "
            "higher: VmHWM alone lags here) "
            + ("with glibc's mmap threshold fixed at 128 KiB (RSS follows live memory)"
               if getattr(args, "live_rss", False) else
               "under glibc's default allocator (what a user's process gets; it also counts "
               "freed heap the allocator keeps, so it varies from run to run)")
            + ".\n\n" + table
            + "\n\nLongest pair (tokens per sequence) whose peak ("
            + ("GPU allocator" if args.device == "cuda" else "whole process")
            + ") stays under 16 GiB:\n\n"
            + harness.md_table(["case", "tokens / sequence"], fit_rows) + "\n")


def targets(res: Dict[int, Dict[str, Any]], key: str = "peak_rss_mb") -> List[str]:
    """The issue's CPU targets, PASS / FAIL, from the measured table (``key``: the peak)."""
    out = []
    seg = {t: r["dpo_fast"][key] for t, r in res.items()
           if "median_step_s" in r.get("dpo_fast", {})}
    if len(seg) >= 3:
        ts = sorted(seg)
        slopes = [(seg[b] - seg[a]) / (b - a) for a, b in zip(ts, ts[1:])]
        ok = all(s2 <= 1.25 * max(slopes[0], 1e-9) for s2 in slopes[1:])
        out.append(f"dpo_fast's loop peak grows at most linearly from {ts[0]} to {ts[-1]}: "
                   f"MiB per token between lengths " + ", ".join(f"{s:.3f}" for s in slopes)
                   + f" -> {'PASS' if ok else 'FAIL'} (each slope <= 1.25x the first)")
    r4 = res.get(4096, {})
    seg4, mask4, trl4 = (r4.get(k, {}) for k in ("dpo_fast", "dpo_fast_mask", "trl_default"))
    if "median_step_s" in seg4 and "median_step_s" in mask4:
        x = seg4["median_step_s"] / mask4["median_step_s"]
        out.append(f"4k: segments step / dense-mask step = {x:.2f} (target <= 0.8) -> "
                   f"{'PASS' if x <= 0.8 else 'FAIL'}")
    for name in ("dpo_fast", "dpo_fast_ckpt"):
        r = r4.get(name, {})
        if "median_step_s" in r and "median_step_s" in trl4:
            x = r["tokens_per_s"] / trl4["tokens_per_s"]
            y = r[key] / trl4[key]
            out.append(f"4k: {LABELS[name]} tokens/s = {x:.2f}x TRL default (target >= 3.5) "
                       f"-> {'PASS' if x >= 3.5 else 'FAIL'}; peak = {y:.2f}x TRL's (target "
                       f"<= 0.5) -> {'PASS' if y <= 0.5 else 'FAIL'}")
    return out


def plot(path: Path, res: Dict[int, Dict[str, Any]], key: str = "peak_rss_mb") -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for name in CASES:
        pts = [(t, r[name]) for t, r in sorted(res.items())
               if "median_step_s" in r.get(name, {})]
        if not pts:
            continue
        ts = [t for t, _ in pts]
        axes[0].plot(ts, [r["median_step_s"] for _, r in pts], "o-", label=LABELS[name])
        axes[1].plot(ts, [r[key] / 1024 for _, r in pts], "o-", label=LABELS[name])
    mem = "GPU peak (GiB)" if key == "device_peak_mb" else "training-loop peak RSS (GiB)"
    for ax, what in zip(axes, ("step time (s)", mem)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence (prompt 75%)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("DPO step, one pair per step")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def render_saved(path: Path) -> None:
    """The markdown, targets and PNG of a saved run, from its JSON (written next to it)."""
    import json

    saved = json.loads(path.read_text())
    args = argparse.Namespace(**saved["args"])
    res = {int(t): r for t, r in saved["results"].items()}
    key = "device_peak_mb" if args.device == "cuda" else "process_peak_mb"
    saved["fits_16gib"] = {name: longest_fit({t: r[name][key] for t, r in res.items()
                                              if key in r.get(name, {})})
                           for name in args.cases}
    md = report(res, saved["fits_16gib"], args, saved["machine"])
    tg = targets(res, peak_key(args))
    md += "\n" + "\n".join(f"- {x}" for x in tg) + "\n"
    saved["targets"] = tg
    harness.write_results(path.stem, saved, md)
    plot(path.with_suffix(".png"), res, peak_key(args))
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--arch", default=None, help="bench_train.ARCHS: a random model of that "
                   "shape instead of SmolLM2 (GPU mode)")
    p.add_argument("--synthetic", action="store_true",
                   help="random token ids instead of review text (GPU mode: no data assets)")
    p.add_argument("--prompt-share", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-above", type=float, default=20.0,
                   help="GiB: skip a case whose extrapolated process peak passes this")
    p.add_argument("--name", default="long_cpu")
    p.add_argument("--workdir", default=None)
    p.add_argument("--live-rss", action="store_true",
                   help="glibc's mmap threshold fixed at 128 KiB in the workers, so RSS follows "
                        "live memory (the default allocator's high-water mark also counts "
                        "freed heap it keeps, which varies run to run)")
    p.add_argument("--from-json", default=None,
                   help="re-render the markdown / PNG of a saved run's JSON (no measuring)")
    args = p.parse_args()
    if args.from_json:
        return render_saved(Path(args.from_json))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_long_"))
    args.peak_gflops = None
    if args.device == "cuda":
        import torch

        args.peak_gflops = harness.peak_matmul_gflops(
            "cuda", dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    res: Dict[int, Dict[str, Any]] = {}
    peaks: Dict[str, Dict[int, float]] = {c: {} for c in args.cases}
    for t in sorted(args.lengths):
        steps = 3 if t <= 2048 else 2
        res[t] = {}
        common = worker_args(args, t, steps, work)
        t0 = time.perf_counter()
        r = harness.run_worker(BENCH_TRAIN, [*common, "--case", "dpo_fast_precompute"],
                               timeout=3600, live_rss=False)
        if "error" in r:
            raise SystemExit(f"T={t}: the reference precompute failed: {r['error']}")
        print(f"T={t}: reference cache in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for name in args.cases:
            guess = projected(peaks[name], t)
            if guess is not None and guess > args.skip_above * 1024:
                res[t][name] = {"skipped": f"skipped: projected {guess / 1024:.1f} GiB"}
                continue
            t0 = time.perf_counter()
            res[t][name] = run_case(args, name, t, steps, work)
            r = res[t][name]
            if "process_peak_mb" in r:
                peaks[name][t] = r["device_peak_mb" if args.device == "cuda"
                                   else "process_peak_mb"]
            print(f"T={t} {name}: {time.perf_counter() - t0:.0f} s "
                  f"{ {k: v for k, v in r.items() if k not in ('times', 'losses')} }",
                  file=sys.stderr)
    fits = {name: longest_fit(peaks[name]) for name in args.cases}
    info = harness.machine()
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = "(not installed)"
    md = report(res, fits, args, info)
    tg = targets(res, peak_key(args))
    md += "\n" + "\n".join(f"- {x}" for x in tg) + "\n"
    harness.write_results(args.name, {"machine": info, "args": vars(args), "results": res,
                                      "fits_16gib": fits, "targets": tg}, md)
    plot(harness.RESULTS / f"{args.name}.png", res, peak_key(args))
    print(md)


if __name__ == "__main__":
    main()
