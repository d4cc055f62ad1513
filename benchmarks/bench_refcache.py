"""Benchmark: the reference log-prob cache (issue 4's "Speed" requirement), on the real model.

Model and data: SmolLM2-135M-Instruct in fp32 (``dpo_fast.assets.load_smollm2``) and the first
``--pairs`` Rotten Tomatoes train pairs (``rotten_tomatoes_pairs``), tokenized with
``dpo_fast.tokenize_dataset(tok, rows, max_length=--max-length)``. CPU, 2 threads.

1. Precompute throughput. All three methods run over exactly the same batches: the cache's
   own plan (``dpo_fast.refcache.plan.make_plan``: unique examples, longest first, cut at
   ``--batch-tokens`` padded tokens) packed by ``dpo_fast.pack_pair_batch`` (2R right-padded
   sequences per batch; packing is inside the timed region for all three).

     plain (logits only)  ``torch.no_grad()``, eval mode, ``model(input_ids, attention_mask,
                          use_cache=False)`` producing the full [2R, T, V] logits: the
                          strictest baseline (no log-prob extraction at all)
     plain forward        the same plus the minimal extraction a user would write:
                          ``log_softmax`` (fp32) -> ``gather`` the targets -> masked sum per
                          sequence; its sums are compared with the cache's values (max |diff|)
     dpo_fast build       ``RefLogProbCache.build(model, examples, dir, batch_tokens=...,
                          tokenizer=tok, max_length=...)`` end to end: fingerprint (weight
                          sample hash, tokenizer hash), plan, the one-example head check,
                          forward through the body + fused ``linear_logprobs`` under
                          ``torch.inference_mode``, exact fsum of each row, safetensors shards
                          and manifest written to temp names, fsync'd, renamed, and the final
                          ``open`` (SHA-256 of every shard)

   Each (method, repetition) is a fresh process (``harness.run_worker``); each process loads
   the model, runs one warm-up (the plan's first batch; for the build, a build of that
   batch's examples into a separate directory, which also loads the C++ extension), then
   times one full pass. Repetitions are interleaved (rep 1 of every method, then rep 2, ...)
   so load drift from other processes hits all methods alike. Reported: the median of
   ``--reps`` processes; throughput counts real (non-pad) tokens of both sequences (the
   prompt twice); ratio = build tokens/s / plain tokens/s (the issue's target: >= 0.9).

2. Lookup cost per training step (one more fresh process, on the cache directory the last
   build repetition wrote):
     - ``RefLogProbCache.open(dir, expect=fingerprint)`` time (reads every shard, checks its
       size and SHA-256, sorts the key index), median of 20 opens; and ``fingerprint(model,
       tok, max_length=...)`` time (a trainer computes it once at start);
     - ``cache.lookup(keys)`` for training batches of ``--step-pairs`` random pairs, median
       over ``--lookup-calls`` calls cycling through 64 distinct batches, keys given as
       ``PreferenceExample``s (key already hashed: the steady state from epoch 2 on), fresh
       ``PreferenceExample``s (key SHA-256 computed inside the call: epoch 1), hex strings,
       and a uint8 [B, 16] array;
     - the same lookups on a synthetic cache of ``--synthetic-rows`` rows (built with a tiny
       random Llama, so the index is of realistic size; only the row count matters to open
       and lookup);
     - one training step on the same model for a batch of ``--step-pairs`` pairs: body forward
       to hidden states (train mode) -> ``dpo_fast.fused_preference_loss_padded`` (impl
       "auto", sigmoid DPO, beta 0.1, the looked-up reference log-probs) -> ``backward``;
       median of 3 steps after one warm-up (the step's own lookup included). NO optimizer in
       that step (the strictest
       denominator); an AdamW ``step()`` + ``zero_grad`` is timed separately (median of 3 after
       one warm-up) and the ratio to the full step (fwd+bwd+AdamW) is shown too. Target:
       lookup / step < 1%.

Defaults (64 pairs = 5,526 real tokens, batch_tokens 2048 so the plain forward's logits stay
<= 0.4 GB a batch) keep the whole run at about 5 minutes on the 2-core machine when it is
otherwise idle; ``--pairs 256`` takes about 4x as long. Workers run with glibc's default
allocator settings (see ``_DEFAULT_MALLOC``). The report gives the load average before and
after and the CPU time other processes took during each worker run (/proc/stat busy time
minus this benchmark's own rusage): on a 2-core machine a concurrent job makes the OpenMP
forwards several times slower, so a run with other work > 0.1 cores is flagged as busy.

Writes benchmarks/results/refcache_cpu.{json,md} (atomically; the JSON holds every run's raw
numbers).

    python benchmarks/bench_refcache.py [--pairs 64] [--batch-tokens 2048] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PRECOMPUTE = ["plain-logits", "plain", "build"]
LABELS = {"plain-logits": "plain forward (logits only)", "plain": "plain forward + log-probs",
          "build": "dpo_fast build (end to end)"}
IGNORE = -100
BETA = 0.1
# harness.run_worker sets MALLOC_MMAP_THRESHOLD_ (for RSS readings); a fixed threshold turns
# off glibc's dynamic one, so every mid-size activation becomes a fresh mmap + page faults
# (~15% slower forwards here). This benchmark times, it measures no memory: its workers
# re-exec with the allocator's defaults unless the user set the variable.
_DEFAULT_MALLOC = "_BENCH_REFCACHE_DEFAULT_MALLOC"


# ----------------------------------------------------------------------------- setup


def _setup(a):
    """(model, tokenizer, examples, plan batches) the same way in every worker."""
    from dpo_fast import tokenize_dataset
    from dpo_fast.assets import load_smollm2, rotten_tomatoes_pairs
    from dpo_fast.refcache.plan import make_plan, unique_examples

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    train, _ = rotten_tomatoes_pairs()
    examples, dropped = tokenize_dataset(tok, train[: a.pairs], max_length=a.max_length)
    vocab = model.get_output_embeddings().weight.shape[0]
    plan = make_plan(unique_examples(examples, vocab), batch_tokens=a.batch_tokens,
                     rows_per_shard=4096, per_token=False, first_shard=0)
    batches = [plan.examples[i:j] for shard in plan.shards for i, j in shard]
    return model, tok, examples, plan, batches, dropped


def _counts(batches):
    real = sum(ex.num_tokens for b in batches for ex in b)
    padded = sum(2 * len(b) * max(ex.max_sequence_length for ex in b) for b in batches)
    return real, padded


# ----------------------------------------------------------------------------- workers


def worker_plain(a, extract: bool) -> dict:
    from dpo_fast import pack_pair_batch

    model, _, _, _, batches, _ = _setup(a)
    model.eval()

    def run(bs):
        chosen, rejected = [], []
        with torch.no_grad():
            for exs in bs:
                b = pack_pair_batch(exs)
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                               use_cache=False).logits
                if extract:
                    t = b.targets
                    lp = torch.log_softmax(logits.float(), -1)
                    tok_lp = lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    sums = (tok_lp * (t != IGNORE)).sum(-1)
                    r = len(exs)
                    chosen += sums[:r].tolist()
                    rejected += sums[r:].tolist()
                del logits
        return chosen + rejected

    run(batches[:1])  # warm-up
    t0 = time.perf_counter()
    values = run(batches)
    dt = time.perf_counter() - t0
    real, padded = _counts(batches)
    out = {"time": dt, "real_tokens": real, "padded_tokens": padded, "batches": len(batches),
           "rows": sum(len(b) for b in batches)}
    if extract:
        out["values"] = values
    return out


def worker_build(a) -> dict:
    import dpo_fast

    model, tok, examples, plan, batches, _ = _setup(a)
    root = Path(a.out_dir)
    kw = dict(batch_tokens=a.batch_tokens, tokenizer=tok, max_length=a.max_length)
    dpo_fast.RefLogProbCache.build(model, batches[0], root / "warmup", **kw)  # warm-up
    shutil.rmtree(root / "warmup")
    marks = {}

    def progress(p):
        if p.event in ("start", "done"):
            marks[p.event] = time.perf_counter()

    t0 = time.perf_counter()
    cache = dpo_fast.RefLogProbCache.build(model, examples, root / "cache", progress=progress,
                                           **kw)
    dt = time.perf_counter() - t0
    real, padded = _counts(batches)
    assert cache.last_build.tokens_computed == real, (cache.last_build, real)
    c, r = cache.lookup(plan.examples, split=True)
    files = sorted((root / "cache").iterdir())
    return {"time": dt, "real_tokens": real, "padded_tokens": padded, "batches": len(batches),
            "rows": len(cache), "values": c.tolist() + r.tolist(),
            "setup_s": marks["start"] - t0, "compute_write_s": marks["done"] - marks["start"],
            "final_open_s": t0 + dt - marks["done"],
            "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def _time_calls(fn, args_list, calls, warm=4):
    """Median / p20 / p80 seconds of fn(args) over ``calls`` calls cycling ``args_list``
    (after ``warm`` warm-up calls on its first items; timing starts at item ``warm``)."""
    for x in args_list[:warm]:
        fn(x)
    ts = []
    for i in range(calls):
        x = args_list[(warm + i) % len(args_list)]
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    q = lambda f: ts[int(round(f * (len(ts) - 1)))]  # noqa: E731
    return {"median": statistics.median(ts), "p20": q(0.2), "p80": q(0.8), "calls": calls}


def _lookup_cases(cache, examples, b, calls, rng):
    """Lookup timings for 64 random batches of ``b`` examples in the four key forms."""
    from dpo_fast import PreferenceExample

    idx = [rng.choice(len(examples), size=b, replace=len(examples) < b) for _ in range(64)]
    as_ex = [[examples[i] for i in ix] for ix in idx]
    for bx in as_ex:  # the key hash is cached on the example after the first use
        [ex.key_bytes for ex in bx]
    as_hex = [[ex.key for ex in bx] for bx in as_ex]
    as_arr = [np.frombuffer(b"".join(ex.key_bytes for ex in bx), np.uint8).reshape(-1, 16)
              for bx in as_ex]
    fresh = [[PreferenceExample(ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) for ex in bx]
             for _ in range(max(1, calls // 64 + 1)) for bx in as_ex]
    out = {
        "examples": _time_calls(cache.lookup, as_ex, calls),
        "examples_unhashed": _time_calls(cache.lookup, fresh, min(calls, len(fresh) - 4)),
        "hex": _time_calls(cache.lookup, as_hex, calls),
        "uint8": _time_calls(cache.lookup, as_arr, calls),
    }
    ref = cache.lookup(as_ex[0])
    assert torch.equal(ref, cache.lookup(as_hex[0])) and torch.equal(ref, cache.lookup(fresh[0]))
    return out


def _synthetic_cache(rows: int, root: Path):
    """A cache of ``rows`` rows built with a tiny random Llama (only the row count matters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import dpo_fast

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    tiny = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, size=(rows, 6), dtype=np.int32)
    exs = [dpo_fast.PreferenceExample(r[:3], r[3:5], r[5:6]) for r in ids]
    t0 = time.perf_counter()
    dpo_fast.RefLogProbCache.build(tiny, exs, root, batch_tokens=16384)
    return exs, time.perf_counter() - t0


