"""Per-process memory of DPO training as the number of processes grows.

    python benchmarks/bench_dist.py [--models smollm2,llama350m] [--nprocs 1,2,4] [--steps N]
        [--batch-size 8] [--max-length 128] [--device cpu]

Each model trains on one process, then with FSDP2 on N processes for each N of --nprocs, every
run through `dpo-fast train` as a user runs it.

Models: SmolLM2-135M-Instruct (bundled) and a random-initialized Llama-shaped model of ~0.36B
parameters (hidden 1024, 24 layers, SmolLM2's tokenizer and vocabulary, tied embeddings),
built once into ~/.cache/dpo_fast/bench/llama350m. Data: Rotten Tomatoes pairs, no held-out
split, no samples, the final model exported (one tensor at a time under FSDP2).

Per run "one process" is `python -m dpo_fast train` (strategy auto: no torch.distributed) and
"fsdp2 xN" is `python -m torch.distributed.run --standalone --nproc_per_node=N -m dpo_fast
train` with `strategy: fsdp2` (meta-device model, shards filled from the safetensors files,
reference pass through the sharded model). Every process runs one thread
(OMP_NUM_THREADS=1), the one-process run too. Under FSDP2 on the CPU the trainer sets glibc's
mmap threshold to 128 KiB (freed buffers go back to the system); one process keeps glibc's
default. So the one-process run is made twice: as users run it (the targets' reference) and
with MALLOC_MMAP_THRESHOLD_=131072 (the same allocator setting as the FSDP2 runs), and each
run's ratio is given against both.

Memory is the host peak RSS (VmHWM) of each process in each phase of the run, from the run's
summary.json: start (imports, launch), data, load, reference, setup (wrap, optimizer),
train, finish (export). The high-water mark is reset between phases, so each phase's peak is
its own, and the largest over the phases is the process's whole-run peak. The import
baseline is the one-process run's `start` peak; a run's ratio is (its largest process's
whole-run peak - baseline) / (the one-process whole-run peak - baseline): the share of the
memory above the imports that one process still needs. Targets: x2 <= 0.6, x4 <= 0.35.
Also per run: parameters + optimizer state each process holds at the end (model_state_mb),
training tokens/s over all processes, max |loss difference| from the one-process run over
the steps, wall seconds. Writes benchmarks/results/dist_scaling_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from dpo_fast.models import resolve_model_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "bundled:smollm2-135m-instruct"
LLAMA_DIR = Path.home() / ".cache" / "dpo_fast" / "bench" / "llama350m"
DEFAULT_STEPS = {"smollm2": 4, "llama350m": 2}
PHASES = ("start", "data", "load", "reference", "setup", "train", "finish")
TABLE_PHASES = ("load", "reference", "setup", "train", "finish")
TARGETS = {2: 0.6, 4: 0.35}  # processes -> largest ratio


def safetensors_parameters(folder: Path) -> int:
    """Elements stored in a model folder's safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def build_llama350m() -> Path:
    """The ~0.36B Llama-shaped model (random weights, torch seed 0) + SmolLM2's tokenizer,
    saved once (temp folder, then rename); a complete folder is reused."""
    if (LLAMA_DIR / "config.json").is_file() and any(LLAMA_DIR.glob("*.safetensors")):
        return LLAMA_DIR
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model_name(BUNDLED))
    config = LlamaConfig(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=len(tok),
                         tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    LLAMA_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=LLAMA_DIR.parent, prefix="llama350m."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if LLAMA_DIR.exists():  # an incomplete folder of an interrupted build
            shutil.rmtree(LLAMA_DIR)
        tmp.rename(LLAMA_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LLAMA_DIR


def model_source(name: str) -> str:
    """The `model` config value of a benchmark model name."""
    return BUNDLED if name == "smollm2" else str(build_llama350m())


def train_config(model: str, steps: int, a: argparse.Namespace) -> dict:
    return dict(model=model, train_data="bundled:rotten-tomatoes/train", data_cache_dir="",
                batch_size=a.batch_size, max_steps=steps, max_length=a.max_length,
                save_final_model=True, sample_prompts=0, eval_data=None, save_steps=None,
                logging_steps=1, learning_rate=5e-6, ref_rows_per_shard=8,
                overwrite_output_dir=True, device=a.device)


def run(label: str, nproc: int, cfg: dict, base: Path, env_extra=None) -> dict:
    """One `dpo-fast train` run (``nproc`` 0: plain python, else torchrun with N processes;
    ``env_extra``: more environment); its per-rank memory, speed and losses. The output
    folder is deleted after reading."""
    out = base / label.replace(" ", "_")
    cfg = dict(cfg, output_dir=str(out))
    config_file = base / f"{out.name}.yaml"
    config_file.write_text(json.dumps(cfg))  # JSON is YAML
    train = ["-m", "dpo_fast", "train", "--config", str(config_file), "--quiet"]
    cmd = [sys.executable, *train] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", *train]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    print(f"  {label} ...", end=" ", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=4 * 3600)
    wall = time.perf_counter() - t0
    result = {"label": label, "nproc": max(nproc, 1), "config": cfg, "wall_seconds": wall}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip()
        print(f"failed (exit {p.returncode}) after {wall:.0f} s:\n{tail[-4000:]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return dict(result, error=tail[-4000:])
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    shutil.rmtree(out)
    phases = {k: summary["phase_memory_mb"][k] for k in PHASES if k in summary["phase_memory_mb"]}
    ranks = len(next(iter(phases.values())))
    print(f"{wall:.0f} s", flush=True)
    return dict(result,
                phase_memory_mb=phases,
                peak_mb=[max(v[r] for v in phases.values()) for r in range(ranks)],
                model_state_mb=summary["model_state_mb"],
                losses={r["step"]: r["loss"] for r in records if "loss" in r},
                tokens_per_second=summary["tokens_per_second"],
                train_seconds=summary["train_seconds"],
                precompute_seconds=summary["precompute_seconds"],
                loop_peak_memory_mb=summary["peak_memory_mb"])


def compare(runs: list) -> float:
    """Fills each successful run's ratios (vs the first run: one process as users run it;
    vs the second: one process with the FSDP2 runs' allocator setting) and loss difference
    from the first run; returns the import baseline (MiB)."""
    one, same = runs[0], runs[1]
    baseline = max(one["phase_memory_mb"]["start"])
    above = max(one["peak_mb"]) - baseline
    above_same = max(same["peak_mb"]) - baseline if "error" not in same else float("nan")
    for r in runs:
        if "error" in r:
            continue
        r["ratio"] = (max(r["peak_mb"]) - baseline) / above
        r["ratio_same_allocator"] = (max(r["peak_mb"]) - baseline) / above_same
        steps = sorted(set(r["losses"]) & set(one["losses"]))
        r["max_abs_loss_diff"] = max(abs(r["losses"][s] - one["losses"][s]) for s in steps)
    return baseline


def error_line(text: str) -> str:
    """The CLI's error line of a failed run's output (torchrun's report comes after it)."""
    lines = [ln for ln in text.splitlines() if "error:" in ln] or text.splitlines()
    return lines[-1].strip()[:300]


def model_tables(name: str, params: int, steps: int, baseline: float, runs: list) -> str:
    main_rows, rank_rows = [], []
    for r in runs:
        if "error" in r:
            failed = "failed: " + error_line(r["error"])
            main_rows.append([r["label"], failed] + ["—"] * (6 + len(TABLE_PHASES)))
            continue
        ph = r["phase_memory_mb"]
        main_rows.append(
            [r["label"], f"{max(r['peak_mb']):,.0f}", f"{r['ratio']:.3f}",
             f"{r['ratio_same_allocator']:.3f}"]
            + [f"{max(ph[k]):,.0f}" if k in ph else "—" for k in TABLE_PHASES]
            + [f"{max(r['model_state_mb']):,.0f}", f"{r['tokens_per_second']:,.1f}",
               f"{r['max_abs_loss_diff']:.1e}", f"{r['wall_seconds']:.0f}"])
        rank_rows.append([r["label"], " / ".join(f"{x:,.0f}" for x in r["peak_mb"]),
                          " / ".join(f"{x:,.0f}" for x in r["model_state_mb"])])
    return (f"## {name} ({params / 1e6:.1f}M parameters, {steps} step{'s' * (steps != 1)})\n\n"
            f"Import baseline (one process, `start` phase): {baseline:,.0f} MiB.\n\n"
            + harness.md_table(
                ["run", "largest whole-run peak per process (MiB)",
                 "x one process above the baseline",
                 "x one process with mmap threshold 128 KiB"]
                + [f"{k} (MiB)" for k in TABLE_PHASES]
                + ["model state per process (MiB, largest)", "tokens/s (all processes)",
                   "max abs loss diff vs one process", "wall (s)"], main_rows)
            + "\nEvery process:\n\n"
            + harness.md_table(["run", "whole-run peak by rank (MiB)",
                                "model state by rank (MiB)"], rank_rows))


def target_lines(name: str, runs: list) -> list:
    lines = []
    for r in runs[1:]:
        limit = TARGETS.get(r["nproc"])
        if limit is None:
            continue
        if "error" in r:
            lines.append(f"FAIL {name} {r['label']}: the run failed ({error_line(r['error'])})")
        else:
            verdict = "PASS" if r["ratio"] <= limit else "FAIL"
            lines.append(f"{verdict} {name} {r['label']}: {r['ratio']:.3f} x one process above "
                         f"the baseline (target <= {limit}; "
                         f"{r['ratio_same_allocator']:.3f} x one process with the same "
                         "allocator setting)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,llama350m",
                    help=f"comma-separated, from {', '.join(DEFAULT_STEPS)}")
    ap.add_argument("--nprocs", default="1,2,4", help="comma-separated FSDP2 process counts")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default: " + ", ".join(
                        f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    models = a.models.split(",")
    unknown = sorted(set(models) - set(DEFAULT_STEPS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_STEPS)}")
    nprocs = [int(n) for n in a.nprocs.split(",")]
    command = "python benchmarks/bench_dist.py " + " ".join(sys.argv[1:])
    info = {k: v for k, v in harness.machine().items() if k != "threads"}

    payload = {"machine": info, "args": vars(a), "command": command, "targets": TARGETS,
               "models": {}}
    sections, verdicts = [], []
    with tempfile.TemporaryDirectory(prefix="dpo_fast_bench_dist_") as tmp:
        base = Path(tmp)
        for name in models:
            source = model_source(name)
            params = safetensors_parameters(Path(resolve_model_name(source)))
            steps = a.steps or DEFAULT_STEPS[name]
            print(f"{name}: {params:,} parameters, {steps} steps", flush=True)
            cfg = train_config(source, steps, a)
            runs = [run("one process", 0, cfg, base),
                    run("one process, mmap threshold 128 KiB", 0, cfg, base,
                        {"MALLOC_MMAP_THRESHOLD_": "131072"})]
            if "error" in runs[0]:
                raise SystemExit(f"{name}: the one-process run failed; nothing to compare")
            runs += [run(f"fsdp2 x{n}", n, dict(cfg, strategy="fsdp2"), base) for n in nprocs]
            baseline = compare(runs)
            sections.append(model_tables(name, params, steps, baseline, runs))
            verdicts += target_lines(name, runs)
            payload["models"][name] = {"model": source, "parameters": params, "steps": steps,
                                       "import_baseline_mb": baseline, "runs": runs}
    payload["verdicts"] = verdicts
    md = (f"# Per-process memory as processes grow ({a.device})\n\n"
          + ", ".join(f"{k} {v}" for k, v in info.items()) + f"; `{command}`\n\n"
          + f"Rotten Tomatoes pairs, {a.batch_size} pairs per step over all processes, "
          f"max_length {a.max_length}, fp32, one thread per process, final model exported; "
          "FSDP2 runs set glibc's mmap threshold to 128 KiB (the trainer does), one process "
          "is shown with the default allocator and with that threshold. Memory: host peak "
          "RSS of each process per phase (the high-water mark is reset between phases); the "
          "phase columns are the largest process in that phase. x one process = (largest "
          "whole-run peak - import baseline) "
          "/ (one process's whole-run peak - import baseline).\n\n"
          + "\n".join(sections)
          + "\n## Targets\n\n" + "".join(f"- {v}\n" for v in verdicts))
    harness.write_results(f"dist_scaling_{a.device}", payload, md)
    print(md)


if __name__ == "__main__":
    main()
