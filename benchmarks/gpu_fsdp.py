"""FSDP2 on one GPU as a large run would use it: torchrun with 1 process, `strategy=fsdp2`,
`precision=bf16` (MixedPrecisionPolicy: bf16 gathered parameters and compute over fp32 shards
and AdamW state), with and without `fsdp_cpu_offload` (shards, gradients and AdamW state in
host memory), on a random model of a real architecture (bench_train's `--arch`, default the
~1.2B Llama-3.2-1B shape) and synthetic pairs. Through `dpo-fast train`, as a user runs it.

    python benchmarks/gpu_fsdp.py [--arch llama-1b] [--seq 1024] [--steps 6] [--device cuda]

Per run: tokens/s of the training steps, the loop's peak CUDA memory, peak CUDA memory of each
phase (load, reference, setup, train, finish) and peak host RSS. Writes
benchmarks/results/fsdp_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_train import ARCHS, prepared_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("load", "reference", "setup", "train", "finish")


def synthetic_rows(model_dir: str, n: int, seq: int, seed: int = 0):
    """``n`` rows of about ``seq`` tokens per sequence (half prompt), decoded from random
    plain-token ids of the model's tokenizer."""
    import numpy as np
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)

    def text(k):
        return tok.decode(rng.integers(1000, 40000, k).tolist())

    p = seq // 2
    return [{"prompt": text(p), "chosen": " " + text(seq - p), "rejected": " " + text(seq - p)}
            for _ in range(n)]


def run(name: str, cfg: dict, base: Path) -> dict:
    out = base / name
    y = base / f"{name}.yaml"
    y.write_text(json.dumps(dict(cfg, output_dir=str(out))))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "dpo_fast", "train", "--config", str(y), "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-20:]
        return {"error": "\n".join(tail)}
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_second": s["tokens_per_second"], "peak_memory_mb": s["peak_memory_mb"],
            "phase_cuda_memory_mb": {k: max(v) for k, v in s["phase_cuda_memory_mb"].items()},
            "phase_memory_mb": {k: max(v) for k, v in s["phase_memory_mb"].items()},
            "loss": [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text()
                     .splitlines() if ln and "loss" in json.loads(ln)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="llama-1b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    base = Path(a.workdir or tempfile.mkdtemp(prefix="dpo_fast_gpu_fsdp_"))
    base.mkdir(parents=True, exist_ok=True)
    model_dir = prepared_model_dir(argparse.Namespace(arch=a.arch), base)
    data = base / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in
                            synthetic_rows(model_dir, a.steps * a.batch_size, a.seq)))
    cfg = dict(model=model_dir, train_data=str(data), data_cache_dir="", eval_data=None,
               batch_size=a.batch_size, max_steps=a.steps, max_length=2 * a.seq,
               strategy="fsdp2", precision="bf16", device=a.device, save_steps=None,
               save_final_model=False, sample_prompts=0, logging_steps=1,
               overwrite_output_dir=True)
    res = {name: run(name, dict(cfg, fsdp_cpu_offload=off), base)
           for name, off in (("fsdp2 bf16", False), ("fsdp2 bf16 + cpu offload", True))}
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"].splitlines()[-1][:120]] + [""] * 4)
            continue
        cuda = r["phase_cuda_memory_mb"]
        rows.append([name, f"{r['tokens_per_second']:,.0f}", f"{r['peak_memory_mb']:,.0f}",
                     " / ".join(f"{cuda.get(k, 0):,.0f}" for k in PHASES),
                     f"{max(r['phase_memory_mb'].values()):,.0f}",
                     f"{r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}"])
    md = (f"# FSDP2 + bf16 mixed precision on one {a.device} device, with and without CPU "
          "offload\n\n" + ", ".join(f"{k} {v}" for k, v in harness.machine().items())
          + f"\n\nRandom {a.arch} model, {a.batch_size} pairs of ~{a.seq} + {a.seq} tokens per "
          f"step, {a.steps} steps, torchrun x1; `python benchmarks/gpu_fsdp.py`.\n\n"
          + harness.md_table(["run", "tokens/s", "loop peak CUDA (MiB)",
                              "peak CUDA per phase: " + " / ".join(PHASES) + " (MiB)",
                              "peak host RSS (MiB)", "loss first -> last"], rows) + "\n")
    harness.write_results(f"fsdp_{a.device}", {"config": cfg, "arch": a.arch, "results": res},
                          md)
    print(md)


if __name__ == "__main__":
    main()
