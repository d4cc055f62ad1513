"""End-to-end DPO training benchmark: dpo_fast next to TRL 1.16's ``DPOTrainer`` and a plain
PyTorch loop, on the same model, pairs, step order and hyper-parameters, side by side in one run.

Cases (each in its own fresh process, one after another):

    trl_default     TRL ``DPOTrainer`` as its users run it: reference model live (a second copy
                    loaded from the same folder), gradient checkpointing on (TRL's default),
                    ``adamw_torch_fused``; bf16 off (a CPU run; TRL defaults to bf16=True).
    trl_precompute  the same with ``precompute_ref_log_probs=True`` (its one-off precompute,
                    run in ``DPOTrainer.__init__``, is timed separately).
    trl_no_ckpt     live reference, gradient checkpointing off: TRL's fastest live setting.
    plain           the floor of "no framework": policy + frozen reference copy, padded
                    batches, full fp32 [2B, T, V] logits -> log_softmax -> gather, the DPO
                    loss, backward, clip, fused AdamW.
    dpo_fast        ``dpo_fast.train.Trainer`` defaults: reference log-probs read from the
                    cache (filled by the "first run" below, so this is the second run, which
                    reuses it), packed rows with each prompt computed once, the fused head +
                    loss (no logits).
    dpo_fast_ckpt   the same with gradient checkpointing.

One-off costs: dpo_fast's precompute on a cold cache (the first run; only the pairs the steps
visit), the second run's (the ``dpo_fast`` case: a lookup), TRL's precompute (the whole
train set it is given, here exactly the visited pairs), and a plain no-grad full-logits
forward of the same pairs in padded batches of ``--batch-size`` (what a hand-written
precompute costs) for the throughput comparison.

Same work everywhere: every case trains on the pairs dpo_fast's trainer visits in its first
``--steps`` steps, in that order (TRL through a ``SequentialSampler``, see
``trl_parity.run_trl``), with AdamW lr ``--lr``, betas 0.9/0.999, eps 1e-8, no weight decay,
linear decay to 0, clipping at 1.0, sigmoid DPO, beta 0.1, the same seed; the per-step losses
are compared with TRL's.

Measured per case: median step time over steps ``--warmup``+1..S; tokens/s over those steps
(prompt + response tokens, EOS included, of chosen and rejected; padding not counted; a shared
prompt still counts twice); model FLOP/s (the training FLOPs of the policy on those tokens,
:func:`model_flops`) against the fp32 matmul rate measured in the same run; peak RSS of the
training loop (reset when the loop starts: resident models, optimizer state, activations)
and of the whole process (loading and precompute included); both the higher of VmHWM and the
RSS sampled every millisecond (``harness.RssSampler``: VmHWM lags on these machines).

Variants (``--variant``; the default runs ``short`` then ``long``):

    short   Rotten Tomatoes pairs: one review per response, a one-line prompt (counted in both
            sequences: ~40% of the tokens), ``max_length`` 128.
    long    two reviews per response and four reviews of the same movie as context in the
            prompt (a larger prompt share), ``max_length`` 512.

    python benchmarks/bench_train.py                       # both variants (~30 minutes)
    python benchmarks/bench_train.py --variant short --steps 6 --name scratch   # quick look

GPU mode (``benchmarks/gpu_train.sh``): ``--device cuda --precision bf16 --arch llama-1b
--synthetic 2048`` runs the same cases on a randomly initialised model built from a real
architecture's config and synthetic token ids of 2,048 tokens per sequence.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import harness
import trl_parity

CASES = ("trl_default", "trl_precompute", "trl_no_ckpt", "plain", "dpo_fast", "dpo_fast_ckpt",
         "dropin", "dropin_packed", "dropin_cache", "dropin_matched")
ONE_OFF = ("dpo_fast_precompute", "forward")
TRL_CASES = {"trl_default": dict(precompute_ref_log_probs=False, gradient_checkpointing=True),
             "trl_precompute": dict(precompute_ref_log_probs=True, gradient_checkpointing=True),
             "trl_no_ckpt": dict(precompute_ref_log_probs=False, gradient_checkpointing=False),
             # the same TRL run through dpo_fast.trl (one changed import), TRL's defaults
             "dropin": dict(precompute_ref_log_probs=False, gradient_checkpointing=True,
                            dropin=True),
             "dropin_packed": dict(precompute_ref_log_probs=False, gradient_checkpointing=True,
                                   dropin=True, padding_free=True),
             # + precompute_ref_log_probs into dpo_fast's cache: run twice (fill, then reuse)
             "dropin_cache": dict(precompute_ref_log_probs=True, gradient_checkpointing=True,
                                  dropin=True, padding_free=True),
             # the drop-in with dpo-fast train's settings (cache, no gradient checkpointing):
             # the like-for-like comparison of the two front ends
             "dropin_matched": dict(precompute_ref_log_probs=True, gradient_checkpointing=False,
                                    dropin=True, padding_free=True)}
#: Drop-in cases whose reference comes from dpo_fast's cache: a first run fills it, the second
#: is measured.
CACHE_CASES = ("dropin_cache", "dropin_matched")
LABELS = {"trl_default": "TRL default (live ref, grad ckpt)",
          "trl_precompute": "TRL precompute_ref_log_probs",
          "trl_no_ckpt": "TRL live ref, no grad ckpt",
          "plain": "plain PyTorch loop (full logits)",
          "dpo_fast": "dpo_fast",
          "dpo_fast_ckpt": "dpo_fast + grad ckpt",
          "dropin": "dpo_fast.trl drop-in (TRL defaults)",
          "dropin_packed": "dpo_fast.trl drop-in + padding_free",
          "dropin_cache": "drop-in + padding_free + precompute (cache, 2nd run)",
          "dropin_matched": "drop-in + padding_free + cache, no grad ckpt (dpo-fast train's "
                            "settings)"}
VARIANTS = {"short": dict(max_length=128), "long": dict(max_length=512)}
#: Architectures for the GPU mode (random weights; shapes of the named public models).
ARCHS = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                     tie_word_embeddings=True, head_dim=64),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                 max_position_embeddings=4096, tie_word_embeddings=True),
}


# ------------------------------------------------------------------------------ data


def _long_rows(pairs: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """Per movie, four pairs -> one row: two fresh reviews chosen, two rotten rejected, the
    other two pairs' reviews quoted in the prompt."""
    by_movie: Dict[str, List[Dict[str, str]]] = defaultdict(list)
    for r in pairs:
        by_movie[r["movie"]].append(r)
    rows = []
    for movie, rs in by_movie.items():
        for k in range(0, len(rs) - 3, 4):
            a, b, c, d = rs[k:k + 4]
            quoted = "\n".join(f"-{x}" for x in (c["chosen"], c["rejected"], d["chosen"],
                                                 d["rejected"]))
            rows.append({
                "prompt": f"What critics wrote about the movie '{movie}':\n{quoted}\n"
                          f"Write a two-sentence review of the movie '{movie}':",
                "chosen": a["chosen"] + b["chosen"], "rejected": a["rejected"] + b["rejected"],
                "movie": movie})
    return rows


