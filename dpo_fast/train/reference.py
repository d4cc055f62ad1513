"""The reference pass: fill the on-disk cache for the pairs the run will visit (the
reference model, if separate, is loaded, used and freed here) and look their log-probs up
into dense tables the steps index by pair. Under FSDP2 the pass runs through the sharded
model, every rank in lockstep."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..data import PreferenceExample
from ..models import load_model
from ..refcache import MissingRowsError, RefLogProbCache, fingerprint
from .config import TrainConfig
from .distributed import DistContext, FsdpSettings, reshard
from .modeling import model_dtype
from .sharding import base_state, is_peft, load_sharded


@dataclass
class ReferenceTables:
    """Reference log-probs by pair: ``train`` [n_train, 2] and ``eval`` [n_eval, 2] float32
    (columns chosen, rejected); train rows no step visits stay NaN and are never read. Both
    None for a reference-free loss."""

    train: Optional[np.ndarray] = None
    eval: Optional[np.ndarray] = None


def ref_batch_tokens(cfg: TrainConfig, device: torch.device) -> int:
    """``ref_batch_tokens``, or its device default: 1024 on CPU (measured on SmolLM2: 1.7x
    faster than 16384-token batches, whose activations fall out of cache), 16384 else."""
    if cfg.ref_batch_tokens is not None:
        return cfg.ref_batch_tokens
    return 1024 if device.type == "cpu" else 16384


def cache_path(cfg: TrainConfig, output_dir: Path) -> Path:
    """``ref_cache_dir``, else ``<output_dir>/ref_cache``."""
    return Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else Path(output_dir) / "ref_cache"


def pair_table(cache: RefLogProbCache, examples: Sequence[PreferenceExample],
               ld_alpha: Optional[float] = None) -> np.ndarray:
    """[n, 2] float32 (chosen, rejected) of ``examples`` from ``cache``. With ``ld_alpha``
    (LD-DPO; the cache must hold per-token values): each sequence's sum over its first
    min(|chosen|, |rejected|) tokens plus ``ld_alpha`` times the sum over the rest."""
    if ld_alpha is None:
        c, r = cache.lookup([e.key_bytes for e in examples], split=True)
        return np.stack([c.numpy(), r.numpy()], axis=1)
    return ld_pair_table(cache, examples, ld_alpha)


def ld_pair_table(cache: RefLogProbCache, examples: Sequence[PreferenceExample],
                  ld_alpha: float) -> np.ndarray:
    """:func:`pair_table` with LD-DPO's split, from the per-token values of ``cache``
    (float64 sums, as the cache's own sequence sums)."""
    if not cache.per_token:
        raise ValueError(f"ld_alpha needs the reference's per-token log-probs; the cache at "
                         f"{cache.path} holds sequence sums only (build it with per_token=True, "
                         "or use another ref_cache_dir)")
    out = np.empty((len(examples), 2), dtype=np.float32)
    cache.lookup([e.key_bytes for e in examples])  # MissingRowsError for absent pairs first
    for i, e in enumerate(examples):
        c, r = (t.numpy().astype(np.float64) for t in cache.token_logps(e.key_bytes))
        s = min(c.size, r.size)
        out[i, 0] = c[:s].sum() + ld_alpha * c[s:].sum()
        out[i, 1] = r[:s].sum() + ld_alpha * r[s:].sum()
    return out


def release_memory(device: torch.device) -> None:
    """Collects what the caller just dropped (a reference model) and, on CUDA, returns the
    cached blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_view(model: torch.nn.Module):
    """``(module, context)``: what computes the reference for ``model``: a peft model's base
    model with its adapters off inside ``context``, else the model itself."""
    if is_peft(model):
        return model.get_base_model(), model.disable_adapter()
    return model, contextlib.nullcontext()


def fill_reference(cfg: TrainConfig, policy: torch.nn.Module, tokenizer,
                   train: Sequence[PreferenceExample], needed: np.ndarray,
                   held_out: Optional[Sequence[PreferenceExample]], device: torch.device,
                   output_dir: Path, *, stage: Callable[[str], None],
                   progress: Callable, root: Optional[torch.nn.Module] = None,
                   dist: Optional[DistContext] = None,
                   fsdp: Optional[FsdpSettings] = None) -> ReferenceTables:
    """Reference log-probs of the train pairs ``needed`` (sorted indices) and of every
    held-out pair, from the cache (computed there first where missing). The reference is
    ``cfg.ref_model`` if set, else ``policy`` (before any training step; a peft policy with
    its adapters off).

    ``root``: the FSDP2 root of a sharded ``policy`` (:mod:`.sharding`). The pass then runs
    inside the root's forward (its embeddings and head gathered, each layer gathered in its
    own forward) on every rank in lockstep, and a separate ``ref_model`` is loaded sharded
    the same way (``dist``, ``fsdp``) and freed after."""
    path = cache_path(cfg, output_dir)
    examples = [train[i] for i in needed] + list(held_out or ())
    ref, ref_root = policy, root
    if cfg.ref_model is not None:
        stage(f"loading the reference model {cfg.ref_model}")
        if root is not None:
            ref, ref_root, _ = load_sharded(cfg.ref_model, dtype=model_dtype(cfg), dist=dist,
                                            device=device, fsdp=fsdp,
                                            what="TrainConfig.ref_model", seed=cfg.seed,
                                            stage=stage)
        else:
            ref = load_model(cfg.ref_model, dtype=model_dtype(cfg), device=device,
                             what="TrainConfig.ref_model")
    stage(f"reference log-probs -> {path}")
    view, adapters_off = reference_view(ref)
    bf16 = root is not None and fsdp is not None and fsdp.bf16  # gathered in bf16
    fp = fingerprint(view, tokenizer, max_length=cfg.max_length,
                     dtype=torch.bfloat16 if bf16 else None,
                     state_dict=base_state(ref) if is_peft(ref) else None)

    def build(_lm=None):
        with adapters_off:
            return RefLogProbCache.ensure(view, examples, path, fingerprint=fp,
                                          batch_tokens=ref_batch_tokens(cfg, device),
                                          progress=progress,
                                          per_token=cfg.ld_alpha is not None,
                                          rows_per_shard=cfg.ref_rows_per_shard,
                                          lockstep=ref_root is not None)

    if ref_root is None:
        cache = build()
    else:
        cache = ref_root(build)
        reshard(ref_root)
    if ref is not policy:
        del ref, view, ref_root
        release_memory(device)
    table = np.full((len(train), 2), np.nan, dtype=np.float32)
    table[needed] = pair_table(cache, [train[i] for i in needed], cfg.ld_alpha)
    return ReferenceTables(table, pair_table(cache, held_out, cfg.ld_alpha)
                           if held_out is not None else None)


def eval_reference(cfg: TrainConfig, tokenizer, held_out: Sequence[PreferenceExample],
                   ref_cache_dir, ref_model: Optional[str], device: torch.device,
                   output_dir: Path) -> np.ndarray:
    """[n, 2] reference log-probs of ``held_out`` for ``dpo-fast eval``: from the cache at
    ``ref_cache_dir``; pairs it lacks are computed with ``ref_model`` if given, else they are
    a ValueError naming the count."""
    if ref_model is not None:
        ref = load_model(ref_model, dtype=model_dtype(cfg), device=device,
                         what="TrainConfig.ref_model")
        path = ref_cache_dir or Path(output_dir) / "ref_cache"
        cache = RefLogProbCache.ensure(
            ref, held_out, path, batch_tokens=ref_batch_tokens(cfg, device),
            fingerprint=fingerprint(ref, tokenizer, max_length=cfg.max_length),
            per_token=cfg.ld_alpha is not None)
        del ref
        release_memory(device)
    elif ref_cache_dir is None or not Path(ref_cache_dir).is_dir():
        raise ValueError("no reference cache: pass --ref-cache DIR (a train run's "
                         "ref_cache) or --ref-model DIR to compute one")
    else:
        cache = RefLogProbCache.open(ref_cache_dir)
    try:
        return pair_table(cache, held_out, cfg.ld_alpha)
    except MissingRowsError as e:
        raise ValueError(f"{len(getattr(e, 'missing', ()) or ()) or 'some'} of "
                         f"{len(held_out)} pairs are not in the reference cache at "
                         f"{cache.path} (other data or max_length than the run); "
                         "pass --ref-model to compute them") from None
