"""Looking at a run: PNG plots of ``metrics.jsonl``, and TensorBoard / plot callbacks.

- :func:`write_plots` reads ``<run_dir>/metrics.jsonl`` and writes ``loss.png``,
  ``reward_margin.png``, ``reward_accuracy.png`` and ``logps.png`` (train and eval curves
  over optimizer steps) into ``<run_dir>/plots/`` (needs ``matplotlib``).
- :class:`TensorBoardCallback` writes every logged number as a TensorBoard scalar under
  ``<output_dir>/tensorboard/`` (needs ``tensorboard``).
- :class:`PlotCallback` calls :func:`write_plots` on the run directory when training ends.

Both packages are optional and imported only when used.
"""

from __future__ import annotations

import importlib.util
import io
import json
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..fileio import atomic_write
from .callbacks import TrainerCallback
from .rundir import METRICS_FILE

PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"

MATPLOTLIB_MISSING = "plots need matplotlib: pip install matplotlib"
TENSORBOARD_MISSING = "TensorBoard logging needs tensorboard: pip install tensorboard"

PathLike = Union[str, os.PathLike]

#: One curve of a plot: metrics key, legend label, matplotlib style keywords.
_Curve = Tuple[str, str, Dict[str, Any]]

_TRAIN = {"linestyle": "-", "linewidth": 1.4}
_EVAL = {"linestyle": "--", "linewidth": 1.0, "marker": "o", "markersize": 4}

