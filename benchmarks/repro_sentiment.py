"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1 / Fig. 2),
in miniature: a reward-vs-KL frontier for DPO, Preferred-FT, Unlikelihood and Best-of-N.

Protocol (the paper's, with CPU-sized parts):

* SFT policy: SmolLM2-135M-Instruct. Prompts: "Write a one-sentence review of the movie
  '<title>'." as a chat turn, with the first 2-5 words of a real Rotten Tomatoes review as
  the start of the answer (the paper used IMDb review prefixes). Train and held-out prompts
  come from disjoint movies.
* Ground-truth reward: VADER's compound sentiment of the review (prefix + completion), in
  [-1, 1] (the paper used a sentiment classifier).
* Preference data: 4 completions per training prompt sampled from the SFT policy, scored,
  and all 6 ordered pairs formed (pairs with equal reward or identical text are left out).
* Methods, each trained with ``dpo_fast.train.Trainer`` on that data (loss options, not
  separate code paths): DPO (``sigmoid``) at several betas; Preferred-FT (``sft`` on the
  best-vs-worst pair of each prompt, i.e. SFT on the best completion); Unlikelihood
  (``unlikelihood``, a small alpha grid). Best-of-N samples N completions from the SFT policy
  and keeps the one with the highest *ground-truth* reward: an upper bound for Best-of-N
  under a learned reward; its KL is the analytic ``log N - (N - 1) / N``.
* Every ``--eval-every`` steps: one sample per held-out prompt (the same sampling seed at every
  evaluation), mean ground-truth reward, and the sequence-level KL to the SFT policy,
  ``mean over samples of sum_t [log pi(y_t) - log pi_sft(y_t)]`` (the samples are drawn from
  pi at temperature 1, so this is a Monte-Carlo estimate of KL(pi || pi_sft)).

Writes ``<out>/sentiment.json``, ``<out>/sentiment.png`` (the frontier) and
``<out>/sentiment.md`` (the table of the best reward at matched KL); the preference pairs,
the training runs and the reference cache go to ``--work`` (default ``<out>/work``).
``--smoke`` runs every method on a handful of prompts for a few steps (CI). The full run
takes about an hour on 2 CPU cores.

    python benchmarks/repro_sentiment.py                      # the full run
    python benchmarks/repro_sentiment.py --smoke --out /tmp/s  # minutes
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SYSTEM = "You are a movie critic."
USER = "Write a one-sentence review of the movie '{title}'."
KL_BINS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A chat prompt whose answer starts with ``prefix`` (the first words of a real review)."""

    movie: str
    prefix: str
    text: str  # the whole prompt string, chat template + prefix


def make_prompts(tokenizer, reviews: Sequence[Dict[str, str]], n_train: int, n_eval: int,
                 seed: int, eval_fraction: float = 0.1) -> Tuple[List[Prompt], List[Prompt]]:
    """(train, held-out) prompts from disjoint movies: movies are shuffled with ``seed``, the
    first ``eval_fraction`` are held out, and prompts are taken round-robin over each split's
    movies (one review prefix of 2-5 words per prompt, fresh and rotten reviews alike)."""
    by_movie: Dict[str, List[str]] = {}
    for r in reviews:
        if r["category"] in ("fresh", "rotten"):
            words = r["text"].split()
            if len(words) >= 6:
                by_movie.setdefault(r["movie_name"], []).append(" ".join(words))
    movies = sorted(by_movie)
    rng = random.Random(seed)
    rng.shuffle(movies)
    n_hold = max(1, int(round(eval_fraction * len(movies))))
    splits = (movies[n_hold:], movies[:n_hold])

    def build(ms: List[str], n: int) -> List[Prompt]:
        queues = {m: list(by_movie[m]) for m in ms}
        for q in queues.values():
            rng.shuffle(q)
        out: List[Prompt] = []
        for m in itertools.cycle(ms):
            if len(out) >= n or not any(queues.values()):
                break
            if not queues[m]:
                continue
            review = queues[m].pop()
            prefix = " ".join(review.split()[: rng.randint(2, 5)])
            chat = tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": USER.format(title=m)}],
                tokenize=False, add_generation_prompt=True)
            out.append(Prompt(movie=m, prefix=prefix, text=chat + prefix))
        return out

    return build(splits[0], n_train), build(splits[1], n_eval)


# ---------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], *, n: int, max_new_tokens: int, seed: int,
           batch_size: int = 64) -> Tuple[List[List[str]], List[List[np.ndarray]],
                                          List[List[float]]]:
    """``n`` completions per prompt at temperature 1 (pure sampling), with the sampling
    policy's log-prob of each (sum over the generated tokens, the end-of-sequence token
    included, from the logits ``generate`` returns).

    Returns ``(texts [P][n], token ids [P][n] (each [T_i]), logps [P][n])``. The torch RNG
    state is restored afterwards, so sampling inside a training run does not change it.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    flat = [p for p in prompts for _ in range(n)]
    texts: List[str] = []
    ids_out: List[np.ndarray] = []
    logps: List[float] = []
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(0, len(flat), batch_size):
                enc = [tokenizer(p)["input_ids"] for p in flat[i:i + batch_size]]
                width = max(len(e) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, e in enumerate(enc):
                    ids[r, width - len(e):] = torch.tensor(e)
                    mask[r, width - len(e):] = 1
                gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                     do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=eos, use_cache=True, output_logits=True,
                                     return_dict_in_generate=True)
                new = gen.sequences[:, width:].cpu()
                lp = torch.stack([torch.log_softmax(s.float(), -1) for s in gen.logits], 1)
                tok_lp = lp.cpu().gather(2, new[:, :, None])[:, :, 0]
                for r in range(new.shape[0]):
                    row = new[r]
                    stop = (row == eos).nonzero()
                    length = int(stop[0]) + 1 if stop.numel() else row.numel()
                    ids_out.append(row[:length].numpy().copy())
                    logps.append(float(tok_lp[r, :length].double().sum()))
                    texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
    finally:
        model.train(was)

    def group(xs):
        return [list(xs[j * n:(j + 1) * n]) for j in range(len(prompts))]

    return group(texts), group(ids_out), group(logps)


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts: Sequence[str], completions: Sequence[np.ndarray],
                   batch_size: int = 32) -> List[float]:
    """log p(completion | prompt) under ``model`` (sum over the completion's tokens), one
    per (prompt, completion ids) pair; right-padded batches, full-vocabulary log-softmax."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out: List[float] = []
    try:
        for i in range(0, len(prompts), batch_size):
            rows = [(tokenizer(p)["input_ids"], c.tolist())
                    for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
            width = max(len(p) + len(c) for p, c in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, c) in enumerate(rows):
                ids[r, :len(p) + len(c)] = torch.tensor(p + c)
                mask[r, :len(p) + len(c)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None].to(dev))[..., 0]
            for r, (p, c) in enumerate(rows):
                out.append(float(lp[r, len(p) - 1:len(p) + len(c) - 1].double().sum()))
    finally:
        model.train(was)
    return out


# ------------------------------------------------------------------------ preference data


def ordered_pairs(prompt: str, completions: Sequence[str], rewards: Sequence[float]
                  ) -> Tuple[List[Dict], int]:
    """Every pair (i, j) of a prompt's completions as ``{"prompt", "chosen", "rejected",
    "chosen_reward", "rejected_reward"}`` with the higher reward chosen; pairs with equal
    rewards or identical text are left out (returned count)."""
    rows, dropped = [], 0
    for i, j in itertools.combinations(range(len(completions)), 2):
        if rewards[i] == rewards[j] or completions[i] == completions[j]:
            dropped += 1
            continue
        w, l = (i, j) if rewards[i] > rewards[j] else (j, i)
        rows.append({"prompt": prompt, "chosen": completions[w], "rejected": completions[l],
                     "chosen_reward": rewards[w], "rejected_reward": rewards[l]})
    return rows, dropped


def best_of_n(rewards: np.ndarray, n: int) -> float:
    """Mean over prompts of the expected best reward among ``n`` of a prompt's samples.

    ``rewards`` is [P, M]: the M samples of a prompt are cut into M // n disjoint groups of
    n, and each group's maximum is averaged (unbiased for the expected max of n draws)."""
    p, m = rewards.shape
    if n > m or n < 1:
        raise ValueError(f"best_of_n: n={n} needs 1 <= n <= {m} samples per prompt")
    g = m // n
    return float(rewards[:, :g * n].reshape(p, g, n).max(axis=2).mean())


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) bound ``log n - (n - 1) / n`` (Stiennon et al. 2020)."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------- frontier


