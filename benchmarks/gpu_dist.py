"""The torch.distributed code paths on one device: torchrun with 1 process and strategy ddp /
fsdp2 (nccl on CUDA, gloo on CPU) against a plain one-process run of the same config.

    python benchmarks/gpu_dist.py [--device cuda] [--steps 10] [--out DIR]

A random model of SmolLM2's shape (tied embeddings; 2 layers), random-word pairs, fp32. Prints
one line per run (per-step loss difference from the plain run, tokens/s, peak memory) and
exits 1 if a strategy does not start, train or match within 1e-4.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_model, tiny_tokenizer, word_rows

    base = Path(a.out or tempfile.mkdtemp(prefix="dpo_fast_dist_"))
    base.mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed=7, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, tie_word_embeddings=True)
    model.save_pretrained(base / "model")
    tiny_tokenizer().save_pretrained(base / "model")
    (base / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in word_rows(64)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for name, launch in (("plain", []), ("ddp", ["ddp"]), ("fsdp2", ["fsdp2"])):
        out = base / name
        cfg = dict(model=str(base / "model"), train_data=str(base / "train.jsonl"),
                   data_cache_dir="", batch_size=8, max_steps=a.steps, learning_rate=1e-4,
                   logging_steps=1, save_steps=a.steps // 2, max_length=64, device=a.device,
                   output_dir=str(out), overwrite_output_dir=True)
        if launch:
            cfg["strategy"] = launch[0]
        y = base / f"{name}.yaml"
        y.write_text(json.dumps(cfg))
        args = ["-m", "dpo_fast", "train", "--config", str(y), "--quiet"]
        cmd = [sys.executable, *args] if not launch else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=1", *args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            print(f"{name}: FAILED rc={p.returncode}\n{p.stderr[-3000:]}")
            return 1
        m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
        s = json.loads((out / "summary.json").read_text())
        runs[name] = ([r["loss"] for r in m if "loss" in r], s)
    ok = True
    ref = runs["plain"][0]
    for name, (losses, s) in runs.items():
        d = max(abs(x - y) for x, y in zip(losses, ref))
        good = len(losses) == len(ref) == a.steps and d <= 1e-4 and losses[-1] != losses[0]
        ok &= good
        print(f"{name:6s} steps {len(losses)} loss {losses[0]:.6f} -> {losses[-1]:.6f} "
              f"max |dloss| vs plain {d:.2e} tokens/s {s['tokens_per_second']:,.0f} peak "
              f"{s['peak_memory_mb']:.0f} MiB checkpoint {Path(s['checkpoint'] or '-').name} "
              f"{'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
