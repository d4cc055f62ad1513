"""Training checkpoints: written so a kill at any moment leaves the previous one whole.

A checkpoint is a directory ``<output_dir>/checkpoint-<step>``:

- ``model.safetensors``: the trainable parameters by name (all of them for full fine-tuning,
  the adapters for LoRA);
- ``optimizer.pt``: the optimizer's state dict (tensors, numbers; read back with
  ``torch.load(weights_only=True)``, never unpickled);
- ``rng.safetensors``: torch CPU / CUDA generator states;
- ``trainer_state.json``: step, epoch, position in the epoch's order, counters, the scheduler's
  state, numpy / Python RNG states;
- ``checkpoint.json`` (the manifest, written last): format, step, each file's size and SHA-256.

Each file is written atomically inside ``.checkpoint-<step>.tmp-*``, the manifest last, then the
directory is renamed into place and the parent directory fsync'd. Loading verifies sizes and
hashes; a damaged newest checkpoint is reported and the one before it used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..fileio import atomic_write, fsync_dir, json_bytes, sha256_file

FORMAT = "dpo_fast.checkpoint"
VERSION = 1
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run."""


def checkpoint_dirs(output_dir: Path) -> List[Path]:
    """Finished checkpoint directories of ``output_dir`` (with a manifest), oldest first."""
    out = []
    if Path(output_dir).is_dir():
        for d in Path(output_dir).iterdir():
            m = _NAME.match(d.name)
            if m and d.is_dir() and (d / MANIFEST).is_file():
                out.append((int(m.group(1)), d))
    return [d for _, d in sorted(out)]


def rng_state() -> Dict[str, Any]:
    """(tensors, json) of every generator this process uses."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py = random.getstate()
    js = {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                    float(np_state[4])],
          "python": [py[0], list(py[1]), py[2]]}
    return {"tensors": tensors, "json": js}


def set_rng_state(tensors: Dict[str, torch.Tensor], js: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable parameters by name (tied weights once), detached, contiguous, on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def save_checkpoint(output_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, state: Dict[str, Any],
                    keep: Optional[int] = None) -> Path:
    """Writes ``checkpoint-<step>`` (see the module docstring); keeps the newest ``keep``."""
    from safetensors.torch import save as st_save

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        rng = rng_state()
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        payload = {
            "model.safetensors": st_save(trainable_state(model)),
            "optimizer.pt": buf.getvalue(),
            "rng.safetensors": st_save({k: v.contiguous() for k, v in rng["tensors"].items()}),
            "trainer_state.json": json_bytes({**state, "scheduler": scheduler.state_dict(),
                                              "rng": rng["json"]}),
        }
        files = {}
        for name, data in payload.items():
            atomic_write(tmp / name, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(tmp / MANIFEST, json_bytes({"format": FORMAT, "version": VERSION,
                                                 "step": step, "files": files}))
        if final.exists():  # a re-run of the same step (e.g. resumed after a kill) replaces it
            old = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for d in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
    for d in output_dir.glob(".checkpoint-*"):  # leftovers of killed saves
        if f"-{os.getpid()}" not in d.name:
            shutil.rmtree(d, ignore_errors=True)
    return final


def verify_checkpoint(d: Path) -> Dict[str, Any]:
    """The manifest of checkpoint ``d`` after checking every file; CheckpointError if not."""
    try:
        man = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: unreadable {MANIFEST} ({e})") from None
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise CheckpointError(f"{d}: not a dpo_fast checkpoint (format {man.get('format')!r}, "
                              f"version {man.get('version')!r})")
    for name, rec in man.get("files", {}).items():
        f = d / name
        if not f.is_file() or f.stat().st_size != rec["bytes"] or sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"{d}: {name} is missing or damaged (size or SHA-256 differs "
                                  "from the manifest)")
    return man


def find_resumable(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint of ``output_dir`` that verifies (warning about damaged newer
    ones), or None."""
    for d in reversed(checkpoint_dirs(output_dir)):
        try:
            verify_checkpoint(d)
            return d
        except CheckpointError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}", RuntimeWarning, stacklevel=2)
    return None


def load_checkpoint(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> Dict[str, Any]:
    """Restores ``model`` (trainable parameters), ``optimizer``, ``scheduler`` and the RNGs
    from checkpoint ``d``; returns the trainer state."""
    from safetensors.torch import load_file

    verify_checkpoint(d)
    weights = load_file(str(d / "model.safetensors"))
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != want:
        missing, extra = sorted(want - set(weights)), sorted(set(weights) - want)
        raise CheckpointError(f"{d}: its parameters do not match the model's trainable ones "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written "
                              "by a run with another model or LoRA setting?")
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{d}: {n} has shape {tuple(t.shape)}, the model "
                                      f"{tuple(params[n].shape)}")
            params[n].copy_(t)
    opt = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt)
    state = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(load_file(str(d / "rng.safetensors")), state.pop("rng"))
    return state
