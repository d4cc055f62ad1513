"""Training on several processes, side by side: one process, DDP and FSDP2 on N processes, the
same config (SmolLM2-135M-Instruct fp32, Rotten Tomatoes pairs), through `dpo-fast train`.

    python benchmarks/bench_dist.py [--nproc 2] [--steps 8] [--device cpu|cuda]

Per run: per-step loss difference from the one-process run, training tokens/s (all
processes), the largest peak memory of one process (CPU: VmHWM of the loop, which includes the
model; CUDA: max allocated), and the per-process model-state bytes the strategy implies
(fp32 weights + gradients + two AdamW moments = 16 bytes a parameter; FSDP2: 16 / N a
parameter plus the unsharded root unit -- embeddings, final norm, LM head -- and its gradient
during a step). Every process runs one thread on CPU (torchrun's default), so the one-process
run does too. Writes benchmarks/results/dist_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def model_bytes(nproc: int) -> dict:
    """Per-process model-state bytes (fp32 AdamW) of each strategy for SmolLM2-135M."""
    from dpo_fast.models import resolve_model_name
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_model_name("bundled:smollm2-135m-instruct"))
    v, d, f, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    root = v * d + d + (0 if cfg.tie_word_embeddings else v * d)
    total = L * layer + root
    return {"params": total, "root_params": root,
            "one": 16 * total, "ddp": 16 * total,
            "fsdp2": 16 * total / nproc + 8 * root + 8 * layer}


def run(name: str, nproc: int, cfg: dict, base: Path, live_rss: bool) -> dict:
    out = base / name
    cfg = dict(cfg, output_dir=str(out))
    y = base / f"{name}.yaml"
    y.write_text(json.dumps(cfg))
    args = ["-m", "dpo_fast", "train", "--config", str(y), "--quiet"]
    cmd = [sys.executable, *args] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if live_rss:  # freed buffers go back to the OS, so RSS follows live memory
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-4000:]}")
    m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    s = json.loads((out / "summary.json").read_text())
    return {"losses": [r["loss"] for r in m if "loss" in r],
            "tokens_per_second": s["tokens_per_second"], "peak_memory_mb": s["peak_memory_mb"],
            "train_seconds": s["train_seconds"], "precompute_seconds": s["precompute_seconds"],
            "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--default-allocator", action="store_true",
                    help="CPU: keep glibc's default mmap threshold (RSS then keeps freed heap "
                         "memory, e.g. the unsharded model FSDP2 replaced)")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dpo_fast_bench_dist_"))
    cfg = dict(model="bundled:smollm2-135m-instruct",
               train_data="bundled:rotten-tomatoes/train", data_cache_dir="",
               batch_size=a.batch_size, max_steps=a.steps, learning_rate=5e-6, beta=0.1,
               max_length=128, logging_steps=1, save_steps=None, device=a.device,
               ref_rows_per_shard=16, overwrite_output_dir=True)
    live = a.device == "cpu" and not a.default_allocator
    res = {"one process": run("one", 0, cfg, base, live),
           f"ddp x{a.nproc}": run("ddp", a.nproc, dict(cfg, strategy="ddp"), base, live),
           f"fsdp2 x{a.nproc}": run("fsdp2", a.nproc, dict(cfg, strategy="fsdp2"), base, live)}
    mb = model_bytes(a.nproc)
    ref = res["one process"]
    rows = []
    for (name, r), key in zip(res.items(), ("one", "ddp", "fsdp2")):
        d = max(abs(x - y) for x, y in zip(r["losses"], ref["losses"]))
        r["max_abs_loss_diff"] = d
        r["model_state_mib_per_process"] = mb[key] / 2**20
        rows.append([name, f"{d:.1e}", f"{r['tokens_per_second']:,.1f}",
                     harness.fmt(r["tokens_per_second"] / ref["tokens_per_second"], ".2f"),
                     f"{r['peak_memory_mb']:,.0f}", f"{mb[key] / 2**20:,.0f}",
                     f"{r['precompute_seconds']:.1f}"])
    md = (f"# Training on {a.nproc} processes ({a.device})\n\n"
          + ", ".join(f"{k} {v}" for k, v in harness.machine().items() if k != "threads")
          + f"\n\nSmolLM2-135M-Instruct fp32, Rotten Tomatoes, "
          f"{a.batch_size} pairs per step over all processes, max_length 128, {a.steps} steps, "
          f"one thread per process; "
          + ("glibc mmap threshold 128 KiB (RSS follows live memory); " if live else "")
          + "`python benchmarks/bench_dist.py`.\n\n"
          + harness.md_table(["run", "max abs loss diff vs one process", "tokens/s (all)",
                              "x one process", "peak memory of one process (MiB)",
                              "model state per process (MiB, fp32 AdamW)",
                              "reference precompute (s)"], rows)
          + f"\n\nModel state: {mb['params'] / 1e6:.1f}M parameters x 16 bytes; FSDP2 = 1/"
          f"{a.nproc} of it + the unsharded root unit ({mb['root_params'] / 1e6:.1f}M "
          "parameters: tied embeddings / LM head + final norm) and one gathered decoder "
          "layer, each with its gradient, during a step.\n")
    harness.write_results(f"dist_{a.device}", {"config": cfg, "nproc": a.nproc,
                                               "live_rss": live,
                                               "results": res, "model_bytes": mb}, md)
    print(md)


if __name__ == "__main__":
    main()