def frontier_table(points: Sequence[Dict], bins: Sequence[float] = KL_BINS
                   ) -> Dict[str, Dict[str, Optional[float]]]:
    """Per method family, the best mean reward among its points with KL <= each bin."""
    fams = sorted({p["family"] for p in points})
    table: Dict[str, Dict[str, Optional[float]]] = {}
    for f in fams:
        row: Dict[str, Optional[float]] = {}
        for b in bins:
            ok = [p["reward"] for p in points if p["family"] == f and p["kl"] <= b]
            row[f"{b:g}"] = max(ok) if ok else None
        table[f] = row
    return table


# ------------------------------------------------------------------------------ the run


def _vader() -> Callable[[str], float]:
    from dpo_fast.train.sampling import get_scorer

    return get_scorer("vader")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Evaluator:
    """Held-out reward and KL to the SFT policy of a model, one point per call."""

    def __init__(self, ref_model, tokenizer, prompts: Sequence[Prompt], score, *,
                 max_new_tokens: int, seed: int):
        self.ref, self.tok, self.prompts, self.score = ref_model, tokenizer, prompts, score
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def __call__(self, model) -> Dict[str, float]:
        t0 = time.perf_counter()
        texts, ids, lps = sample(model, self.tok, [p.text for p in self.prompts], n=1,
                                 max_new_tokens=self.max_new_tokens, seed=self.seed)
        texts, ids, lps = [t[0] for t in texts], [i[0] for i in ids], [x[0] for x in lps]
        ref_lps = sequence_logps(self.ref, self.tok, [p.text for p in self.prompts], ids)
        kl = np.array(lps) - np.array(ref_lps)
        rewards = np.array([self.score(p.prefix + " " + t) for p, t in zip(self.prompts, texts)])
        n = len(rewards)
        return {"reward": float(rewards.mean()),
                "reward_se": float(rewards.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                "kl": float(kl.mean()), "kl_se": float(kl.std(ddof=1) / math.sqrt(n))
                if n > 1 else 0.0,
                "mean_tokens": float(np.mean([len(i) for i in ids])),
                "example": texts[0], "seconds": time.perf_counter() - t0}


def _train_method(name: str, family: str, rows: List[Dict], loss: Dict, args, model_dir: str,
                  work: Path, evaluator: Evaluator, sft_point: Dict) -> List[Dict]:
    """Trains one method from the SFT weights; returns its frontier points."""
    from dpo_fast.train import TrainConfig, Trainer
    from dpo_fast.train.callbacks import TrainerCallback

    points = [dict(sft_point, method=name, family=family, step=0)]

    class EvalEvery(TrainerCallback):
        def on_step_end(self, trainer, state):
            s = state.global_step
            if s % args.eval_every == 0 or s == state.max_steps:
                m = evaluator(trainer.model)
                points.append(dict(m, method=name, family=family, step=s))
                _log(f"  {name} step {s}: reward {m['reward']:+.3f} +- {m['reward_se']:.3f}, "
                     f"KL {m['kl']:.2f} ({m['seconds']:.0f} s)")

    cfg = TrainConfig(
        model=model_dir, train_data=rows, output_dir=str(work / "runs" / name),
        ref_cache_dir=str(work / "ref_cache"), learning_rate=args.lr, batch_size=args.batch_size,
        max_steps=args.steps, warmup_steps=min(args.warmup, args.steps - 1),
        lr_scheduler_type="constant", max_length=256, save_steps=None, save_final_model=False,
        logging_steps=max(1, args.eval_every), seed=args.seed, device="cpu",
        overwrite_output_dir=True, **loss)
    t0 = time.perf_counter()
    res = Trainer(cfg, callbacks=[EvalEvery()]).train()
    _log(f"  {name}: {res.global_step} steps, {res.train_seconds:.0f} s training, "
         f"{time.perf_counter() - t0:.0f} s with evaluation")
    for p in points:
        p["train_seconds"] = res.train_seconds
    return points


def run(args) -> Dict:
    from dpo_fast.assets import load_smollm2, rotten_tomatoes_reviews, smollm2_dir

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    score = _vader()
    model_dir = str(smollm2_dir())
    sft, tok = load_smollm2()
    ref, _ = load_smollm2()  # the frozen SFT policy, for the KL
    train_p, eval_p = make_prompts(tok, rotten_tomatoes_reviews(), args.train_prompts,
                                   args.eval_prompts, args.seed)
    _log(f"{len(train_p)} train prompts ({len({p.movie for p in train_p})} movies), "
         f"{len(eval_p)} held-out prompts ({len({p.movie for p in eval_p})} other movies)")

    # 1. preference data from the SFT policy, as in the paper
    t0 = time.perf_counter()
    texts, _, _ = sample(sft, tok, [p.text for p in train_p], n=args.samples_per_prompt,
                         max_new_tokens=args.max_new_tokens, seed=args.seed + 1)
    pairs, best, ties = [], [], 0
    for p, comps in zip(train_p, texts):
        r = [score(p.prefix + " " + c) for c in comps]
        rows, dropped = ordered_pairs(p.text, comps, r)
        pairs.extend(rows)
        ties += dropped
        hi, lo = int(np.argmax(r)), int(np.argmin(r))
        if r[hi] > r[lo] and comps[hi] != comps[lo]:
            best.append({"prompt": p.text, "chosen": comps[hi], "rejected": comps[lo],
                         "chosen_reward": r[hi], "rejected_reward": r[lo]})
    timings["preference_data_s"] = time.perf_counter() - t0
    mean_gap = float(np.mean([x["chosen_reward"] - x["rejected_reward"] for x in pairs]))
    _log(f"preference data: {len(pairs)} ordered pairs ({ties} tied or identical left out), "
         f"mean reward gap {mean_gap:.3f}; {len(best)} best-vs-worst rows "
         f"({timings['preference_data_s']:.0f} s)")
    _atomic(work / "pairs.jsonl", "".join(json.dumps(row) + "\n" for row in pairs))

    rng = np.random.default_rng(args.seed)
    need = args.steps * args.batch_size
    train_rows = [pairs[i] for i in rng.permutation(len(pairs))[:need]]
    pft_rows = [best[i] for i in rng.permutation(len(best))[:need]]
    _log(f"each pairwise method trains on {len(train_rows)} of the {len(pairs)} pairs "
         f"({args.steps} steps x {args.batch_size}); Preferred-FT on {len(pft_rows)} best "
         "completions")

    # 2. the SFT policy's own point (KL 0 by definition; measured as a check)
    evaluator = Evaluator(ref, tok, eval_p, score, max_new_tokens=args.max_new_tokens,
                          seed=args.seed + 2)
    sft_point = evaluator(sft)
    _log(f"SFT policy: reward {sft_point['reward']:+.3f}, KL {sft_point['kl']:.4f} (should be 0)")
    del sft

    # 3. the methods
    methods = [(f"dpo_beta{b:g}", "DPO", train_rows, {"loss_type": "sigmoid", "beta": b})
               for b in args.betas]
    methods.append(("preferred_ft", "Preferred-FT", pft_rows, {"loss_type": "sft"}))
    methods += [(f"unlikelihood_alpha{a:g}", "Unlikelihood", train_rows,
                 {"loss_type": "unlikelihood", "unlikelihood_alpha": a})
                for a in args.ul_alphas]
    points: List[Dict] = []
    t0 = time.perf_counter()
    for name, family, rows, loss in methods:
        _log(f"training {name}")
        points += _train_method(name, family, rows, loss, args, model_dir, work, evaluator,
                                sft_point)
    timings["methods_s"] = time.perf_counter() - t0

    # 4. Best-of-N from the SFT policy under the ground-truth reward (an upper bound)
    t0 = time.perf_counter()
    bon_prompts = eval_p[: args.bon_prompts]
    m = max(args.bon_n)
    sft, _ = load_smollm2()
    bon_texts, _, _ = sample(sft, tok, [p.text for p in bon_prompts], n=m,
                             max_new_tokens=args.max_new_tokens, seed=args.seed + 3)
    bon_r = np.array([[score(p.prefix + " " + t) for t in ts]
                      for p, ts in zip(bon_prompts, bon_texts)])
    for n in args.bon_n:
        points.append({"method": f"best_of_{n}", "family": "Best-of-N (true reward)",
                       "step": 0, "reward": best_of_n(bon_r, n), "kl": best_of_n_kl(n),
                       "n": n, "prompts": len(bon_prompts)})
    timings["best_of_n_s"] = time.perf_counter() - t0
    _log("best-of-N: " + ", ".join(f"N={p['n']}: {p['reward']:+.3f}" for p in points
                                   if "n" in p))
    timings["total_s"] = time.perf_counter() - t_start

    result = {
        "experiment": "DPO paper Fig. 2 (controlled sentiment), miniature",
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/repro_sentiment.py", *sys.argv[1:]]),
        # Paths relative to the repository, so the committed JSON names no machine.
        "settings": {k: (os.path.relpath(v, ROOT) if k in ("out", "work", "render") and v
                         else v) for k, v in vars(args).items()},
        "data": {"train_prompts": len(train_p), "eval_prompts": len(eval_p),
                 "pairs": len(pairs), "tied_or_identical": ties,
                 "pairs_trained_per_method": len(train_rows),
                 "preferred_ft_rows": len(pft_rows), "mean_reward_gap": mean_gap},
        "sft": sft_point,
        "points": points,
        "frontier": frontier_table(points),
        "timings": timings,
    }
    write_outputs(result, out)
    return result


# ------------------------------------------------------------------------------ outputs


def _md(result: Dict) -> str:
    t = result["timings"]
    d = result["data"]
    mach = result["machine"]
    lines = [
        "# Controlled sentiment in miniature: reward vs KL (DPO paper, Fig. 2)",
        "",
        f"{result['date']}; {mach.get('host_cpu', mach.get('cpu'))}, {mach['threads']} "
        f"threads, torch {mach['torch']}. Command: `{result['command']}`. "
        f"Total {t['total_s'] / 60:.1f} min (preference data {t['preference_data_s']:.0f} s, "
        f"methods {t['methods_s'] / 60:.1f} min, Best-of-N {t['best_of_n_s']:.0f} s).",
        "",
        f"{d['train_prompts']} training prompts, {d['eval_prompts']} held-out prompts (other "
        f"movies); {d['pairs']} ordered pairs ({d['tied_or_identical']} tied or identical left "
        f"out); each pairwise method trains on {d['pairs_trained_per_method']} of them, "
        f"Preferred-FT on {d['preferred_ft_rows']} best completions. SFT policy: reward "
        f"{result['sft']['reward']:+.3f}, measured KL {result['sft']['kl']:.4f}.",
        "",
        f"Best-of-N draws N completions from the SFT policy for each of the first "
        f"{result['settings']['bon_prompts']} held-out prompts and keeps the one the "
        "ground-truth reward scores highest: an upper bound on Best-of-N under a learned "
        "reward model. Its KL is the analytic log N - (N-1)/N, and its N=1 point differs "
        "from the SFT reward only by sampling noise on fewer prompts.",
        "",
        "Best held-out reward (VADER compound, mean over prompts) among each method's "
        "checkpoints with KL(pi || pi_SFT) at most:",
        "",
    ]
    bins = list(next(iter(result["frontier"].values())).keys())
    lines.append("| method | " + " | ".join(f"KL <= {b}" for b in bins) + " |")
    lines.append("|---|" + "---|" * len(bins))
    for fam, row in result["frontier"].items():
        lines.append(f"| {fam} | " + " | ".join("—" if v is None else f"{v:+.3f}"
                                                 for v in row.values()) + " |")
    lines += ["", "Every point (method, step, reward +- s.e., KL +- s.e.):", "",
              "| method | step | reward | KL (nats) |", "|---|---|---|---|"]
    for p in result["points"]:
        if p["step"] == 0 and "n" not in p:
            continue
        se = f" +- {p['reward_se']:.3f}" if "reward_se" in p else ""
        kse = f" +- {p['kl_se']:.2f}" if "kl_se" in p else " (analytic)"
        lines.append(f"| {p['method']} | {p['step']} | {p['reward']:+.3f}{se} | "
                     f"{p['kl']:.2f}{kse} |")
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    # One colour map per family, one shade per member (e.g. per beta), so the
    # family reads at a glance and its members stay apart.
    cmaps = {"DPO": plt.cm.Blues, "Preferred-FT": plt.cm.Greens, "Unlikelihood": plt.cm.Reds}
    by_method: Dict[str, List[Dict]] = {}
    for p in result["points"]:
        if "n" not in p:
            by_method.setdefault(p["method"], []).append(p)
    family_members: Dict[str, List[str]] = {}
    for name, ps in by_method.items():
        family_members.setdefault(ps[0]["family"], []).append(name)
    markers = itertools.cycle("os^Dv<>")
    for name, ps in by_method.items():
        fam = ps[0]["family"]
        members = family_members[fam]
        shade = 0.9 - 0.45 * members.index(name) / max(1, len(members) - 1)
        color = cmaps.get(fam, plt.cm.Greys)(shade if len(members) > 1 else 0.75)
        ps = sorted(ps, key=lambda p: p["step"])
        ax.plot([p["kl"] for p in ps], [p["reward"] for p in ps], marker=next(markers),
                color=color, label=name, lw=1.2)
    bon = sorted((p for p in result["points"] if "n" in p), key=lambda p: p["n"])
    ax.plot([p["kl"] for p in bon], [p["reward"] for p in bon], "k--", marker="*", ms=9,
            label="Best-of-N, true reward (N=" + ",".join(str(p["n"]) for p in bon) + ")")
    ax.axhline(result["sft"]["reward"], color="k", lw=0.5, ls=":")
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    top = max(p["kl"] for p in result["points"])
    ax.set_xticks([t for t in (0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= 1.2 * top
                   or t <= 1])
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("KL(pi || pi_SFT), nats per sequence (held-out prompts)")
    ax.set_ylabel("mean ground-truth reward (VADER compound)")
    ax.set_title("Controlled sentiment, SmolLM2-135M, Rotten Tomatoes prompts")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_outputs(result: Dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "sentiment.json", json.dumps(result, indent=1))
    _atomic(out / "sentiment.md", _md(result))
    plot(result, out / "sentiment.png")
    _log(f"wrote {out / 'sentiment.json'}, sentiment.md, sentiment.png")


# -------------------------------------------------------------------------------- main


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: Optional[Sequence[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "sentiment"))
    ap.add_argument("--work", default=None,
                    help="pairs, training runs and reference cache (default <out>/work)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only redraw sentiment.md / .png from an earlier sentiment.json")
    ap.add_argument("--smoke", action="store_true",
                    help="a few prompts and steps of every method (CI)")
    ap.add_argument("--train-prompts", type=int, default=1000)
    ap.add_argument("--eval-prompts", type=int, default=96)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--betas", type=_floats, default=[0.05, 0.1, 1.0, 5.0])
    ap.add_argument("--ul-alphas", type=_floats, default=[0.1, 1.0])
    ap.add_argument("--bon-n", type=_ints, default=[1, 4, 16, 64])
    ap.add_argument("--bon-prompts", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_prompts, args.eval_prompts, args.max_new_tokens = 6, 4, 8
        args.steps, args.batch_size, args.eval_every, args.warmup = 2, 4, 1, 0
        args.betas, args.ul_alphas = [0.1], [1.0]
        args.bon_n, args.bon_prompts = [1, 4], 2
    if args.samples_per_prompt < 2:
        ap.error("--samples-per-prompt must be >= 2 (pairs need two completions)")
    for name in ("train_prompts", "eval_prompts", "max_new_tokens", "steps", "batch_size",
                 "eval_every", "bon_prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.bon_n or min(args.bon_n) < 1:
        ap.error("--bon-n must list sizes >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.render:  # redraw the table and the figure of an earlier run's JSON
        path = Path(args.render)
        write_outputs(json.loads(path.read_text(encoding="utf-8")), path.parent)
        return 0
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
