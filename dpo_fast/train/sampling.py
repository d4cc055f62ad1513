"""Sampled responses for held-out prompts, and scores for them (what DPO changed, in text).

The prompts are the tokenized prompts of held-out pairs (exactly what the model sees in
training). Sampling uses its own seed and restores the global RNG states afterwards, so a run
with samples trains bit for bit like one without.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data import PreferenceExample
from .checkpoint import rng_state, set_rng_state


def unique_prompts(examples: Sequence[PreferenceExample], n: int) -> List[np.ndarray]:
    """The first ``n`` distinct prompts (as id arrays) of ``examples``."""
    seen, out = set(), []
    for e in examples:
        k = e.prompt_ids.tobytes()
        if k not in seen:
            seen.add(k)
            out.append(e.prompt_ids)
            if len(out) == n:
                break
    return out


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
                     temperature: float, seed: int, device: torch.device,
                     batch_size: int = 16, synced: bool = False) -> List[str]:
    """One sampled continuation per prompt (ids [P]), decoded without special tokens.

    Pure sampling (no top-k / top-p), ``temperature`` as given, left-padded batches. The
    global torch / numpy / Python RNG states are restored afterwards. ``synced``: every rank
    of the process group calls this with the same prompts, and each keeps stepping until all
    have finished (generate's ``synced_gpus``; what a sharded model, whose every forward is a
    collective, needs).
    """
    states = rng_state()
    was = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    out: List[str] = []
    try:
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(p.size for p in chunk)
            ids = torch.full((len(chunk), width), pad if pad is not None else 0,
                             dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - p.size:] = torch.from_numpy(p.astype(np.int64))
                mask[r, width - p.size:] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 use_cache=True, synced_gpus=synced)
            for r in range(len(chunk)):
                out.append(tokenizer.decode(gen[r, width:], skip_special_tokens=True).strip())
    finally:
        model.train(was)
        set_rng_state(states["tensors"], states["json"])
    return out


def get_scorer(name: Optional[str]) -> Optional[Callable[[str], float]]:
    """A text -> score function: ``"vader"`` = VADER's compound sentiment in [-1, 1]."""
    if name is None:
        return None
    if name == "vader":
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ImportError("sample_scorer='vader' needs vaderSentiment: "
                              "pip install vaderSentiment==3.3.2") from e
        analyzer = SentimentIntensityAnalyzer()
        return lambda text: float(analyzer.polarity_scores(text)["compound"])
    raise ValueError(f"unknown sample_scorer {name!r}; use 'vader' or None")


def score_all(scorer: Optional[Callable[[str], float]], texts: Sequence[str]
              ) -> Dict[str, object]:
    """``{"scores": [...], "mean": ...}`` (empty without a scorer)."""
    if scorer is None or not texts:
        return {}
    scores = [scorer(t) for t in texts]
    return {"scores": scores, "mean": float(sum(scores) / len(scores))}


def pair_samples(tokenizer, prompts: Sequence[np.ndarray], before: List[str],
                 after: List[str], scorer_name: Optional[str]):
    """Per prompt ``{"prompt", "before", "after", "score_before", "score_after"}`` (the keys
    that exist) and the mean scores before / after: ``(rows, mean_before, mean_after)``."""
    if not before and not after:
        return [], None, None
    scorer = get_scorer(scorer_name)
    sb, sa = score_all(scorer, before), score_all(scorer, after)
    out = []
    for i, p in enumerate(prompts):
        row: Dict[str, object] = {"prompt": tokenizer.decode(p, skip_special_tokens=True)}
        for name, texts, sc in (("before", before, sb), ("after", after, sa)):
            if i < len(texts):
                row[name] = texts[i]
                if sc:
                    row[f"score_{name}"] = sc["scores"][i]
        out.append(row)
    return out, sb.get("mean"), sa.get("mean")


def scored_samples(tokenizer, prompts: Sequence[np.ndarray], texts: List[str],
                   scorer_name: Optional[str]) -> Dict[str, object]:
    """``{"samples": [{"prompt", "response", "score"?}], "sample_score_mean"?}`` (what
    ``dpo-fast eval`` adds to its metrics)."""
    scorer = get_scorer(scorer_name)
    out: Dict[str, object] = {"samples": []}
    for p, t in zip(prompts, texts):
        row = {"prompt": tokenizer.decode(p, skip_special_tokens=True), "response": t}
        if scorer is not None:
            row["score"] = scorer(t)
        out["samples"].append(row)
    if scorer is not None:
        out["sample_score_mean"] = sum(r["score"] for r in out["samples"]) / max(
            1, len(out["samples"]))
    return out
