"""``dpo-fast eval``: held-out metrics of a trained model against an existing reference cache
(the one its run filled), and with ``sample_prompts`` sampled, scored responses."""

from __future__ import annotations

from typing import Any, Dict, Optional

from . import reference
from .sampling import scored_samples


def evaluate_against_cache(trainer, ref_cache_dir, ref_model: Optional[str] = None
                           ) -> Dict[str, Any]:
    """Held-out metrics of ``trainer.config.model`` on ``config.eval_data``, with the reference
    values of the cache at ``ref_cache_dir``. Pairs the cache lacks are computed with
    ``ref_model`` if given, else they are an error naming the count. ``trainer``: a
    :class:`dpo_fast.train.Trainer` (its data, model and step machinery are set up here)."""
    cfg = trainer.config
    trainer.prepare_data()
    trainer.prepare_model()
    trainer.model.eval()
    trainer.prepare_compute()
    held_out = trainer.eval_data.examples
    if cfg.needs_reference:
        trainer.reference.eval = reference.eval_reference(
            cfg, trainer.tokenizer, held_out, ref_cache_dir, ref_model, trainer.device,
            trainer.output_dir)
    out: Dict[str, Any] = {"pairs": len(held_out), **trainer.evaluate()}
    if cfg.sample_prompts:
        texts = trainer.sample_responses("after")
        out.update(scored_samples(trainer.tokenizer, trainer.sample_prompts, texts,
                                  cfg.sample_scorer))
    return out
