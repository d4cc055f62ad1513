"""The DPO trainer: preference data in, a trained model out, one model in memory.

Modules (data flows down this list):

- :mod:`.config` -- :class:`TrainConfig`, the typed settings;
- :mod:`.data` -- reading (``datasets``), row checks and the bad-row policy, the held-out
  split, tokenization with an on-disk cache;
- :mod:`.batching` -- per-epoch order, token-budget micro-batches, padding-free packing and
  the attention path;
- :mod:`.step` -- one micro-batch: body forward, fused head + preference loss, metric sums;
- :mod:`.checkpoint` -- atomic checkpoints and exact resume;
- :mod:`.callbacks` -- hooks and the tqdm progress display;
- :mod:`.report` -- PNG plots and TensorBoard events from the metrics;
- :mod:`.sampling` -- sampled responses to held-out prompts and their scores;
- :mod:`.loop` -- :class:`Trainer` / :func:`train`.

It imports the public surfaces of :mod:`dpo_fast.models`, :mod:`dpo_fast.data`,
:mod:`dpo_fast.refcache` and :mod:`dpo_fast.ops`; nothing else imports it (the CLI does).
"""

from .batching import PACKED_EAGER, PACKED_FLASH, PACKED_SDPA, PADDED
from .callbacks import ProgressCallback, TrainerCallback
from .checkpoint import CheckpointError
from .config import TrainConfig
from .data import DataError, PreparedData
from .loop import METRICS_FILE, Trainer, TrainingError, TrainResult, TrainState, train
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
    "PACKED_SDPA",
    "PACKED_EAGER",
    "PACKED_FLASH",
    "PADDED",
]