def worker_lookup(a) -> dict:
    import dpo_fast
    from dpo_fast import pack_pair_batch
    from dpo_fast.refcache import fingerprint

    model, tok, examples, _, _, _ = _setup(a)
    path = Path(a.out_dir) / "cache"
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    fp = fingerprint(model, tok, max_length=a.max_length)
    fp_s = time.perf_counter() - t0
    opens = harness.time_fn(lambda: dpo_fast.RefLogProbCache.open(path, expect=fp), 20)
    cache = dpo_fast.RefLogProbCache.open(path, expect=fp)
    res = {"fingerprint_s": fp_s, "open": opens, "rows": len(cache),
           "cache_bytes": sum(f.stat().st_size for f in path.iterdir()),
           "lookup": _lookup_cases(cache, examples, a.step_pairs, a.lookup_calls, rng)}

    if a.synthetic_rows:
        syn_path = Path(a.out_dir) / "synthetic"
        syn_ex, build_s = _synthetic_cache(a.synthetic_rows, syn_path)
        syn = dpo_fast.RefLogProbCache.open(syn_path)
        res["synthetic"] = {
            "rows": len(syn), "build_s": build_s,
            "cache_bytes": sum(f.stat().st_size for f in syn_path.iterdir()),
            "open": harness.time_fn(lambda: dpo_fast.RefLogProbCache.open(syn_path), 10),
            "lookup": _lookup_cases(syn, syn_ex, a.step_pairs, a.lookup_calls, rng)}
        shutil.rmtree(syn_path)

    # one training step of a batch of step_pairs random pairs
    ix = rng.choice(len(examples), size=a.step_pairs, replace=False)
    exs = [examples[i] for i in ix]
    b = pack_pair_batch(exs)
    body = model.get_decoder()
    weight = model.get_output_embeddings().weight
    model.train()

    def step():
        ref = cache.lookup(exs)
        h = body(input_ids=b.input_ids, attention_mask=b.attention_mask,
                 use_cache=False).last_hidden_state
        loss = dpo_fast.fused_preference_loss_padded(h, weight, b.targets, ref, beta=BETA,
                                                     impl="auto").loss
        loss.backward()

    step()  # warm-up
    model.zero_grad(set_to_none=False)
    res["step"] = harness.time_fn(step, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=False)

    opt_step()  # warm-up (allocates the moments)
    res["adamw"] = harness.time_fn(opt_step, 3)
    res["step_tokens"] = int(b.attention_mask.sum())
    res["step_padded_tokens"] = int(b.input_ids.numel())
    return res


