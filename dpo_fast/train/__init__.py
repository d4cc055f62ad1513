"""The DPO trainer: preference data in, a trained model out, one model in memory.

Modules (data flows down this list):

- :mod:`.config` -- :class:`TrainConfig`, the typed settings;
- :mod:`.loop` -- :class:`Trainer` / :func:`train`: the recipe (setup, step loop, finish);
- :mod:`.runtime` -- device, peak memory, seeds, stop signals;
- :mod:`.rundir` -- checks before work, ``config.yaml``, ``summary.json``;
- :mod:`.splits` -- the train / held-out splits from the config (via :mod:`dpo_fast.data`);
- :mod:`.batching` -- per-epoch order, token-budget micro-batches, padding-free packing and
  the attention path;
- :mod:`.modeling` -- loading, dropout, LoRA, checkpointing, optimizer, schedule;
- :mod:`.reference` -- the reference cache filled for the planned pairs, lookups;
- :mod:`.step` -- one micro-batch: body forward, fused head + preference loss, metric sums;
- :mod:`.runner` -- optimizer steps and held-out passes over pair indices;
- :mod:`.distributed` -- torchrun, DDP / FSDP2 wrap, dealing pairs to ranks;
- :mod:`.metrics` -- ``metrics.jsonl`` and the logging window;
- :mod:`.checkpoint` -- atomic checkpoints and exact resume;
- :mod:`.export` -- the final model (FSDP2 gather, LoRA merge);
- :mod:`.evaluate` -- ``dpo-fast eval`` against an existing cache;
- :mod:`.state` -- :class:`TrainState`, :class:`TrainResult`, :class:`TrainingError`;
- :mod:`.callbacks` -- hooks and the tqdm progress display;
- :mod:`.report` -- PNG plots and TensorBoard events from the metrics;
- :mod:`.sampling` -- sampled responses to held-out prompts and their scores.

It imports the public surfaces of :mod:`dpo_fast.models`, :mod:`dpo_fast.data`,
:mod:`dpo_fast.refcache` and :mod:`dpo_fast.ops`; nothing else imports it (the CLI does).
"""

from .batching import PACKED_EAGER, PACKED_FLASH, PACKED_SDPA, PACKED_SEGMENTS, PADDED
from .callbacks import ProgressCallback, TrainerCallback
from .checkpoint import CheckpointError
from .config import TrainConfig
from ..data import DataError, PreparedData
from .loop import Trainer, train
from .rundir import METRICS_FILE
from .state import TrainingError, TrainResult, TrainState
from .report import PlotCallback, TensorBoardCallback, write_plots

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "TrainResult",
    "TrainState",
    "TrainerCallback",
    "ProgressCallback",
    "DataError",
    "TrainingError",
    "CheckpointError",
    "PreparedData",
    "PlotCallback",
    "TensorBoardCallback",
    "write_plots",
    "METRICS_FILE",
    "PACKED_SEGMENTS",
    "PACKED_SDPA",
    "PACKED_EAGER",
    "PACKED_FLASH",
    "PADDED",
]
