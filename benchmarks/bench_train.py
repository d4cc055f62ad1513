"""End-to-end training benchmark: dpo_fast's trainer next to a plain PyTorch full-logits DPO
loop, on the same model, pairs, step order and hyper-parameters, side by side in one run.

Model and data: SmolLM2-135M-Instruct in fp32 (``dpo_fast.assets.smollm2_dir``), the first
``--steps x --batch-size`` Rotten Tomatoes train pairs, ``--eval-pairs`` held-out pairs from
movies not trained on, ``max_length`` 128, tokenized by dpo_fast (TRL 1.16's rules). Both
loops take the same optimizer steps in the same order (``dpo_fast.train.batching.epoch_steps``
with the same seed), AdamW (lr ``--lr``, betas 0.9/0.999, eps 1e-8, no weight decay), linear
decay without warm-up, clipping at 1.0, sigmoid DPO with beta 0.1.

    plain      the floor of "no framework": the reference model lives next to the policy
               (a deep copy, eval mode, no grad); each step pads the 2B sequences
               (``pack_pair_batch``), runs the policy's own forward to full fp32 [2B, T, V]
               logits, log_softmax -> gather -> masked sums, the reference the same way under
               no_grad, the DPO loss, backward, clip, AdamW.
    dpo_fast   ``dpo_fast.train.Trainer``: reference log-probs computed once into the cache
               (timed separately as "precompute") and the reference model never resident;
               packed micro-batches (block-diagonal sdpa mask), the fused head + loss (no
               logits), the same optimizer.

Each case runs in its own process (``harness.run_worker``). Reported per case: median step time
after the first step, tokens/s over steps 2..S (real tokens: prompt + response of chosen and of
rejected, no padding), peak RSS during the loop (VmHWM reset when the loop starts; it includes
the resident models), the held-out reward accuracy / margin / loss before and after, and the
per-step losses of both (they should agree to fp32 noise: same batches, same math).

    python benchmarks/bench_train.py                 # 20 steps x 8 pairs (~8 minutes)
    python benchmarks/bench_train.py --steps 4       # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import harness

CASES = ("plain", "dpo_fast")


def _data(args):
    from dpo_fast.assets import rotten_tomatoes_pairs

    train, held = rotten_tomatoes_pairs(eval_fraction=0.1, seed=0)
    return train[:args.steps * args.batch_size], held[:args.eval_pairs]


def worker_dpo_fast(args) -> dict:
    from dpo_fast.assets import smollm2_dir
    from dpo_fast.train import TrainConfig, Trainer, TrainerCallback

    train, held = _data(args)
    times, t_last = [], [None]

    class Clock(TrainerCallback):
        def on_train_begin(self, trainer, state):
            t_last[0] = time.perf_counter()

        def on_step_end(self, trainer, state):
            now = time.perf_counter()
            times.append(now - t_last[0])
            t_last[0] = now

    class Timed(Trainer):
        def prepare_reference(self):
            t0 = time.perf_counter()
            super().prepare_reference()
            self.precompute_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(model=str(smollm2_dir()), train_data=train, eval_data=held,
                          output_dir=d, max_steps=args.steps, batch_size=args.batch_size,
                          learning_rate=args.lr, beta=0.1, max_length=args.max_length,
                          logging_steps=1, save_steps=None, save_final_model=False,
                          max_tokens_per_micro_batch=args.micro_tokens, data_cache_dir="",
                          seed=args.seed)
        t = Timed(cfg, callbacks=[Clock()])
        res = t.train()
        logs = [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    tokens = [m["num_tokens"] for m in logs if "loss" in m]
    per_step = [b - a for a, b in zip([0] + tokens[:-1], tokens)]
    return {"times": times, "tokens": per_step, "losses": [m["loss"] for m in logs if "loss" in m],
            "peak_rss_mb": res.peak_memory_mb, "precompute_s": t.precompute_s,
            "eval_before": res.eval_before, "eval_after": res.eval_after,
            "attention": res.attention}


def worker_plain(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dpo_fast import pack_pair_batch, tokenize_dataset
    from dpo_fast.assets import load_smollm2
    from dpo_fast.train.batching import epoch_steps, pair_tokens
    from dpo_fast.train.loop import lr_lambda

    train, held = _data(args)
    torch.manual_seed(args.seed)
    policy, tok = load_smollm2()
    policy.config.use_cache = False
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    ex, _ = tokenize_dataset(tok, train, max_length=args.max_length)
    ev, _ = tokenize_dataset(tok, held, max_length=args.max_length)

    def seq_logps(model, pb):
        logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
        lp = torch.log_softmax(logits.float(), -1)
        mask = pb.targets != -100
        tl = lp.gather(2, pb.targets.clamp(min=0)[..., None])[..., 0]
        return (tl * mask).sum(1)

    def dpo(pol, rf, b):
        h = (pol[:b] - rf[:b]) - (pol[b:] - rf[b:])
        cr, rr = 0.1 * (pol[:b] - rf[:b]).detach(), 0.1 * (pol[b:] - rf[b:]).detach()
        return -F.logsigmoid(0.1 * h), cr, rr

    @torch.no_grad()
    def evaluate():
        policy.eval()
        order = np.argsort([pair_tokens(e) for e in ev], kind="stable")
        losses, acc, margin = [], [], []
        for i in range(0, len(order), args.batch_size):
            batch = [ev[j] for j in order[i:i + args.batch_size]]
            pb = pack_pair_batch(batch)
            l_, cr, rr = dpo(seq_logps(policy, pb), seq_logps(ref, pb), len(batch))
            losses += l_.tolist()
            acc += (cr > rr).float().tolist()
            margin += (cr - rr).tolist()
        policy.train()
        n = len(losses)
        return {"eval/loss": sum(losses) / n, "eval/rewards/accuracies": sum(acc) / n,
                "eval/rewards/margins": sum(margin) / n}

    before = evaluate()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", 0, args.steps))
    steps = epoch_steps(np.array([pair_tokens(e) for e in ex]), args.batch_size, args.seed, 0)
    harness.reset_hwm()
    times, tokens, losses = [], [], []
    for idx in steps[:args.steps]:
        t0 = time.perf_counter()
        batch = [ex[i] for i in idx]
        pb = pack_pair_batch(batch)
        pol = seq_logps(policy, pb)
        with torch.no_grad():
            rf = seq_logps(ref, pb)
        l_, _, _ = dpo(pol, rf, len(batch))
        loss = l_.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        tokens.append(int(pb.attention_mask.sum()))
        losses.append(float(loss))
    peak = harness.hwm_bytes() / 2**20
    return {"times": times, "tokens": tokens, "losses": losses, "peak_rss_mb": peak,
            "eval_before": before, "eval_after": evaluate(), "precompute_s": 0.0,
            "attention": "padded (full logits)"}


def summarize(r: dict) -> dict:
    t, k = r["times"][1:], r["tokens"][1:]
    return {"median_step_s": sorted(t)[len(t) // 2], "tokens_per_s": sum(k) / sum(t),
            "peak_rss_mb": r["peak_rss_mb"], "precompute_s": r["precompute_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-pairs", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--micro-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="train_cpu")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case", choices=CASES)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        harness.disable_thp()
        out = worker_dpo_fast(args) if args.case == "dpo_fast" else worker_plain(args)
        print(json.dumps(out))
        return
    passthrough = [a for a in sys.argv[1:] if a not in ("--worker",)]
    results = {}
    for case in CASES:
        t0 = time.perf_counter()
        results[case] = harness.run_worker(Path(__file__), [*passthrough, "--case", case],
                                           timeout=7200)
        if "error" in results[case]:
            raise SystemExit(f"{case} failed: {results[case]['error']}")
        print(f"{case}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    s = {c: summarize(r) for c, r in results.items()}
    lp, lf = results["plain"]["losses"], results["dpo_fast"]["losses"]
    diff = max(abs(a - b) for a, b in zip(lp, lf))
    base = s["plain"]
    rows = []
    for c in CASES:
        r, x = results[c], s[c]
        rows.append([c, r["attention"], harness.fmt(x["median_step_s"], ".2f"),
                     harness.fmt(x["tokens_per_s"], ".0f"),
                     harness.fmt(x["tokens_per_s"] / base["tokens_per_s"], ".2f") + "x",
                     harness.fmt(x["peak_rss_mb"] / 1024, ".2f"),
                     harness.fmt(x["peak_rss_mb"] / base["peak_rss_mb"], ".2f") + "x",
                     harness.fmt(x["precompute_s"], ".0f"),
                     harness.fmt(r["eval_before"]["eval/rewards/accuracies"], ".3f") + " -> "
                     + harness.fmt(r["eval_after"]["eval/rewards/accuracies"], ".3f"),
                     harness.fmt(r["eval_before"]["eval/rewards/margins"], ".3f") + " -> "
                     + harness.fmt(r["eval_after"]["eval/rewards/margins"], ".3f"),
                     harness.fmt(r["eval_after"]["eval/loss"], ".4f"),
                     harness.fmt(r["losses"][0], ".6f") + " -> "
                     + harness.fmt(r["losses"][-1], ".4f")])
    info = harness.machine()
    md = (f"# Training: dpo_fast vs a plain full-logits DPO loop ({info['date']})\n\n"
          f"SmolLM2-135M-Instruct fp32, {args.steps} steps x {args.batch_size} pairs "
          f"(Rotten Tomatoes, max_length {args.max_length}), {args.eval_pairs} held-out pairs, "
          f"AdamW lr {args.lr}, beta 0.1, {info['host_cpu']}, {info['threads']} threads, "
          f"torch {info['torch']}.\n\n"
          + harness.md_table(["case", "attention", "median step s", "tokens/s", "vs plain",
                              "peak RSS GiB", "vs plain", "precompute s",
                              "held-out reward acc", "held-out margin", "held-out loss after",
                              "train loss step 1 -> last"], rows)
          + f"\nmax |per-step training loss difference| between the two: {diff:.2e}\n")
    harness.write_results(args.name, {"machine": info, "args": vars(args), "results": results,
                                      "summary": s, "max_loss_diff": diff}, md)
    print(md)


if __name__ == "__main__":
    main()
