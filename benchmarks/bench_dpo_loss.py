"""Benchmark: the DPO loss layer (hidden states -> sigmoid DPO loss, fwd+bwd), side by side.

B pairs of T tokens (2B sequences, chosen first), D hidden, V vocab, fp32; the first
``--prompt-len`` positions of every sequence are prompt (ignore_index). Methods, each case in
a fresh process:
  naive            full [2B*T, V] logits -> log_softmax -> gather -> masked sums -> DPO loss
  dpo_fast         dpo_fast.fused_preference_loss_padded with its defaults (reference log-probs
                   given, i.e. from the cache: no reference GEMM). On the C++ CPU backend that
                   is the chunk engine with the default 40 MiB scratch: the gradient is formed
                   during the forward, one pair at a time, and the logits of the vocabulary
                   tiles that fit in the scratch are kept instead of recomputed (4 - f GEMMs,
                   f = the kept fraction of a pair's logits)
  dpo_fast-flat    the same with max_scratch_bytes=None: pure recompute (4 GEMMs, O(N + tile))
  dpo_fast-scratch the same with max_scratch_bytes = one pair's [2T, V] fp32 logits (3 GEMMs)
  liger+ref        Liger LigerFusedLinearDPOLoss(use_ref_model=True), the same hidden states
                   passed as reference input (its only way to take a reference: a second pass)
  liger-noref      Liger with use_ref_model=False (no reference term; a lower bound on its time)
  cce              cut_cross_entropy.linear_cross_entropy(reduction="none", torch_compile)
                   per-token NLL -> masked sums -> DPO loss with the given reference log-probs

On CUDA (``--device cuda``, e.g. ``--dtype bfloat16``) times are do_bench medians and extra
memory is the CUDA allocator's peak above inputs and gradients; CCE uses its Triton impl.

Timing on the CPU: --rounds rounds, each running every method once (a fresh process, two
warm-up steps, then --reps timed steps), so a slow spell of this shared machine hits every
method alike; the table gives the median over all timed steps and the largest extra-memory
reading.

``--frozen-head`` freezes the LM head (as under LoRA): no method computes a weight gradient.

Writes benchmarks/results/dpo_loss_<device>[_<dtype>]_p<prompt>[_frozen].{json,md} (no dtype
suffix for the CPU fp32 default).

    python benchmarks/bench_dpo_loss.py [--prompt-len 0] [--rounds 3] [--reps 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

if __name__ == "__main__":  # run from a checkout: the repo's dpo_fast, as the workers see it
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

METHODS = ["naive", "dpo_fast", "dpo_fast-flat", "dpo_fast-scratch", "liger+ref", "liger-noref",
           "cce"]
# The scratch-budget operating point: room for one pair's [2T, V] fp32 logits.
SCRATCH_PAIRS = 1
BETA = 0.1


def _dpo_from_token_logps(tok_logps, targets, ref_logps, b):
    """tok_logps [2B, T] (0 where ignored) -> sigmoid DPO loss with reference [2B]."""
    seq = tok_logps.sum(-1)
    h = (seq[:b] - ref_logps[:b]) - (seq[b:] - ref_logps[b:])
    return -F.logsigmoid(BETA * h).mean()


def make_fn(method: str, b: int, device: str = "cpu"):
    """f(hidden [2B,T,D], weight [V,D], targets [2B,T], ref [2B]) -> scalar loss."""
    if method == "naive":
        def f(h, w, t, ref):
            logits = (h @ w.T).float()
            lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
            return _dpo_from_token_logps(lp * (t != -100), t, ref, b)
        return f
    if method.startswith("dpo_fast"):
        import dpo_fast

        def f(h, w, t, ref):
            budget = {"dpo_fast": "auto", "dpo_fast-flat": None}.get(method)
            if method == "dpo_fast-scratch":
                budget = SCRATCH_PAIRS * 2 * t.shape[1] * w.shape[0] * 4
            return dpo_fast.fused_preference_loss_padded(
                h, w, t, ref, beta=BETA, impl="auto", max_scratch_bytes=budget).loss
        return f
    if method.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        use_ref = method == "liger+ref"
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=use_ref)

        def f(h, w, t, ref):
            if use_ref:
                out = loss_fn(w, h, t, ref_input=h.detach(), ref_weight=w.detach())
            else:
                out = loss_fn(w, h, t)
            return out[0] if isinstance(out, tuple) else out
        return f
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def f(h, w, t, ref):
            nll = linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, t.reshape(-1),
                                       reduction="none",
                                       impl="cce" if device == "cuda" else "torch_compile")
            return _dpo_from_token_logps(-nll.view(t.shape) * (t != -100), t, ref, b)
        return f
    raise ValueError(method)


def worker(method, b, t, d, v, prompt, reps, device="cpu", dtype="float32", frozen_head=False):
    harness.disable_thp()
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    if device == "cpu":
        torch.set_num_threads(2)
    hidden = torch.randn(2 * b, t, d, device=device).to(dt).requires_grad_()
    weight = (torch.randn(v, d, device=device) / d**0.5).to(dt).requires_grad_(not frozen_head)
    targets = torch.randint(0, v, (2 * b, t), device=device)
    targets[:, :prompt] = -100
    ref = -torch.rand(2 * b, device=device) * 50 - 100
    fn = make_fn(method, b, device)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, ref).backward()

    step()  # warm-up (torch.compile, thread pools)
    step()
    if device == "cuda":
        import triton.testing

        ts = sorted(triton.testing.do_bench(step, rep=500, return_mode="all"))
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))] / 1e3  # noqa: E731
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        hidden.grad = weight.grad = None
        base = torch.cuda.memory_allocated() + hidden.numel() * hidden.element_size() + \
            weight.numel() * weight.element_size()  # the gradients, resident between steps
        fn(hidden, weight, targets, ref).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        return {"method": method, "time": q(0.5), "p20": q(0.2), "p80": q(0.8),
                "extra_bytes": extra}
    t_all = harness.time_fn(step, reps)
    hidden.grad.fill_(1.0)
    if not frozen_head:
        weight.grad.fill_(1.0)
    base = harness.rss_bytes()
    hidden.grad = weight.grad = None
    harness.reset_hwm()
    fn(hidden, weight, targets, ref).backward()
    extra = harness.hwm_bytes() - base
    return {"method": method, "time": t_all["median"], "p20": t_all["p20"], "p80": t_all["p80"],
            "times": t_all["times"], "extra_bytes": extra}


def kept_fraction(a) -> float:
    """Fraction of a pair's logits the default dpo_fast run keeps from its forward (0 when
    that run is memory-flat: not the C++ CPU backend)."""
    if a.device != "cpu":
        return 0.0
    import dpo_fast
    from dpo_fast.kernels import dpo_scratch, logprobs_cpu
    from dpo_fast.ops.dpo_loss import DEFAULT_CPU_SCRATCH_BYTES

    if not logprobs_cpu.available():
        return 0.0
    del dpo_fast
    torch.set_num_threads(2)  # as the workers
    rows = 2 * (a.seq - a.prompt_len)
    rows_per_chunk = max(rows, -(-dpo_scratch.MIN_CHUNK_ROWS // rows) * rows)
    _, cols, _ = dpo_scratch.cpp_store_plan(rows_per_chunk, a.vocab, DEFAULT_CPU_SCRATCH_BYTES)
    return cols / a.vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prompt-len", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--frozen-head", action="store_true",
                    help="LM head frozen (as under LoRA): no weight gradient for any method")
    ap.add_argument("--worker", metavar="METHOD")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.pairs, a.seq, a.dim, a.vocab, a.prompt_len, a.reps,
                                a.device, a.dtype, a.frozen_head)))
        return
    peak = harness.peak_matmul_gflops(a.device, dtype=getattr(torch, a.dtype))
    print(f"peak {a.dtype} matmul: {peak:.1f} GFLOP/s", flush=True)
    shape = ["--pairs", str(a.pairs), "--seq", str(a.seq), "--dim", str(a.dim), "--vocab",
             str(a.vocab), "--prompt-len", str(a.prompt_len), "--reps", str(a.reps),
             "--device", a.device, "--dtype", a.dtype] + ["--frozen-head"] * a.frozen_head
    methods = a.methods.split(",")
    runs = {m: [] for m in methods}
    for rnd in range(a.rounds if a.device == "cpu" else 1):
        for m in methods:
            r = harness.run_worker(Path(__file__), [m] + shape)
            print(json.dumps(dict(r, method=m, round=rnd)), flush=True)
            runs[m].append(r)
    results = [harness.merge_rounds(m, runs[m]) for m in methods]
    n_tok = 2 * a.pairs * a.seq
    n_resp = 2 * a.pairs * (a.seq - a.prompt_len)
    gemm = 2 * a.dim * a.vocab
    kept = kept_fraction(a)
    by = {r["method"]: r for r in results if "time" in r}
    rows = []
    for r in results:
        if "time" not in r:
            rows.append([r["method"], "", "error: " + r.get("error", "?")] + [""] * 6)
            continue
        # Executed GEMM FLOPs: full-logits methods 3 GEMMs over all tokens (+1 forward for
        # Liger's reference pass); dpo_fast 4 - f GEMMs over response tokens only (f = the
        # fraction of logits kept from the forward). A frozen head drops every dW GEMM.
        n_gemm = {"naive": 3 * n_tok, "liger+ref": 4 * n_tok, "liger-noref": 3 * n_tok,
                  "cce": 3 * n_resp, "dpo_fast": (4 - kept) * n_resp,
                  "dpo_fast-flat": 4 * n_resp, "dpo_fast-scratch": 3 * n_resp}[r["method"]]
        if a.frozen_head:
            n_gemm -= n_resp if r["method"] in ("cce",) or r["method"].startswith("dpo") \
                else n_tok
        flops = n_gemm * gemm
        ratio = lambda k, key: (harness.fmt(r[key] / by[k][key], ".2f")  # noqa: E731
                                if k in by and by[k][key] > 0 else "—")
        rows.append([r["method"], harness.fmt(n_gemm / max(n_resp, 1), ".2f"),
                     harness.fmt(r["time"]), ratio("naive", "time"),
                     ratio("liger+ref", "time"), ratio("liger-noref", "time"),
                     harness.fmt(flops / r["time"] / 1e9, ".0f"),
                     harness.fmt(r["extra_bytes"] / 2**20, ".1f"),
                     ratio("liger+ref", "extra_bytes")])
    info = harness.machine()
    cuda = a.device == "cuda"
    md = (f"# DPO loss layer, fwd+bwd ({a.device}, {a.dtype}): B={a.pairs} pairs, T={a.seq}, "
          f"D={a.dim}, V={a.vocab}, prompt={a.prompt_len} of {a.seq} positions ignored"
          + (", LM head frozen (no weight gradient, as under LoRA)" * a.frozen_head) + "\n\n"
          f"Machine: {info}. Peak {a.dtype} matmul {peak:.1f} GFLOP/s. "
          + ("Median over do_bench's repetitions (0.5 s). Extra memory: CUDA allocator peak "
             "above inputs and gradients.\n\n" if cuda else
             f"Median of {a.rounds} rounds x {a.reps} steps, methods interleaved (a fresh process "
             "per method and round). Extra memory: steady-state RSS peak above inputs and "
             "gradients (largest over rounds). GEMMs: executed [tokens x D x V] GEMMs per "
             f"response token (dpo_fast keeps {kept:.1%} of a pair's logits in its default "
             "scratch).\n\n"))
    md += harness.md_table(["method", "GEMMs", "fwd+bwd s", "x naive", "x liger+ref", "x liger-noref",
                            "GFLOP/s (executed)", "extra MiB", "extra x liger+ref"], rows)
    suffix = "" if (a.device, a.dtype) == ("cpu", "float32") else f"_{a.dtype}"
    harness.write_results(f"dpo_loss_{a.device}{suffix}_p{a.prompt_len}"
                          + "_frozen" * a.frozen_head,
                          {"machine": info, "peak_gflops": peak, "args": vars(a),
                           "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
