"""The run folder: the files that mark an earlier run, the checks made before any work
(model paths, a fresh start over an earlier run), ``config.yaml`` and ``summary.json``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import yaml

from ..fileio import atomic_write, json_bytes
from ..models import resolve_model_name
from .checkpoint import checkpoint_dirs
from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
#: Files that mark a folder as holding an earlier run (besides its checkpoint-N folders).
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "model.safetensors",
               "model.safetensors.index.json", "adapter_model.safetensors")


def check_model_path(name: str, what: str) -> None:
    """A local folder without config.json fails here, before any data work."""
    p = Path(resolve_model_name(name)) if not str(name).startswith("bundled:") else None
    if p is not None and p.exists() and not (p / "config.json").is_file():
        raise ValueError(f"TrainConfig.{what}={name}: cannot load the model: "
                         f"{'the folder has' if p.is_dir() else 'it is a file with'} no "
                         "config.json (expected a Hugging Face model folder)")


def check_output_dir(output_dir: Path, cfg: TrainConfig, model_given: bool,
                     stage: Callable[[str], None]) -> None:
    """A fresh start in a folder holding an earlier run (its checkpoints, settings,
    metrics, summary or final model) is an error unless ``overwrite_output_dir`` (then
    that run's outputs go; its reference cache stays). ``output_dir`` may not be a model
    or tokenizer folder of the run (``model_given``: the policy is a model object)."""
    for what in ("model", "ref_model", "tokenizer"):
        name = getattr(cfg, what) if not model_given or what != "model" else None
        if (isinstance(name, str) and not name.startswith("bundled:")
                and Path(name).is_dir() and Path(name).resolve() == output_dir.resolve()):
            raise ValueError(f"output_dir {output_dir} is the {what} folder ({what}="
                             f"{name}): the run would write over it; choose another "
                             "output_dir")
    if cfg.resume_from_checkpoint not in (None, False):
        return
    old = checkpoint_dirs(output_dir)
    found = [d.name for d in old[-3:]] + [f for f in RUN_OUTPUTS if (output_dir / f).is_file()]
    if not found:
        return
    if not cfg.overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} holds an earlier run ({', '.join(found)}): "
            "continue it with resume_from_checkpoint=true, start over with "
            "overwrite_output_dir=true, or choose another output_dir")
    stage(f"overwriting the earlier run in {output_dir}")
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    for name in ("tensorboard", "plots"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in RUN_OUTPUTS:
        (output_dir / name).unlink(missing_ok=True)


def check_before_work(output_dir: Path, cfg: TrainConfig, model_given: bool, is_main: bool,
                      barrier: Callable[[], None], stage: Callable[[str], None]) -> None:
    """Everything that can fail before data or models load: the output folder (rank 0, the
    other ranks wait at ``barrier``), then on every rank the scorer's package and local
    model folders."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        check_output_dir(output_dir, cfg, model_given, stage)
    barrier()
    if cfg.sample_prompts and cfg.sample_scorer:
        from .sampling import get_scorer

        get_scorer(cfg.sample_scorer)  # a missing package fails now, not after training
    if not model_given:
        check_model_path(cfg.model, "model")
    if cfg.ref_model is not None:
        check_model_path(cfg.ref_model, "ref_model")


def write_config(output_dir: Path, cfg: TrainConfig) -> None:
    """``config.yaml``: the run's settings, in TrainConfig field order."""
    atomic_write(output_dir / CONFIG_FILE,
                 yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode("utf-8"))


def write_summary(output_dir: Path, summary: dict) -> None:
    atomic_write(output_dir / SUMMARY_FILE, json_bytes(summary))