def _rows(args) -> List[Dict[str, str]]:
    from dpo_fast.assets import rotten_tomatoes_pairs

    train, _ = rotten_tomatoes_pairs(eval_fraction=0.1, seed=0)
    rows = _long_rows(train) if args.variant == "long" else train
    return rows[:max(4 * args.steps * args.batch_size, 64)]


def prepared_model_dir(args, tmp: Path) -> str:
    """The SmolLM2 folder, or (``--arch``) a random model of that shape saved under ``tmp``
    with SmolLM2's tokenizer (its ids are < every listed vocabulary size)."""
    from dpo_fast.assets import smollm2_dir

    if args.arch is None:
        return str(smollm2_dir())
    import torch
    import transformers

    out = tmp / f"random-{args.arch}"
    if not (out / "config.json").is_file():
        spec = dict(ARCHS[args.arch])
        cfg = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(out)
        transformers.AutoTokenizer.from_pretrained(str(smollm2_dir())).save_pretrained(out)
    return str(out)


def _synthetic_rows(args, model_dir: str) -> List[Dict[str, str]]:
    """``--synthetic T``: text rows of about T tokens per sequence, the prompt
    ``--prompt-share`` of them, decoded from random ids of the tokenizer's plain tokens (both
    trainers re-tokenize them identically; ``visit_order`` returns the exact ids)."""
    import numpy as np
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(args.seed)
    p = int(args.synthetic * args.prompt_share)

    def text(n):
        return tok.decode(rng.integers(1000, 40000, n).tolist())

    return [{"prompt": text(p), "chosen": " " + text(args.synthetic - p),
             "rejected": " " + text(args.synthetic - p)}
            for _ in range(args.steps * args.batch_size)]