#: file name -> (title, y-axis label, curves). A plot is written when any curve has a point.
PLOTS: Dict[str, Tuple[str, str, Sequence[_Curve]]] = {
    "loss.png": ("Loss", "loss", [
        ("loss", "train", {**_TRAIN, "color": "C0"}),
        ("eval/loss", "eval", {**_EVAL, "color": "C1"}),
    ]),
    "reward_margin.png": ("Reward margin (chosen - rejected)", "reward margin", [
        ("rewards/margins", "train", {**_TRAIN, "color": "C0"}),
        ("eval/rewards/margins", "eval", {**_EVAL, "color": "C1"}),
    ]),
    "reward_accuracy.png": ("Reward accuracy (chosen reward > rejected)", "reward accuracy", [
        ("rewards/accuracies", "train", {**_TRAIN, "color": "C0"}),
        ("eval/rewards/accuracies", "eval", {**_EVAL, "color": "C1"}),
    ]),
    "logps.png": ("Policy log-probabilities", "sequence log-prob", [
        ("logps/chosen", "train chosen", {**_TRAIN, "color": "C2"}),
        ("logps/rejected", "train rejected", {**_TRAIN, "color": "C3"}),
        ("eval/logps/chosen", "eval chosen", {**_EVAL, "color": "C2"}),
        ("eval/logps/rejected", "eval rejected", {**_EVAL, "color": "C3"}),
    ]),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def read_metrics(run_dir: PathLike) -> List[Dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` in file order. Blank lines, and lines that
    are not a whole JSON object (a run killed mid-write can leave a partial last line), are
    left out. Raises FileNotFoundError if the file does not exist."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a dpo_fast run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of ``key`` over the records that have a numeric ``step`` and a numeric
    ``key``, sorted by step (NaN / inf values are kept: matplotlib leaves a gap)."""
    pts = sorted((float(r["step"]), float(r[key])) for r in records
                 if _is_number(r.get("step")) and _is_number(r.get(key)))
    return [s for s, _ in pts], [v for _, v in pts]


def _import_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(MATPLOTLIB_MISSING)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"{MATPLOTLIB_MISSING} ({e})") from e
    return Figure, FigureCanvasAgg


def write_plots(run_dir: PathLike, out_dir: Optional[PathLike] = None, *,
                figsize: Tuple[float, float] = (6.0, 4.0), dpi: int = 120) -> List[Path]:
    """Writes PNG plots of a run's ``metrics.jsonl`` and returns the paths written.

    Reads ``<run_dir>/metrics.jsonl`` and writes, into ``out_dir`` (default
    ``<run_dir>/plots``, created if missing), one figure per quantity over optimizer steps,
    training curve solid, held-out curve dashed with markers (the step-0 eval point is the
    model before training):

    - ``loss.png``: ``loss`` and ``eval/loss``;
    - ``reward_margin.png``: ``rewards/margins`` and ``eval/rewards/margins``;
    - ``reward_accuracy.png``: ``rewards/accuracies`` and ``eval/rewards/accuracies``;
    - ``logps.png``: ``logps/chosen`` / ``logps/rejected``, train and eval.

    A plot none of whose keys appear in the metrics is skipped (not written, not returned); an
    absent eval split only drops the eval curves. Each file is written atomically (a reader
    never sees a partial PNG). Figures are rendered with matplotlib's Agg canvas directly,
    without pyplot, so the caller's pyplot backend and figure list are untouched.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``<run_dir>/metrics.jsonl`` does not exist.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    written: List[Path] = []
    for name, (title, ylabel, curves) in PLOTS.items():
        data = [(label, style, *_series(records, key)) for key, label, style in curves]
        data = [d for d in data if d[2]]
        if not data:
            continue
        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, style, steps, values in data:
            kw = dict(style)
            if len(steps) == 1 and "marker" not in kw:
                kw["marker"] = "o"  # a lone point is invisible as a line
            ax.plot(steps, values, label=label, **kw)
        if name == "reward_accuracy.png":
            ax.set_ylim(-0.03, 1.03)
        if name == "reward_margin.png":
            ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
        ax.set_title(f"{title}: {run_dir.name}" if run_dir.name else title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        fig.clear()  # not registered with pyplot: nothing else to close
        out.mkdir(parents=True, exist_ok=True)
        path = out / name
        atomic_write(path, buf.getvalue())
        written.append(path)
    return written


# ------------------------------------------------------------------------------ callbacks


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed by :class:`TensorBoardCallback`) is
    installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardCallback(TrainerCallback):
    """Writes every logged number as a TensorBoard scalar, at the step it was logged.

    Event files go to ``log_dir`` (default ``<trainer.output_dir>/tensorboard``, created when
    the run begins, or at its before-training evaluation, which comes first). Training logs
    (``on_log``) are written as ``train/<key>`` (``train/loss``, ``train/rewards/margins``,
    ``train/learning_rate``, ...); held-out metrics (``on_evaluate``) under their own
    ``eval/...`` names, so the step-0 evaluation is the before-training point. The ``step``
    entry and non-numeric values are left out. The writer is flushed after each log and
    closed when the run ends. On a resumed run, events the interrupted run wrote after the
    checkpoint's step are marked as discarded (TensorBoard's ``purge_step``), as the trainer
    does with ``metrics.jsonl``, so replayed steps do not show twice.

    Args:
        log_dir: where the event files go (default: see above).

    Raises:
        ImportError: tensorboard is not installed.
    """

    def __init__(self, log_dir: Optional[PathLike] = None):
        if not tensorboard_available():
            raise ImportError(TENSORBOARD_MISSING)
        self.log_dir: Optional[Path] = Path(log_dir) if log_dir is not None else None
        self.writer = None

    def _writer(self, trainer, state):
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"{TENSORBOARD_MISSING} ({e})") from e
            d = self.log_dir if self.log_dir is not None \
                else Path(trainer.output_dir) / TENSORBOARD_DIR
            d.mkdir(parents=True, exist_ok=True)
            step = int(getattr(state, "global_step", 0) or 0)
            # Resumed at step N: the run's metrics keep steps <= N, so purge from N + 1 on.
            self.writer = SummaryWriter(log_dir=str(d), purge_step=step + 1 if step else None)
        return self.writer

    def _add(self, trainer, state, values: Mapping[str, Any], train: bool) -> None:
        w = self._writer(trainer, state)
        step = int(state.global_step)
        for k, v in values.items():
            if k == "step" or not _is_number(v):
                continue
            tag = k if not train or k.startswith(("eval/", "train/")) else f"train/{k}"
            w.add_scalar(tag, float(v), global_step=step)
        w.flush()

    def on_train_begin(self, trainer, state) -> None:
        self._writer(trainer, state)

    def on_log(self, trainer, state, logs: Dict[str, float]) -> None:
        self._add(trainer, state, logs, train=True)

    def on_evaluate(self, trainer, state, metrics: Dict[str, float]) -> None:
        self._add(trainer, state, metrics, train=False)

    def on_train_end(self, trainer, state, result) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class PlotCallback(TrainerCallback):
    """When the run ends, writes the PNG plots of :func:`write_plots` into
    ``<trainer.output_dir>/plots`` (``loss.png``, ``reward_margin.png``,
    ``reward_accuracy.png``, ``logps.png``).

    If matplotlib is not installed it warns once (``UserWarning``) and writes nothing; the
    run's result is unaffected.
    """

    def __init__(self) -> None:
        self.paths: List[Path] = []
        self._warned = False

    def on_train_end(self, trainer, state, result) -> None:
        try:
            self.paths = write_plots(trainer.output_dir)
        except ImportError as e:
            if not str(e).startswith(MATPLOTLIB_MISSING):
                raise
            if not self._warned:
                self._warned = True
                warnings.warn(f"PlotCallback: {e}; no plots written", UserWarning,
                              stacklevel=2)


__all__ = [
    "write_plots",
    "read_metrics",
    "tensorboard_available",
    "TensorBoardCallback",
    "PlotCallback",
    "PLOTS",
]
