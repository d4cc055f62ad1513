"""GPU kernel breakdown: each Triton kernel of the fused log-prob op timed alone, next to the
cuBLAS GEMM of the same shape (its floor) and the other paths, plus a config sweep.

For every shape and dtype: the forward kernel, the two backward kernels (dhidden over token
tiles, dweight over vocab tiles), a plain cuBLAS ``h @ W.T`` (one GEMM of 2NDV FLOPs: the
unit every fused kernel is measured in), naive full-logits fwd+bwd, the torch twin with
GPU-sized chunks. ``--sweep`` also times a grid of block configs per kernel and prints the
best, to choose DEFAULT_CONFIGS from measurements (each candidate must then pass the compile
gate's no-spill rule on sm_80 and sm_90 before it becomes a default).

    python benchmarks/bench_gpu_kernels.py [--dtypes bfloat16,float32] [--shapes smol,llama]
        [--sweep] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton
import triton.testing

from dpo_fast.kernels import logprobs_chunked as ch
from dpo_fast.kernels import logprobs_triton as lt

SHAPES = {"smol": (4096, 576, 49152), "llama": (8192, 4096, 128256), "mid": (4096, 2048, 65536)}
OPTS = dict(ignore_index=-100, softcap=None, inv_temperature=1.0)


def bench(fn, rep=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median") / 1e3


def inputs(n, d, v, dtype):
    torch.manual_seed(0)
    h = torch.randn(n, d, device="cuda", dtype=dtype)
    w = (torch.randn(v, d, device="cuda") / d**0.5).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    return h, w, t, g


def breakdown(name, n, d, v, dtype):
    h, w, t, g = inputs(n, d, v, dtype)
    flop = 2 * n * d * v
    res = {"shape": name, "n": n, "d": d, "v": v, "dtype": str(dtype).split(".")[-1]}
    buf = {"logits": torch.empty(n, v, device="cuda", dtype=dtype)}
    res["cublas_gemm"] = bench(lambda: torch.mm(h, w.T, out=buf["logits"]))
    buf.clear()
    fwd = lambda: lt.logprobs_forward(h, w, None, t, with_entropy=False, **OPTS)  # noqa: E731
    res["triton_fwd"] = bench(fwd)
    _, rmax, _, logs = fwd()
    def bwd():
        return lt.logprobs_backward(h, w, None, t, rmax, logs, None, g, None, None, **OPTS)
    res["triton_bwd"] = bench(bwd)
    # Each backward kernel alone: the other one launched on an empty problem (V or N = 0
    # would skip both), approximated by timing the whole backward with one kernel stubbed.
    orig = lt.launch

    def only(keep):
        def launch(kname, *a, **k):
            if kname == keep:
                return orig(kname, *a, **k)
        return launch
    for k in ("bwd_dh", "bwd_dw"):
        lt.launch = only(k)
        try:
            res[f"triton_{k}"] = bench(bwd)
        finally:
            lt.launch = orig

    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()

    def naive():
        hh.grad = ww.grad = None
        lp = torch.log_softmax((hh @ ww.T).float(), -1).gather(1, t[:, None])[:, 0]
        (lp * g).sum().backward()
    try:
        res["naive_fwd_bwd"] = bench(naive, rep=200)
    except torch.OutOfMemoryError:
        res["naive_fwd_bwd"] = None
    torch.cuda.empty_cache()
    # The chunked backend ("triton"): its default chunk budget, then a few others.
    cfwd = lambda: ch.logprobs_forward(h, w, None, t, with_entropy=False, **OPTS)  # noqa: E731
    _, rm2, _, ls2 = cfwd()
    cbwd = lambda: ch.logprobs_backward(h, w, None, t, rm2, ls2, None, g, None,  # noqa: E731
                                        None, **OPTS)
    res["chunked_fwd"] = bench(cfwd)
    res["chunked_bwd"] = bench(cbwd)
    res["chunked_cols"] = ch.chunk_columns(n, v, h.element_size())
    saved = ch.CHUNK_FRACTION, ch.CHUNK_BYTES_MIN
    try:
        for frac in (0.005, 0.05, 0.15):
            ch.CHUNK_FRACTION, ch.CHUNK_BYTES_MIN = frac, 0
            res[f"chunked_fwd_bwd@{frac}"] = bench(cfwd) + bench(cbwd)
    finally:
        ch.CHUNK_FRACTION, ch.CHUNK_BYTES_MIN = saved
    res["chunked_fwd_x_gemm"] = res["chunked_fwd"] / res["cublas_gemm"]
    res["chunked_bwd_x_gemm"] = res["chunked_bwd"] / res["cublas_gemm"]
    res["triton_fwd_bwd"] = res["triton_fwd"] + res["triton_bwd"]
    res["gemm_tflops"] = flop / res["cublas_gemm"] / 1e12
    for k in ("triton_fwd", "triton_bwd_dh", "triton_bwd_dw"):
        res[k + "_x_gemm"] = res[k] / res["cublas_gemm"]
    return res


def sweep(name, n, d, v, dtype, budget_s=60.0):
    """Times a grid of configs per kernel; returns {kernel: [(time, cfg), ...] best first}."""
    h, w, t, g = inputs(n, d, v, dtype)
    _, rmax, _, logs, _ = lt.logprobs_forward(h, w, None, t, with_entropy=False, **OPTS)
    key = "fp32" if dtype == torch.float32 else "half"
    grid = [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=nw, num_stages=ns)
            for bn, bv, bd, nw, ns in itertools.product(
                (64, 128), (64, 128, 256), (32, 64) if key == "half" else (16, 32),
                (4, 8), (2, 3, 4))]
    calls = {
        "fwd": lambda: lt.logprobs_forward(h, w, None, t, with_entropy=False, **OPTS),
        "bwd_dh": lambda: lt.logprobs_backward(h, w, None, t, rmax, logs, None, g, None, None,
                                               **OPTS),
        "bwd_dw": lambda: lt.logprobs_backward(h, w, None, t, rmax, logs, None, g, None, None,
                                               **OPTS),
    }
    out = {}
    orig = lt.launch
    for kname, call in calls.items():
        saved = dict(lt.DEFAULT_CONFIGS[kname][key])
        other = {"bwd_dh": "bwd_dw", "bwd_dw": "bwd_dh"}.get(kname)

        def launch(kn, *a, **k):
            if kn == other:
                return None
            return orig(kn, *a, **k)
        lt.launch = launch
        timings = []
        t0 = time.time()
        try:
            for cfg in grid:
                if time.time() - t0 > budget_s:
                    break
                lt.DEFAULT_CONFIGS[kname][key] = cfg
                try:
                    timings.append((bench(call, rep=100), cfg))
                except Exception as e:  # out of shared memory / registers for this config
                    timings.append((float("inf"), dict(cfg, error=type(e).__name__)))
        finally:
            lt.DEFAULT_CONFIGS[kname][key] = saved
            lt.launch = orig
        timings.sort(key=lambda x: x[0])
        out[kname] = timings[:5]
        print(f"sweep {name} {dtype} {kname}: tried {len(timings)}; best "
              + "; ".join(f"{tt * 1e3:.3f} ms {c}" for tt, c in timings[:3]), flush=True)
    return out


ROW_CANDIDATES = [(1, 2048, 4), (1, 4096, 8), (2, 2048, 8), (4, 1024, 4), (4, 2048, 8),
                  (8, 512, 4), (8, 1024, 8), (16, 512, 8), (16, 1024, 8), (32, 256, 8)]


def row_sweep(shapes, dtype, env_out=None):
    """Times the chunked backend's row kernels over ROW_CANDIDATES (the GEMMs are the same
    in every run, so differences are the row kernels'); prints and optionally writes the
    best per kernel as DPO_FAST_ROW_CONFIG_FWD / _BWD lines for a shell to source."""
    import os

    totals = {"fwd": {}, "bwd": {}}
    for s in shapes:
        n, d, v = SHAPES[s]
        h, w, t, g = inputs(n, d, v, dtype)
        _, rm, _, ls, _ = ch.logprobs_forward(h, w, None, t, with_entropy=False, **OPTS)
        for cfg in ROW_CANDIDATES:
            val = ",".join(map(str, cfg))
            os.environ["DPO_FAST_ROW_CONFIG_FWD"] = os.environ["DPO_FAST_ROW_CONFIG_BWD"] = val
            try:
                tf = bench(lambda: ch.logprobs_forward(h, w, None, t, with_entropy=True, **OPTS))
                tb = bench(lambda: ch.logprobs_backward(h, w, None, t, rm, ls, None, g, None,
                                                        None, **OPTS))
            except Exception as e:
                print(f"row config {cfg}: {type(e).__name__}", flush=True)
                tf = tb = float("inf")
            totals["fwd"][cfg] = totals["fwd"].get(cfg, 0.0) + tf
            totals["bwd"][cfg] = totals["bwd"].get(cfg, 0.0) + tb
            print(f"rows {s} {cfg}: fwd {tf * 1e3:.3f} ms bwd {tb * 1e3:.3f} ms", flush=True)
    os.environ.pop("DPO_FAST_ROW_CONFIG_FWD", None)
    os.environ.pop("DPO_FAST_ROW_CONFIG_BWD", None)
    best = {k: min(v, key=v.get) for k, v in totals.items()}
    print(f"best row configs (sum over {shapes}): {best}; default {ch.ROW_CONFIGS}", flush=True)
    if env_out:
        with open(env_out, "w") as f:
            for k, cfg in best.items():
                f.write(f"export DPO_FAST_ROW_CONFIG_{k.upper()}={','.join(map(str, cfg))}\n")
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--shapes", default="smol,llama")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-budget", type=float, default=60.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--row-sweep", metavar="ENV_FILE", default=None,
                    help="only sweep the chunked backend's row-kernel configs")
    a = ap.parse_args()
    if a.row_sweep:
        row_sweep(a.shapes.split(","), getattr(torch, a.dtypes.split(",")[0]), a.row_sweep)
        return
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    results = {"breakdown": [], "sweep": []}
    for dt_name in a.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        for s in a.shapes.split(","):
            n, d, v = SHAPES[s]
            r = breakdown(s, n, d, v, dtype)
            results["breakdown"].append(r)
            print(json.dumps(r), flush=True)
    if a.sweep:
        for dt_name in a.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            for s in a.shapes.split(","):
                n, d, v = SHAPES[s]
                results["sweep"].append({"shape": s, "dtype": dt_name,
                                         "best": sweep(s, n, d, v, dtype, a.sweep_budget)})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print("\nshape dtype | gemm ms (TFLOP/s) | chunked fwd, bwd x gemm | chunked ms | "
          "fused fwd, dh, dw x gemm | fused ms | naive ms")
    for r in results["breakdown"]:
        nv = r["naive_fwd_bwd"]
        print(f"{r['shape']} {r['dtype']} | {r['cublas_gemm'] * 1e3:.3f} ({r['gemm_tflops']:.0f}) | "
              f"{r['chunked_fwd_x_gemm']:.2f}, {r['chunked_bwd_x_gemm']:.2f} | "
              f"{(r['chunked_fwd'] + r['chunked_bwd']) * 1e3:.2f} | "
              f"{r['triton_fwd_x_gemm']:.2f}, {r['triton_bwd_dh_x_gemm']:.2f}, "
              f"{r['triton_bwd_dw_x_gemm']:.2f} | {r['triton_fwd_bwd'] * 1e3:.2f} | "
              f"{nv * 1e3 if nv else float('nan'):.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
