"""What a run is and what it returns: :class:`TrainState` (where the run is, saved in every
checkpoint), :class:`TrainResult` (``summary.json``), :class:`TrainingError`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why
    and what to change."""


@dataclass
class TrainState:
    """Where the run is. ``epoch`` / ``step_in_epoch`` locate the next step in the
    deterministic data order; ``num_tokens`` counts input tokens trained on so far."""

    global_step: int = 0
    max_steps: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    num_tokens: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    train_seconds: float = 0.0


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns (also written to ``summary.json``).

    Attributes:
        output_dir: the run directory (metrics.jsonl, checkpoints, the final model).
        model_dir: where the final model was saved (None if not saved).
        global_step, epochs: steps done, epochs done (fractional).
        interrupted: stopped early by SIGINT / SIGTERM after writing a checkpoint.
        train_metrics: the last logged training metrics.
        eval_before, eval_after: held-out metrics before the first and after the last step.
        skipped_rows: reason -> rows left out (train and eval together).
        skipped_steps: steps skipped for a non-finite loss or gradient.
        attention: the attention path used ("packed-sdpa-block-mask", "padded", ...).
        tokens_per_second: input tokens per second of training-step time.
        peak_memory_mb: peak memory of the loop (CUDA allocated, else process RSS).
        train_pairs, eval_pairs: examples in each split.
        samples: with ``sample_prompts``: per held-out prompt, ``prompt``, the response
            sampled ``before`` and ``after`` training and their scores.
        sample_score_before, sample_score_after: mean score of the samples (``sample_scorer``).
        precompute_seconds: time spent filling the reference cache in this run.
        cpu_threads: on the CPU, the threads the run used (``adaptive_threads``: whether and
            for how long it lowered them); None on a GPU.
        phase_memory_mb: phase -> peak host RSS (MiB) of each process during it, by rank:
            ``start`` (imports, launch), ``data``, ``load``, ``reference`` (the reference
            pass), ``setup`` (wrap, optimizer, resume, first evaluation), ``train`` (the
            steps), ``finish`` (last evaluation, samples, export). The largest is the run's.
        phase_cuda_memory_mb: the same for CUDA allocated memory ({} on the CPU).
        model_state_mb: by rank, the MiB of parameters and optimizer state the process
            holds at the end of training (its shards under FSDP2).
    """

    output_dir: str
    model_dir: Optional[str]
    global_step: int
    epochs: float
    interrupted: bool
    train_metrics: Dict[str, float]
    eval_before: Dict[str, float]
    eval_after: Dict[str, float]
    skipped_rows: Dict[str, int]
    skipped_steps: int
    attention: str
    tokens_per_second: float
    peak_memory_mb: float
    train_pairs: int
    eval_pairs: int
    train_seconds: float
    checkpoint: Optional[str] = None
    samples: List[Dict[str, Any]] = field(default_factory=list)
    sample_score_before: Optional[float] = None
    sample_score_after: Optional[float] = None
    precompute_seconds: float = 0.0
    cpu_threads: Optional[str] = None
    phase_memory_mb: Dict[str, List[float]] = field(default_factory=dict)
    phase_cuda_memory_mb: Dict[str, List[float]] = field(default_factory=dict)
    model_state_mb: List[float] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
