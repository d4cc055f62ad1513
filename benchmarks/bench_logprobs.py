"""Benchmark: per-token log-probs from hidden states + LM head, fwd / bwd / fwd+bwd.

Methods, side by side in one run (each case in a fresh process):
  naive           full [N, V] logits -> log_softmax -> gather (autograd)
  dpo_fast-cpu    the C++ kernel (csrc/)
  dpo_fast-torch  the chunked pure-PyTorch twin
  dpo_fast-triton Triton row kernels + cuBLAS GEMMs on vocabulary chunks (CUDA only;
                  timed with triton.testing.do_bench)
  dpo_fast-triton_fused  the fully fused Triton kernels (CUDA only)
  trl-chunked     trl.kernels.ChunkedLogProbFunction (TRL 1.16's DPOTrainer path)
  cce             cut_cross_entropy.linear_cross_entropy(reduction="none"), torch_compile on
                  CPU ("cce" Triton impl on CUDA)
  <method>@ign50  the same with half of the positions set to ignore_index (as prompt tokens
                  are in DPO): measures the "ignored positions cost nothing" lever

Times are medians; ratios are to naive and to the 4-GEMM floor (4 x 2*N*D*V FLOPs at the
machine's measured peak fp32 matmul rate). Extra memory = steady-state peak above inputs
and gradients for one fwd+bwd. Writes benchmarks/results/logprobs_<device>.{json,md}.

    python benchmarks/bench_logprobs.py [--device cpu|cuda] [--reps 3] [--shapes smol,large]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {"smol": (4096, 576, 49152), "large": (2048, 640, 262144), "tiny": (512, 576, 8192),
          "llama": (8192, 4096, 128256)}
METHODS_CPU = ["naive", "dpo_fast-cpu", "dpo_fast-torch", "trl-chunked", "cce",
               "dpo_fast-cpu@ign50"]
METHODS_CUDA = ["naive", "dpo_fast-triton", "dpo_fast-triton_fused", "cce",
                "dpo_fast-triton@ign50"]
# GEMMs each method executes per fwd+bwd (for the executed GFLOP/s column).
GEMMS = {"naive": 3, "dpo_fast-cpu@ign50": 2, "dpo_fast-triton@ign50": 2, "dpo_fast-cpu": 4,
         "dpo_fast-torch": 4, "dpo_fast-triton": 4, "dpo_fast-triton_fused": 5,
         "trl-chunked": 4, "cce": 3}


def make_fn(method: str, device: str):
    """Returns f(hidden, weight, targets) -> per-token log-probs [N] (differentiable)."""
    if method == "naive":
        return lambda h, w, t: torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]
    if method.endswith("@ign50"):
        return make_fn(method[: -len("@ign50")], device)
    if method.startswith("dpo_fast-"):
        import dpo_fast

        impl = method.split("-", 1)[1]
        return lambda h, w, t: dpo_fast.linear_logprobs(h, w, t, impl=impl)
    if method == "trl-chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        return lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768)[0]
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device == "cuda" else "torch_compile"
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl=impl)
    raise ValueError(f"unknown method {method!r}")


def worker(method: str, n: int, d: int, v: int, reps: int, device: str, dtype: str) -> dict:
    harness.disable_thp()
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(2)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, d, device=device, dtype=dt).requires_grad_()
    weight = (torch.randn(v, d, device=device) / d**0.5).to(dt).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    if method.endswith("@ign50"):
        targets[n // 2:] = -100
    fn = make_fn(method, device)
    g = torch.randn(n, device=device)

    def fwd():
        return fn(hidden, weight, targets)

    def step():
        hidden.grad = weight.grad = None
        (fwd() * g).sum().backward()

    step()  # warm-up (compiles, thread pools, extension load)
    if device == "cuda":
        import triton.testing

        t_fwd = triton.testing.do_bench(fwd, rep=200, return_mode="median") / 1e3
        t_all = triton.testing.do_bench(step, rep=200, return_mode="median") / 1e3
        times = {"fwd": t_fwd, "bwd": t_all - t_fwd, "fwd+bwd": t_all}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        fw, bw = [], []
        for _ in range(reps):
            hidden.grad = weight.grad = None
            f = {}
            t = harness.time_fn(lambda: f.setdefault("out", fwd()), 1)["median"]
            fw.append(t)
            loss = (f["out"] * g).sum()
            bw.append(harness.time_fn(lambda: loss.backward(), 1)["median"])
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        tot = [a + b for a, b in zip(fw, bw)]
        times = {"fwd": med(fw), "bwd": med(bw), "fwd+bwd": med(tot)}
        hidden.grad.fill_(1.0)  # gradient-sized buffers resident, as between training steps
        weight.grad.fill_(1.0)
        base = harness.rss_bytes()
        hidden.grad = weight.grad = None
        harness.reset_hwm()
        (fwd() * g).sum().backward()
        extra = harness.hwm_bytes() - base
    return {"method": method, "n": n, "d": d, "v": v, "times": times, "extra_bytes": extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="smol,large")
    ap.add_argument("--methods", default=None, help="comma list (default: all for the device)")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "N", "D", "V"))
    args = ap.parse_args()
    if args.worker:
        m, n, d, v = args.worker
        print(json.dumps(worker(m, int(n), int(d), int(v), args.reps, args.device, args.dtype)))
        return

    methods = args.methods.split(",") if args.methods else (
        METHODS_CUDA if args.device == "cuda" else METHODS_CPU)
    peak = harness.peak_matmul_gflops(args.device, dtype=getattr(torch, args.dtype))
    print(f"peak {args.dtype} matmul: {peak:.1f} GFLOP/s", flush=True)
    results = []
    for shape_name in args.shapes.split(","):
        n, d, v = SHAPES[shape_name]
        for m in methods:
            r = harness.run_worker(Path(__file__), [m, str(n), str(d), str(v), "--reps",
                                   str(args.reps), "--device", args.device, "--dtype", args.dtype])
            r.update(method=m, shape=shape_name, n=n, d=d, v=v)
            print(json.dumps(r), flush=True)
            results.append(r)

    rows = []
    for r in results:
        n, d, v = r["n"], r["d"], r["v"]
        gemm = 2 * n * d * v
        floor = 4 * gemm / (peak * 1e9)
        naive = next((x for x in results if x["shape"] == r["shape"] and x["method"] == "naive"
                      and "times" in x), None)
        logits_bytes = n * v * 4
        if "times" not in r:
            rows.append([r["shape"], r["method"], "error: " + r.get("error", "?")] + [""] * 8)
            continue
        t = r["times"]
        rows.append([
            f"{r['shape']} ({n}x{d}x{v})", r["method"],
            harness.fmt(t["fwd"]), harness.fmt(t["bwd"]), harness.fmt(t["fwd+bwd"]),
            harness.fmt(t["fwd+bwd"] / naive["times"]["fwd+bwd"], ".2f") if naive else "—",
            harness.fmt(t["fwd+bwd"] / floor, ".2f"),
            harness.fmt(GEMMS[r["method"]] * gemm / t["fwd+bwd"] / 1e9, ".0f"),
            harness.fmt(r["extra_bytes"] / 2**20, ".1f"),
            harness.fmt(100 * r["extra_bytes"] / logits_bytes, ".2f"),
        ])
    info = harness.machine()
    md = (f"# linear log-probs, fwd+bwd ({args.device}, {args.dtype})\n\n"
          f"Machine: {info}. Peak {args.dtype} matmul (preallocated output): {peak:.1f} "
          f"GFLOP/s; floor = 4 x 2*N*D*V FLOPs at that rate. Times in seconds ("
          + ("do_bench median" if args.device == "cuda" else f"median of {args.reps}") + ").\n"
          "Extra memory: peak above inputs and gradients during one fwd+bwd "
          + ("(CUDA allocator peak). " if args.device == "cuda" else
             "(RSS high-water mark; values at or below 0 are within the allocator's few-MiB "
             "slack between steps). ")
          + "`@ign50`: half of the positions are ignore_index.\n\n")
    md += harness.md_table(
        ["shape", "method", "fwd s", "bwd s", "fwd+bwd s", "x naive", "x 4-GEMM floor",
         "GFLOP/s (executed)", "extra MiB", "extra % of logits"], rows)
    suffix = "" if (args.device, args.dtype) == ("cpu", "float32") else f"_{args.dtype}"
    harness.write_results(f"logprobs_{args.device}{suffix}",
                          {"machine": info, "peak_gflops": peak, "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
