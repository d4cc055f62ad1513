"""Hooks into a training run, and the tqdm progress display built on them."""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, TextIO


class TrainerCallback:
    """Override any of these; each gets the :class:`~dpo_fast.train.Trainer` and its
    :class:`~dpo_fast.train.TrainState`. Called in the process's main thread."""

    def on_stage(self, trainer, message: str) -> None:
        """A preparation stage starts (reading data, tokenizing, reference cache, ...)."""

    def on_tokenize_progress(self, trainer, done: int, total: int) -> None:
        """``done`` of ``total`` rows of a split tokenized (not called for cached data)."""

    def on_ref_progress(self, trainer, progress) -> None:
        """Reference-cache build progress (:class:`dpo_fast.refcache.BuildProgress`)."""

    def on_train_begin(self, trainer, state) -> None:
        """The loop is about to run its first step (after any resume)."""

    def on_step_begin(self, trainer, state, pairs) -> None:
        """An optimizer step starts on the train pairs ``pairs`` (indices into
        ``trainer.train_data.examples``, all ranks' pairs)."""

    def on_micro_batch(self, trainer, state, batch, out):
        """A micro-batch's loss was computed (``batch``: :class:`~dpo_fast.train.batching.
        MicroBatch`, ``out``: :class:`~dpo_fast.FusedPreferenceOutput`), before its backward
        (in training) or its metrics (held-out). Return a replacement output to change what
        the step uses, or None to keep it."""

    def on_step_end(self, trainer, state) -> None:
        """An optimizer step finished (``state.global_step`` counts it)."""

    def on_log(self, trainer, state, logs: Dict[str, float]) -> None:
        """Training metrics of the last ``logging_steps`` steps were written."""

    def on_evaluate(self, trainer, state, metrics: Dict[str, float]) -> None:
        """Held-out metrics (``eval/`` names) were computed."""

    def on_save(self, trainer, state, path) -> None:
        """A checkpoint was written at ``path``."""

    def on_train_end(self, trainer, state, result) -> None:
        """The run ended (finished, or interrupted and checkpointed)."""


class ProgressCallback(TrainerCallback):
    """A tqdm bar over the optimizer steps, with loss, reward accuracy and tokens/s, and bars
    for the reference-cache build; stage messages go to ``stream``."""

    def __init__(self, stream: Optional[TextIO] = None, **tqdm_kwargs: Any):
        self.stream = stream if stream is not None else sys.stderr
        self.kw = dict(dynamic_ncols=True, file=self.stream, **tqdm_kwargs)
        self.bar = None
        self.ref_bar = None
        self.tok_bar = None

    def on_stage(self, trainer, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"dpo-fast: {message}", file=self.stream)

    def on_tokenize_progress(self, trainer, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self.tok_bar is None:
            self.tok_bar = tqdm(total=total, desc="tokenizing", unit="row", **self.kw)
        self.tok_bar.update(done - self.tok_bar.n)
        if done >= total:
            self.tok_bar.close()
            self.tok_bar = None

    def on_ref_progress(self, trainer, progress) -> None:
        from ..progress import ProgressBar

        if self.ref_bar is None:
            self.ref_bar = ProgressBar(self.stream, label="reference log-probs")
        self.ref_bar(progress)
        if progress.event == "done":
            self.ref_bar.close()
            self.ref_bar = None

    def on_train_begin(self, trainer, state) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                        unit="step", **self.kw)

    def on_step_end(self, trainer, state) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, trainer, state, logs: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                 margin=f"{logs['rewards/margins']:.3f}",
                                 acc=f"{logs['rewards/accuracies']:.2f}",
                                 tok_s=f"{logs.get('train_tokens_per_second', 0):,.0f}",
                                 refresh=False)

    def on_evaluate(self, trainer, state, metrics: Dict[str, float]) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"dpo-fast: eval at step {state.global_step}: loss "
                   f"{metrics['eval/loss']:.4f}, reward accuracy "
                   f"{metrics['eval/rewards/accuracies']:.3f}, margin "
                   f"{metrics['eval/rewards/margins']:.4f}", file=self.stream)

    def on_train_end(self, trainer, state, result) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