# ----------------------------------------------------------------------------- driver


def _loadavg():
    return [round(x, 2) for x in os.getloadavg()]


class _OtherCpu:
    """CPU time the machine spent on processes other than this benchmark (this process and
    its waited-for workers) since construction: busy time from /proc/stat minus our rusage."""

    def __init__(self):
        self.t0, self.ours0 = time.perf_counter(), self._ours()
        self.busy0, self.steal0 = self._stat()

    @staticmethod
    def _stat() -> tuple:
        """(busy, steal) CPU seconds of the whole machine from /proc/stat."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy = all but idle/iowait/steal
        hz = os.sysconf("SC_CLK_TCK")
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, v[7] / hz

    @staticmethod
    def _ours() -> float:
        import resource

        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def cores(self) -> float:
        """Average number of cores used by other processes since construction."""
        wall = time.perf_counter() - self.t0
        other = (self._stat()[0] - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, other) / max(wall, 1e-9)

    def steal(self) -> float:
        """Average number of cores the hypervisor took away (steal time) since construction."""
        return (self._stat()[1] - self.steal0) / max(time.perf_counter() - self.t0, 1e-9)


def _med(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def _us(x):
    return harness.fmt(None if x is None else x * 1e6, ".1f")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="Rotten Tomatoes train pairs")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=2048,
                    help="padded tokens per forward (the build's batch_tokens)")
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-pairs", type=int, default=8, help="pairs per training batch (B)")
    ap.add_argument("--lookup-calls", type=int, default=2000)
    ap.add_argument("--synthetic-rows", type=int, default=65536,
                    help="rows of the synthetic cache for open/lookup at scale (0: skip)")
    ap.add_argument("--methods", default=",".join(PRECOMPUTE))
    ap.add_argument("--no-lookup", action="store_true")
    ap.add_argument("--tmp-dir", default=None, help="where caches are written (default: $TMPDIR)")
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--worker", metavar="MODE", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        if os.environ.get(_DEFAULT_MALLOC) == "1" and "MALLOC_MMAP_THRESHOLD_" in os.environ:
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            os.execve(sys.executable, [sys.executable] + sys.argv, env)
        fn = {"plain-logits": lambda: worker_plain(a, False),
              "plain": lambda: worker_plain(a, True),
              "build": lambda: worker_build(a), "lookup": lambda: worker_lookup(a)}[a.worker]
        out = fn()
        out["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        print(json.dumps(out))
        return

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ[_DEFAULT_MALLOC] = "1"
    t_start = time.perf_counter()
    other_all = _OtherCpu()
    load_before = _loadavg()
    methods = a.methods.split(",")
    common = ["--pairs", str(a.pairs), "--max-length", str(a.max_length), "--batch-tokens",
              str(a.batch_tokens), "--threads", str(a.threads), "--step-pairs",
              str(a.step_pairs), "--lookup-calls", str(a.lookup_calls), "--synthetic-rows",
              str(a.synthetic_rows)]
    tmp_root = Path(tempfile.mkdtemp(prefix="bench_refcache_", dir=a.tmp_dir))
    runs = {m: [] for m in methods}
    lookup = None
    try:
        for rep in range(a.reps):
            for m in methods:
                d = tmp_root / f"{m}-{rep}"
                d.mkdir()
                oc = _OtherCpu()
                r = harness.run_worker(Path(__file__), [m, "--out-dir", str(d)] + common)
                r.update(method=m, rep=rep, load=_loadavg(), other_cores=round(oc.cores(), 3),
                         steal_cores=round(oc.steal(), 3))
                print(json.dumps({k: v for k, v in r.items() if k != "values"}), flush=True)
                runs[m].append(r)
                if not (m == "build" and rep == a.reps - 1):
                    shutil.rmtree(d)
        last_build = tmp_root / f"build-{a.reps - 1}"
        if not a.no_lookup and (last_build / "cache").exists():
            oc = _OtherCpu()
            lookup = harness.run_worker(Path(__file__),
                                        ["lookup", "--out-dir", str(last_build)] + common)
            lookup.update(other_cores=round(oc.cores(), 3), steal_cores=round(oc.steal(), 3))
            print(json.dumps(lookup), flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    load_after = _loadavg()
    other_cores, steal_cores = other_all.cores(), other_all.steal()
    wall = time.perf_counter() - t_start

    # ---- precompute summary
    summary = {}
    for m in methods:
        ok = [r for r in runs[m] if "time" in r]
        if not ok:
            continue
        t = _med(ok, "time")
        summary[m] = {"time": t, "min": min(r["time"] for r in ok),
                      "max": max(r["time"] for r in ok), "n": len(ok),
                      "real_tokens": ok[0]["real_tokens"], "padded_tokens": ok[0]["padded_tokens"],
                      "batches": ok[0]["batches"], "rows": ok[0]["rows"],
                      "tokens_per_s": ok[0]["real_tokens"] / t}
    if "build" in summary:
        b = summary["build"]
        okb = [r for r in runs["build"] if "time" in r]
        for k in ("setup_s", "compute_write_s", "final_open_s"):
            b[k] = _med(okb, k)
        for m in methods:
            if m != "build" and m in summary:
                summary[m]["build_ratio"] = summary["build"]["tokens_per_s"] / \
                    summary[m]["tokens_per_s"]
                paired = [p["time"] / q["time"] for p, q in zip(runs[m], runs["build"])
                          if "time" in p and "time" in q]
                summary[m]["build_ratio_paired"] = paired
    check = None
    if "plain" in summary and "build" in summary:
        pv = np.array(next(r for r in runs["plain"] if "values" in r)["values"], np.float64)
        bv = np.array(next(r for r in runs["build"] if "values" in r)["values"], np.float64)
        check = {"max_abs_diff": float(np.abs(pv - bv).max()),
                 "max_rel_diff": float((np.abs(pv - bv) / np.abs(bv)).max()),
                 "sequences": int(pv.size)}

    info = harness.machine()
    cmd = "python benchmarks/bench_refcache.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (
            ("pairs", a.pairs), ("max_length", a.max_length), ("batch_tokens", a.batch_tokens),
            ("reps", a.reps), ("step_pairs", a.step_pairs)))
    mal = sorted({str(r.get("malloc_mmap_threshold", "unset") or "unset")
                  for rs in runs.values() for r in rs if "time" in r})
    mal = ", ".join(mal) if mal else "?"
    per_run = [r["other_cores"] for rs in runs.values() for r in rs if "other_cores" in r]
    if lookup and "other_cores" in lookup:
        per_run.append(lookup["other_cores"])
    worst = max(per_run, default=0.0)
    busy = worst > 0.1
    md = (f"# Reference log-prob cache: precompute throughput and lookup cost (cpu, float32)\n\n"
          f"Machine: {info}; {os.cpu_count()} cores. Command: `{cmd}` (wall {wall:.0f} s). "
          f"Workers' MALLOC_MMAP_THRESHOLD_: {mal} (unset = glibc's dynamic default).\n"
          f"Load average (1/5/15 min) before: {load_before}, after: {load_after}. Other "
          f"processes used {other_cores:.2f} cores on average during the run (worst single "
          f"worker run: {worst:.2f}; /proc/stat busy time minus this benchmark's own CPU time); "
          f"hypervisor steal {steal_cores:.2f} cores on average"
          + (" — the machine was busy with other work: absolute times are inflated and the "
             "ratios noisier (runs are interleaved, so drift hits all methods).\n\n"
             if busy else ": the machine was otherwise idle.\n\n"))
    if summary:
        s0 = next(iter(summary.values()))
        md += (f"## 1. Precompute, SmolLM2-135M fp32, {a.threads} threads\n\n"
               f"{s0['rows']} unique Rotten Tomatoes train pairs (first {a.pairs}, "
               f"max_length {a.max_length}), {s0['real_tokens']} real tokens "
               f"({s0['padded_tokens']} padded) in {s0['batches']} batches of <= "
               f"{a.batch_tokens} padded tokens — the cache's own plan, the same batches for "
               f"every method. Median of {a.reps} fresh processes (min–max shown), each after "
               "a warm-up batch; runs interleaved.\n\n")
        rows = []
        for m in methods:
            if m not in summary:
                err = next((r.get("error") for r in runs[m] if "error" in r), "?")
                rows.append([LABELS.get(m, m), "error: " + str(err), "", "", "", ""])
                continue
            s = summary[m]
            ratio = "1.00" if m == "build" else harness.fmt(s.get("build_ratio"), ".2f")
            paired = s.get("build_ratio_paired")
            rows.append([LABELS.get(m, m), harness.fmt(s["time"], ".2f"),
                         f"{s['min']:.2f}–{s['max']:.2f}", harness.fmt(s["tokens_per_s"], ".0f"),
                         harness.fmt(s["padded_tokens"] / s["time"], ".0f"),
                         ratio + (f" ({min(paired):.2f}–{max(paired):.2f})" if paired else "")])
        md += harness.md_table(["method", "time s", "min–max s", "real tokens/s",
                                "padded tokens/s",
                                "build throughput / this (paired min–max); target >= 0.9"],
                               rows)
        if "build" in summary:
            b = summary["build"]
            md += (f"\nBuild breakdown (medians): setup {b['setup_s']:.2f} s (fingerprint incl. "
                   f"weight sample hash and tokenizer hash, plan, manifest), compute + shard "
                   f"writes {b['compute_write_s']:.2f} s, final open/verify "
                   f"{b['final_open_s']:.3f} s.\n")
        if check:
            md += (f"\nSame numbers: plain forward's fp32 log_softmax sums vs the cache's values "
                   f"over {check['sequences']} sequences: max |diff| "
                   f"{check['max_abs_diff']:.2e} nats (max relative "
                   f"{check['max_rel_diff']:.1e}).\n")
    if lookup and "step" in lookup:
        st, ad = lookup["step"]["median"], lookup["adamw"]["median"]
        md += (f"\n## 2. Lookup cost per training step (B={a.step_pairs} pairs)\n\n"
               f"Training step = body forward (train mode) -> "
               f"`fused_preference_loss_padded` (impl auto, with the looked-up reference) -> "
               f"backward, {lookup['step_tokens']} real / {lookup['step_padded_tokens']} padded "
               f"tokens: **{st:.3f} s** (median of 3; no optimizer). AdamW step + zero_grad "
               f"alone: {ad:.3f} s; full step {st + ad:.3f} s.\n\n"
               f"`RefLogProbCache.open(path, expect=fp)` (SHA-256 of every shard, key index): "
               f"{lookup['open']['median'] * 1e3:.2f} ms for the built cache "
               f"({lookup['rows']} rows, {lookup['cache_bytes']} bytes)")
        syn = lookup.get("synthetic")
        if syn:
            md += (f"; {syn['open']['median'] * 1e3:.1f} ms for a synthetic cache of "
                   f"{syn['rows']} rows ({syn['cache_bytes'] / 2**20:.1f} MiB)")
        md += (f". `fingerprint(model, tok, max_length)` (once per run): "
               f"{lookup['fingerprint_s']:.2f} s.\n\n"
               f"`cache.lookup(keys)` -> [2B] float32, median of {a.lookup_calls} calls over 64 "
               "random batches:\n\n")
        names = {"examples": "PreferenceExample list (key hashed before)",
                 "examples_unhashed": "fresh PreferenceExample list (SHA-256 key in the call)",
                 "hex": "hex strings", "uint8": "uint8 [B, 16] array"}
        rows = []
        for k, label in names.items():
            for where, lk in (("built", lookup["lookup"]),
                              ("synthetic", (syn or {}).get("lookup"))):
                if not lk:
                    continue
                t = lk[k]["median"]
                n = lookup["rows"] if where == "built" else syn["rows"]
                rows.append([label, f"{n}", _us(t), f"{_us(lk[k]['p20'])}–{_us(lk[k]['p80'])}",
                             f"{100 * t / st:.4f}%", f"{100 * t / (st + ad):.4f}%"])
        md += harness.md_table(["keys", "cache rows", "lookup µs", "p20–p80 µs",
                                "% of step (fwd+bwd); target < 1%", "% of step (+AdamW)"], rows)
    elif lookup:
        md += f"\n## 2. Lookup\n\nerror: {lookup.get('error')}\n"

    payload = {"machine": info, "cores": os.cpu_count(), "args": vars(a), "command": cmd,
               "load_before": load_before, "load_after": load_after, "wall_s": wall,
               "other_cores": other_cores, "steal_cores": steal_cores,
               "precompute": summary, "check": check,
               "runs": {m: [{k: v for k, v in r.items() if k != "values"} for r in rs]
                        for m, rs in runs.items()},
               "lookup": lookup}
    harness.write_results("refcache_cpu", payload, md)
    print(md)


if __name__ == "__main__":
    main()
