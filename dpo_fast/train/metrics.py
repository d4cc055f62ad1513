"""``metrics.jsonl``: one JSON record per logged step or evaluation (rank 0 writes), cut back
to a checkpoint's step on resume; and the window of step sums between two log lines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

from ..fileio import atomic_write
from .rundir import METRICS_FILE
from .runner import StepResult
from .step import STAT_KEYS, summarize


def read_record(line: str) -> Dict[str, Any]:
    """A metrics.jsonl line as a dict; {} for a blank or partial line (a kill mid-write)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


class MetricsLog:
    """``<output_dir>/metrics.jsonl``; every method is a no-op unless ``enabled`` (rank 0)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled

    def start(self) -> None:
        """An empty log (a fresh run)."""
        if self.enabled:
            self.path.write_text("", encoding="utf-8")

    def append(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """Drops the records after ``step`` (they belong to the interrupted run and are
        logged again as the resumed run replays those steps)."""
        if self.enabled and self.path.is_file():
            kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if read_record(ln).get("step", math.inf) <= step]
            atomic_write(self.path, ("\n".join(kept) + "\n" if kept else "").encode())

    def eval_before(self) -> Dict[str, float]:
        """The held-out metrics logged at step 0 (before training), {} if none."""
        if not self.path.is_file():
            return {}
        for ln in self.path.read_text(encoding="utf-8").splitlines():
            rec = read_record(ln)
            if rec.get("step") == 0 and "eval/loss" in rec:
                return {k: v for k, v in rec.items() if k != "step"}
        return {}


class StepWindow:
    """Sums of the applied steps and the time of all steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = {k: 0.0 for k in STAT_KEYS}
        self.steps = 0
        self.seconds = 0.0

    def add(self, res: StepResult, seconds: float) -> None:
        if res.finite:
            for k, v in res.sums.items():
                self.sums[k] += float(v)
            self.steps += 1
        self.seconds += seconds

    def record(self, res: StepResult, *, step: int, epoch: float, num_tokens: int,
               peak_memory_mb: float, skipped_steps: int) -> Dict[str, Any]:
        """The log line: TRL-named means of the window, the last step's gradient norm and
        learning rate, tokens so far, the window's tokens per second, peak memory."""
        return {"step": step, "epoch": epoch, **summarize(self.sums),
                "grad_norm": res.grad_norm, "learning_rate": res.learning_rate,
                "num_tokens": num_tokens,
                "train_tokens_per_second": self.sums["tokens"] / self.seconds
                if self.seconds else 0.0,
                "peak_memory_mb": peak_memory_mb, "skipped_steps": skipped_steps}