def long_review_rows(args, model_dir: str) -> List[Dict[str, str]]:
    """``--long-reviews T``: rows of about T tokens per sequence from real Rotten Tomatoes
    text: the prompt (``--prompt-share`` of T) quotes critics' reviews end to end, the chosen
    response is fresh reviews and the rejected one rotten reviews, each cut to the rest of T
    (token counts by the model's tokenizer; each row starts at other reviews)."""
    import transformers

    from dpo_fast.assets import rotten_tomatoes_pairs

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    train, _ = rotten_tomatoes_pairs(eval_fraction=0.1, seed=0)
    quoted = [t for r in train for t in (r["chosen"], r["rejected"])]
    fresh = [r["chosen"] for r in train]
    rotten = [r["rejected"] for r in train]
    t = args.long_reviews
    p = int(t * args.prompt_share)

    def cut(texts, start, n):
        ids: List[int] = []
        k = start
        while len(ids) < n:
            ids += tok(texts[k % len(texts)].strip() + "\n", add_special_tokens=False)["input_ids"]
            k += 1
        return tok.decode(ids[:n]), k

    rows, a, b = [], 0, 0
    for _ in range(args.steps * args.batch_size):
        prompt, a = cut(quoted, a, p - 16)
        chosen, b = cut(fresh, b, t - p)
        rejected, _ = cut(rotten, b, t - p)
        rows.append({"prompt": "What critics wrote:\n" + prompt + "\nWrite a review:",
                     "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def _all_rows(args, model_dir: str) -> List[Dict[str, str]]:
    """The rows dpo_fast's trainer is given (it picks and orders the pairs it visits)."""
    if getattr(args, "long_reviews", 0):
        return long_review_rows(args, model_dir)
    return _synthetic_rows(args, model_dir) if args.synthetic else _rows(args)


def _visit(args, model_dir: str):
    """The pairs dpo_fast's trainer visits, in order (``trl_parity.VisitOrder``: rows, token
    ids, tokens per step) -- every case trains on exactly these."""
    rows = _all_rows(args, model_dir)
    order = trl_parity.visit_order(rows, batch_size=args.batch_size, seed=args.seed,
                                   max_length=args.max_length, steps=args.steps,
                                   model_dir=model_dir)
    return order


def _examples(ids):
    import numpy as np

    from dpo_fast.data import PreferenceExample

    return [PreferenceExample(*(np.asarray(x, dtype=np.int32) for x in t)) for t in ids]



# ----------------------------------------------------------------------------- FLOPs


def model_flops(cfg, ids: Sequence[Sequence[Sequence[int]]]) -> float:
    """Training FLOPs of the policy on ``ids`` (per pair [prompt, chosen, rejected]): 3x the
    forward's matmul FLOPs (forward + backward) over both sequences of each pair -- the
    linear layers (2 per weight per token), the attention scores and values (causal: 4 * d
    * (t + 1) / 2 per layer at position t), and the LM head on response positions only (the
    rows the loss reads). The reference model's forward is not counted (it is not training
    work, and a cache removes it)."""
    d = cfg.hidden_size
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    kv = getattr(cfg, "num_key_value_heads", heads) * hd
    lin = layers * (d * heads * hd * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size)
    total = 0.0
    for p, c, r in ids:
        for resp in (c, r):
            t = len(p) + len(resp)
            total += 2 * lin * t + layers * 4 * heads * hd * t * (t + 1) / 2
            total += 2 * d * cfg.vocab_size * len(resp)
    return 3 * total


# ---------------------------------------------------------------------------- workers


_HWM_BEFORE_RESETS: List[int] = []


def _track_hwm_resets() -> None:
    """Resetting VmHWM (``harness.reset_hwm``, also called inside ``trl_parity``) also resets
    ``ru_maxrss``; keep the peak reached before each reset for the whole-process figure."""
    reset = harness.reset_hwm

    def tracked() -> None:
        _HWM_BEFORE_RESETS.append(harness.hwm_bytes())
        reset()

    harness.reset_hwm = tracked


def _peaks(rec: Dict[str, Any]) -> Dict[str, Any]:
    rec["process_peak_mb"] = max(_HWM_BEFORE_RESETS + [harness.hwm_bytes()]) / 2**20
    return rec


def _device_peak(args) -> Optional[float]:
    if args.device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def worker_trl(args, model_dir: str) -> Dict[str, Any]:
    order = _visit(args, model_dir)
    extra = {"ref_cache_dir": str(Path(args.workdir) / f"{args.case}_{args.variant}")} \
        if args.case in CACHE_CASES else {}
    rec = trl_parity.run_trl(model_dir, order.rows, **_settings(args), device=args.device,
                             precision=args.precision, **TRL_CASES[args.case], **extra)
    return _peaks({"losses": [s["loss"] for s in rec["steps"]],
                   "times": [s["time_s"] for s in rec["steps"]],
                   "tokens": [s["tokens"] for s in rec["steps"]],
                   "peak_rss_mb": rec["peak_rss_mb"], "device_peak_mb": rec.get("peak_gpu_mb"),
                   "precompute_s": rec["precompute_s"],
                   "precompute_pairs": rec["precompute_pairs"],
                   "ref_hash_s": rec["ref_hash_s"], "ids": order.ids})


def worker_plain(args, model_dir: str) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import transformers

    from dpo_fast import pack_pair_batch
    from dpo_fast.train.modeling import lr_lambda

    order = _visit(args, model_dir)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for m in (policy, ref):
        m.config.use_cache = False
        m.to(dev)
    ref.eval().requires_grad_(False)
    policy.train()
    auto = torch.autocast(dev.type, torch.bfloat16, enabled=args.precision == "bf16")

    def seq_logps(model, pb):
        with auto:
            logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
        lp = torch.log_softmax(logits.float(), -1)
        mask = pb.targets != -100
        return (lp.gather(2, pb.targets.clamp(min=0)[..., None])[..., 0] * mask).sum(1)

    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", 0, args.steps))
    ex = _examples(order.ids)
    times, tokens, losses = [], [], []
    _reset_peaks(args)
    for k in range(args.steps):
        harness.sync(args.device)
        t0 = time.perf_counter()
        batch = ex[k * args.batch_size:(k + 1) * args.batch_size]
        pb = pack_pair_batch(batch, device=dev)
        b = len(batch)
        pol = seq_logps(policy, pb)
        with torch.no_grad():
            rf = seq_logps(ref, pb)
        h = (pol[:b] - rf[:b]) - (pol[b:] - rf[b:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        harness.sync(args.device)
        times.append(time.perf_counter() - t0)
        tokens.append(int(pb.attention_mask.sum()))
    return _peaks({"losses": losses, "times": times, "tokens": tokens,
                   "peak_rss_mb": harness.hwm_bytes() / 2**20,
                   "device_peak_mb": _device_peak(args), "precompute_s": 0.0})


def _reset_peaks(args) -> None:
    harness.reset_hwm()
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _settings(args) -> Dict[str, Any]:
    """The training settings every case shares (``trl_parity.run_trl`` / ``run_dpo_fast``)."""
    return dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=0.1,
                loss_type="sigmoid", max_length=args.max_length, seed=args.seed)


def worker_dpo_fast(args, model_dir: str) -> Dict[str, Any]:
    """dpo_fast's trainer on all rows (it picks the visited pairs), reusing the cache the
    precompute worker filled (the second run)."""
    order = _visit(args, model_dir)
    rec = trl_parity.run_dpo_fast(model_dir, _all_rows(args, model_dir), **_settings(args),
                                  gradient_checkpointing=args.case == "dpo_fast_ckpt",
                                  ref_cache_dir=args.ref_cache, device=args.device,
                                  precision=args.precision,
                                  adaptive_threads=getattr(args, "adaptive_threads", True),
                                  attention=getattr(args, "attention", "auto"),
                                  share_prompt=not getattr(args, "no_share_prompt", False))
    if rec["ids"] != order.ids:
        raise RuntimeError("dpo_fast trained on other pairs than the planned visit order")
    return _peaks({"losses": [s["loss"] for s in rec["steps"]],
                   "times": [s["time_s"] for s in rec["steps"]],
                   "tokens": [s["tokens"] for s in rec["steps"]],
                   "peak_rss_mb": rec["peak_rss_mb"], "device_peak_mb": rec.get("peak_gpu_mb"),
                   "precompute_s": rec["precompute_s"], "attention": rec["attention"],
                   "cpu_threads": rec.get("cpu_threads")})


def worker_dpo_fast_precompute(args, model_dir: str) -> Dict[str, Any]:
    """The first run's one-off cost: fill a cold reference cache for the visited pairs."""
    from dpo_fast.train import Trainer

    order = _visit(args, model_dir)
    shutil.rmtree(args.ref_cache, ignore_errors=True)
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(trl_parity.dpo_fast_config(
            model_dir, _all_rows(args, model_dir), output_dir=out, ref_cache_dir=args.ref_cache,
            **_settings(args), device=args.device, precision=args.precision))
        t.prepare_data()
        t.plan()
        t.prepare_model()
        harness.sync(args.device)
        t0 = time.perf_counter()
        t.prepare_reference()
        harness.sync(args.device)
        dt = time.perf_counter() - t0
    return _peaks({"precompute_s": dt, "pairs": len(order.ids),
                   "tokens": sum(order.tokens_per_step)})


def worker_forward(args, model_dir: str) -> Dict[str, Any]:
    """A plain no-grad forward (full logits -> log_softmax -> gather) of the visited pairs in
    padded batches: what computing reference log-probs by hand costs."""
    import torch
    import transformers

    from dpo_fast import pack_pair_batch

    order = _visit(args, model_dir)
    dev = torch.device(args.device)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.to(dev).eval()
    ex = _examples(order.ids)
    auto = torch.autocast(dev.type, torch.bfloat16, enabled=args.precision == "bf16")
    harness.sync(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(ex), args.batch_size):
            pb = pack_pair_batch(ex[k:k + args.batch_size], device=dev)
            with auto:
                logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
            lp = torch.log_softmax(logits.float(), -1)
            (lp.gather(2, pb.targets.clamp(min=0)[..., None])[..., 0]
             * (pb.targets != -100)).sum(1).tolist()
    harness.sync(args.device)
    return _peaks({"seconds": time.perf_counter() - t0, "pairs": len(ex),
                   "tokens": sum(order.tokens_per_step)})


WORKERS = {"trl_default": worker_trl, "trl_precompute": worker_trl, "trl_no_ckpt": worker_trl,
           "plain": worker_plain, "dpo_fast": worker_dpo_fast, "dpo_fast_ckpt": worker_dpo_fast,
           "dpo_fast_precompute": worker_dpo_fast_precompute, "forward": worker_forward,
           "dropin": worker_trl, "dropin_packed": worker_trl, "dropin_cache": worker_trl,
           "dropin_matched": worker_trl}


# ---------------------------------------------------------------------------- report


def summarize(r: Dict[str, Any], warmup: int, flops_per_token: float) -> Dict[str, Any]:
    t, k = r["times"][warmup:], r["tokens"][warmup:]
    tps = sum(k) / sum(t)
    return {"median_step_s": sorted(t)[len(t) // 2], "tokens_per_s": tps,
            "model_gflops_per_s": tps * flops_per_token / 1e9,
            "peak_rss_mb": r["peak_rss_mb"], "process_peak_mb": r["process_peak_mb"],
            "device_peak_mb": r.get("device_peak_mb")}


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def report(variant: str, args, res: Dict[str, Any], peak_gflops: float) -> str:
    cases = [c for c in CASES if c in res]
    per_token = res["_flops"] / sum(res["_tokens"])
    s = {c: summarize(res[c], args.warmup, per_token) for c in cases}
    base = s.get("trl_default")
    pre = s.get("trl_precompute")
    plain = s.get("plain")
    mem_key = "device_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    mem_name = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB (loop)"
    rows = []
    ref_losses = res["trl_default"]["losses"] if "trl_default" in res else None
    for c in cases:
        x = s[c]
        diff = max(abs(a - b) for a, b in zip(res[c]["losses"], ref_losses)) \
            if ref_losses else None
        rows.append([LABELS[c], harness.fmt(x["median_step_s"], ".2f"),
                     harness.fmt(x["tokens_per_s"], ".1f"),
                     _ratio(x["tokens_per_s"], base and base["tokens_per_s"]),
                     _ratio(x["tokens_per_s"], pre and pre["tokens_per_s"]),
                     _ratio(x["tokens_per_s"], plain and plain["tokens_per_s"]),
                     harness.fmt(x["model_gflops_per_s"], ".1f"),
                     f"{100 * x['model_gflops_per_s'] / peak_gflops:.1f}%",
                     harness.fmt(x[mem_key], ".0f"),
                     _ratio(x[mem_key], base and base[mem_key]),
                     harness.fmt(x["process_peak_mb"], ".0f"),
                     "—" if diff is None else f"{diff:.1e}"])
    pr, fw = res.get("dpo_fast_precompute"), res.get("forward")
    trl_pre = res.get("trl_precompute")
    tok = sum(res["_tokens"])
    one_off = []
    if pr:
        one_off.append(["dpo_fast precompute, first run (cold cache)",
                        harness.fmt(pr["precompute_s"], ".1f"),
                        harness.fmt(tok / pr["precompute_s"], ".0f"),
                        _ratio(tok / pr["precompute_s"], fw and tok / fw["seconds"])])
    if "dpo_fast" in res:
        one_off.append(["dpo_fast precompute, second run (reuses the cache)",
                        harness.fmt(res["dpo_fast"]["precompute_s"], ".2f"), "—", "—"])
    dc = res.get("dropin_cache")
    if dc:
        one_off.append(["drop-in precompute_ref_log_probs, first run (fills dpo_fast's cache)",
                        harness.fmt(dc["precompute_first_s"], ".1f"),
                        harness.fmt(tok / dc["precompute_first_s"], ".0f"), "—"])
        one_off.append(["drop-in precompute_ref_log_probs, second run (reuses the cache)",
                        harness.fmt(dc["precompute_s"], ".2f"), "—", "—"])
    if trl_pre:
        one_off.append([f"TRL precompute_ref_log_probs (+ {trl_pre['ref_hash_s']:.1f} s "
                        "hashing the reference state_dict, every start-up)",
                        harness.fmt(trl_pre["precompute_s"], ".1f"),
                        harness.fmt(tok / trl_pre["precompute_s"], ".0f"),
                        _ratio(tok / trl_pre["precompute_s"], fw and tok / fw["seconds"])])
    if fw:
        one_off.append(["plain no-grad full-logits forward, padded batches",
                        harness.fmt(fw["seconds"], ".1f"), harness.fmt(tok / fw["seconds"], ".0f"),
                        "1.00x"])
    v = res["_info"]
    md = (f"## {variant}: max_length {args.max_length}, {args.steps} steps x {args.batch_size} "
          f"pairs, {v['tokens_per_pair']:.0f} tokens per pair, prompt "
          f"{100 * v['prompt_share']:.0f}% of them\n\n"
          + harness.md_table(["case", "median step s", "tokens/s", "vs TRL default",
                              "vs TRL precompute", "vs plain", "model GFLOP/s",
                              f"of matmul peak ({peak_gflops:.0f} GFLOP/s)", mem_name,
                              "vs TRL default", "process peak RSS MiB",
                              "max |loss - TRL default loss|"], rows)
          + "\n" + harness.md_table(["one-off", "seconds", "tokens/s", "vs plain forward"],
                                    one_off))
    res["_summary"] = s
    return md


def _targets(res: Dict[str, Any], args) -> List[str]:
    s = res.get("_summary", {})
    out = []
    mem = "device_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    f = s.get("dpo_fast")
    for name, key, goal in (("TRL default", "trl_default", 2.0),
                            ("TRL precompute", "trl_precompute", 1.3),
                            ("plain loop", "plain", 1.2)):
        if f and key in s:
            r = f["tokens_per_s"] / s[key]["tokens_per_s"]
            out.append(f"tokens/s vs {name}: {r:.2f}x (target >= {goal}x: "
                       f"{'met' if r >= goal else 'NOT met'})")
    for c in ("dpo_fast", "dpo_fast_ckpt"):
        if c in s and "trl_default" in s:
            r = s[c][mem] / s["trl_default"][mem]
            out.append(f"{LABELS[c]} peak memory vs TRL default: {r:.2f}x (target <= 0.6x: "
                       f"{'met' if r <= 0.6 else 'NOT met'})")
    d, t = s.get("dropin_packed"), s.get("trl_default")
    if d and t:  # the drop-in's targets (its padded form is reported beside it)
        r, m = d["tokens_per_s"] / t["tokens_per_s"], d[mem] / t[mem]
        out.append(f"{LABELS['dropin_packed']} vs TRL default: {r:.2f}x tokens/s (target >= 2x: "
                   f"{'met' if r >= 2 else 'NOT met'}), {m:.2f}x peak memory (target <= 0.85x: "
                   f"{'met' if m <= 0.85 else 'NOT met'})")
    dc = s.get("dropin_cache")
    if dc and t:
        r, m = dc["tokens_per_s"] / t["tokens_per_s"], dc[mem] / t[mem]
        out.append(f"{LABELS['dropin_cache']} vs TRL default: {r:.2f}x tokens/s, {m:.2f}x peak "
                   "memory")
    if res.get("dropin_cache"):
        x = res["dropin_cache"]["precompute_s"]
        out.append(f"drop-in second run's reference pass: {x:.2f} s (target <= 1 s: "
                   f"{'met' if x <= 1.0 else 'NOT met'})")
    if d and f:
        r = d["tokens_per_s"] / f["tokens_per_s"]
        out.append(f"{LABELS['dropin_packed']} vs dpo-fast train: {r:.2f}x tokens/s (target >= "
                   f"0.8x: {'met' if r >= 0.8 else 'NOT met'})")
    dm = s.get("dropin_matched")
    if dm and f:
        r, m = dm["tokens_per_s"] / f["tokens_per_s"], dm[mem] / f[mem]
        out.append(f"{LABELS['dropin_matched']} vs dpo-fast train: {r:.2f}x tokens/s, {m:.2f}x "
                   "peak memory")
    if dm and t:
        r, m = dm["tokens_per_s"] / t["tokens_per_s"], dm[mem] / t[mem]
        out.append(f"{LABELS['dropin_matched']} vs TRL default: {r:.2f}x tokens/s, {m:.2f}x peak "
                   "memory")
    pr, fw = res.get("dpo_fast_precompute"), res.get("forward")
    if pr and fw:
        r = fw["seconds"] / pr["precompute_s"]
        out.append(f"precompute throughput vs plain no-grad forward: {r:.2f}x (target >= 0.9x: "
                   f"{'met' if r >= 0.9 else 'NOT met'})")
    return out


def plot(path: Path, results: Dict[str, Dict[str, Any]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = "device_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    variants = list(results)
    fig, axes = plt.subplots(len(variants), 2, figsize=(12, 3.2 * len(variants)), squeeze=False)
    for row, v in zip(axes, variants):
        s = results[v]["_summary"]
        cases = [c for c in CASES if c in s]
        colors = ["#4c72b0" if c.startswith(("dpo_fast", "dropin")) else "#999999" for c in cases]
        labels = [LABELS[c] for c in cases]
        for ax, key, title in ((row[0], "tokens_per_s", "tokens/s (higher is better)"),
                               (row[1], mem, "peak memory MiB (lower is better)")):
            vals = [s[c][key] for c in cases]
            ax.barh(labels, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(f"{v}: {title}", fontsize=10)
            for i, x in enumerate(vals):
                ax.text(x, i, f" {x:.0f}", va="center", fontsize=8)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _variant_info(ids) -> Dict[str, float]:
    tot = sum(trl_parity.pair_token_count(t) for t in ids)
    prompt = sum(2 * len(t[0]) for t in ids)
    return {"tokens_per_pair": tot / len(ids), "prompt_share": prompt / tot}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=list(VARIANTS), action="append")
    p.add_argument("--steps", type=int, default=None, help="default: 20 short, 8 long")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timings")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=list(CASES) + list(ONE_OFF),
                   choices=list(CASES) + list(ONE_OFF))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--arch", choices=list(ARCHS), default=None,
                   help="random model of this shape instead of SmolLM2 (GPU mode)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="random token ids, this many tokens per sequence (GPU mode)")
    p.add_argument("--prompt-share", type=float, default=0.5)
    p.add_argument("--long-reviews", type=int, default=0,
                   help="Rotten Tomatoes reviews end to end, this many tokens per sequence "
                        "(benchmarks/bench_long.py)")
    p.add_argument("--attention", default="auto", help="dpo_fast's TrainConfig.attention")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="dpo_fast with share_prompt=false")
    p.add_argument("--max-fit", type=int, nargs="*", default=None, metavar="T",
                   help="instead of the table: the longest of these sequence lengths (tokens "
                        "per sequence, 1 pair per step) one training step of TRL default and "
                        "of dpo_fast fits in")
    p.add_argument("--name", default="train_cpu")
    p.add_argument("--workdir", default=None, help="model / cache scratch folder")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case")
    p.add_argument("--ref-cache")
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        harness.disable_thp()
        harness.start_rss_sampler()
        _track_hwm_resets()
        args.variant = args.variant[0]  # a worker runs one variant
        model_dir = prepared_model_dir(args, Path(args.workdir))
        print(json.dumps(WORKERS[args.case](args, model_dir)))
        return
    import torch

    torch.set_num_threads(args.threads)
    variants = args.variant or (["short"] if args.synthetic else ["short", "long"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    if args.max_fit is not None:
        max_fit(args, work)
        return
    all_results: Dict[str, Dict[str, Any]] = {}
    mds = []
    peak = harness.peak_matmul_gflops(args.device, dtype=torch.bfloat16
                                      if args.precision == "bf16" else torch.float32)
    for variant in variants:
        steps = args.steps or (20 if variant == "short" else 8)
        max_length = args.max_length or (args.synthetic * 2 if args.synthetic
                                         else VARIANTS[variant]["max_length"])
        vargs = argparse.Namespace(**{**vars(args), "variant": variant, "steps": steps,
                                      "max_length": max_length})
        common = _worker_args(vargs, work, work / f"ref_cache_{variant}")
        res: Dict[str, Any] = {}
        order = [c for c in ("dpo_fast_precompute",) + CASES + ("forward",) if c in args.cases]
        for case in order:
            t0 = time.perf_counter()
            first = None
            if case in CACHE_CASES:  # a first run fills the cache; the second is measured
                shutil.rmtree(work / f"{case}_{variant}", ignore_errors=True)
                first = harness.run_worker(Path(__file__), [*common, "--case", case],
                                           timeout=7200, live_rss=False)
                if "error" in first:
                    raise SystemExit(f"{variant}/{case} (first run) failed: {first['error']}")
            r = harness.run_worker(Path(__file__), [*common, "--case", case], timeout=7200,
                                   live_rss=False)
            if "error" in r:
                raise SystemExit(f"{variant}/{case} failed: {r['error']}")
            if first is not None:
                r["precompute_first_s"] = first["precompute_s"]
            res[case] = r
            print(f"{variant}/{case}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(prepared_model_dir(vargs, work))
        ids = res.get("trl_default", {}).get("ids") or trl_parity.visit_order(
            _rows(vargs), batch_size=args.batch_size, seed=args.seed, max_length=max_length,
            steps=steps, model_dir=prepared_model_dir(vargs, work)).ids
        res["_tokens"] = [trl_parity.pair_token_count(t) for t in ids]
        res["_flops"] = model_flops(cfg, ids)
        res["_info"] = _variant_info(ids)
        mds.append(report(variant, vargs, res, peak))
        res["_targets"] = _targets(res, vargs)
        mds[-1] += "\n" + "\n".join(f"- {t}" for t in res["_targets"]) + "\n"
        for c in CASES:
            res.get(c, {}).pop("ids", None)
        all_results[variant] = res
    info = harness.machine()
    model = f"random {args.arch}-shaped model" if args.arch else "SmolLM2-135M-Instruct"
    md = (f"# DPO training: dpo_fast vs TRL {_trl_version()} vs a plain loop ({info['date']})\n\n"
          f"{model}, {args.precision}, {args.device}, "
          f"{info.get('gpu', info['host_cpu'])}, {info['threads']} threads, torch "
          f"{info['torch']}; AdamW lr {args.lr}, sigmoid DPO beta 0.1, seed {args.seed}; "
          f"every case trains on the same pairs in the same order; timings over steps "
          f"{args.warmup + 1}..S. Matmul peak measured in this run: {peak:.0f} GFLOP/s.\n\n"
          + "\n".join(mds))
    harness.write_results(args.name, {"machine": info, "args": vars(args),
                                      "matmul_peak_gflops": peak, "results": all_results}, md)
    plot(harness.RESULTS / f"{args.name}.png", all_results, args)
    print(md)


def _worker_args(args, work: Path, ref_cache: Path) -> List[str]:
    """The command line of a worker for ``args`` (one variant, its steps and max_length)."""
    out = ["--variant", args.variant, "--steps", str(args.steps),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads),
           "--device", args.device, "--precision", args.precision,
           "--synthetic", str(args.synthetic), "--prompt-share", str(args.prompt_share),
           "--workdir", str(work), "--ref-cache", str(ref_cache)]
    return out + (["--arch", args.arch] if args.arch else [])


def max_fit(args, work: Path) -> None:
    """For TRL default and dpo_fast: the longest sequence (of ``--max-fit`` lengths, tried
    shortest first) with which one training step of 1 pair fits in memory."""
    lengths = sorted(args.max_fit or [2048, 4096, 8192, 16384, 32768, 65536])
    out: Dict[str, Any] = {}
    for case in ("trl_default", "dpo_fast"):
        out[case] = {"fits": None, "tried": {}}
        for t in lengths:
            fit = argparse.Namespace(**{**vars(args), "variant": "short", "steps": 2,
                                        "max_length": 2 * t, "batch_size": 1, "synthetic": t})
            common = _worker_args(fit, work, work / f"ref_cache_fit_{t}")
            cases = ["dpo_fast_precompute", case] if case == "dpo_fast" else [case]
            for c in cases:  # dpo_fast: fill the cache, then train (a second run)
                r = harness.run_worker(Path(__file__), [*common, "--case", c], timeout=1800,
                                       live_rss=False)
                if "error" in r:
                    break
            ok = "error" not in r
            out[case]["tried"][t] = "fits" if ok else r["error"][:160]
            print(f"max-fit {case} T={t}: {'fits' if ok else r['error'][:160]}", file=sys.stderr)
            if not ok:
                break
            out[case]["fits"] = t
    info = harness.machine()
    md = (f"# Longest sequence one DPO step fits in ({info['date']}, "
          f"{info.get('gpu', info['host_cpu'])}, {args.arch or 'SmolLM2-135M'}, "
          f"{args.precision}, 1 pair per step, prompt {args.prompt_share:.0%} of each "
          f"sequence)\n\n"
          + harness.md_table(["case", "longest T that fits", "tried"],
                             [[LABELS[c], str(v["fits"]), "; ".join(f"{k}: {x}" for k, x in
                                                                    v["tried"].items())]
                              for c, v in out.items()]))
    harness.write_results(args.name, {"machine": info, "args": vars(args), "results": out}, md)
    print(md)


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "(not installed)"


if __name__ == "__main__":
    main()
