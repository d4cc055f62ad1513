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

Several processes (torchrun): every rank writes its own ``rng-rank<r>.safetensors``; under
FSDP2 ``model.safetensors`` / ``optimizer.pt`` are replaced by ``sharded/`` (each rank's
parameter and optimizer shards through ``torch.distributed.checkpoint``'s safetensors writer)
and the optimizer's hyper-parameters go into ``trainer_state.json``.

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


def _fsdp_flat(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               zeros: bool = False) -> Dict[str, torch.Tensor]:
    """FSDP2: model parameters and optimizer state as one flat dict of (sharded) tensors,
    ``model/<fqn>`` and ``optim/<fqn>/<name>``; with ``zeros`` fresh zero tensors of the same
    placement to load into (the optimizer may not have state yet)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, \
        get_optimizer_state_dict

    msd = get_model_state_dict(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}  # tied weights once
    flat = {f"model/{k}": v for k, v in msd.items() if k in names}
    if zeros:
        flat = {k: torch.zeros_like(v) for k, v in flat.items()}
        for n in sorted(names):
            p = msd[n]
            flat[f"optim/{n}/exp_avg"] = torch.zeros_like(p)
            flat[f"optim/{n}/exp_avg_sq"] = torch.zeros_like(p)
            flat[f"optim/{n}/step"] = torch.zeros((), dtype=torch.float32,
                                                  device=p.device)
        return flat
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            flat[f"optim/{fqn}/{k}"] = v
    return flat


def _param_groups(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Hyper-parameters of each group (JSON; the params lists left out)."""
    out = []
    for g in optimizer.param_groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                    if k != "params" and isinstance(v, (int, float, bool, str, tuple, type(None)))})
    return out


def save_checkpoint(output_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, state: Dict[str, Any],
                    keep: Optional[int] = None, ctx=None) -> Path:
    """Writes ``checkpoint-<step>`` (see the module docstring); keeps the newest ``keep``.

    With ``ctx`` (a :class:`dpo_fast.train.distributed.DistContext` of several processes) every
    rank calls this: rank 0 creates the temporary directory, each rank writes its RNG state
    (``rng-rank<r>.safetensors``), FSDP2 writes the sharded parameters and optimizer state
    through ``torch.distributed.checkpoint`` (safetensors files under ``sharded/``, one per
    rank, shard offsets in their JSON metadata; DDP / one process: rank 0 writes
    ``model.safetensors`` and ``optimizer.pt``), then rank 0 hashes every file into the
    manifest and renames the directory into place. The output directory must be shared by
    the ranks (one machine, or a shared filesystem)."""
    from safetensors.torch import save as st_save

    rank = ctx.rank if ctx is not None else 0
    multi = ctx is not None and ctx.active
    fsdp = ctx is not None and ctx.strategy == "fsdp2"
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tag = ctx.broadcast_int(os.getpid()) if multi else os.getpid()
    tmp = output_dir / f".checkpoint-{step}.tmp-{tag}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if multi:
        ctx.barrier()
    written: Dict[str, Dict[str, Any]] = {}  # this rank's files, hashed from the bytes written

    def put(name: str, data: bytes) -> None:
        atomic_write(tmp / name, data)
        written[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    try:
        rng = rng_state()
        rng_name = "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"
        put(rng_name, st_save({k: v.contiguous() for k, v in rng["tensors"].items()}))
        extra: Dict[str, Any] = {}
        if fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import HuggingFaceStorageWriter

            dcp.save(_fsdp_flat(model, optimizer),
                     storage_writer=HuggingFaceStorageWriter(str(tmp / "sharded"),
                                                             save_distributed=True))
            extra["optimizer_param_groups"] = _param_groups(optimizer)
        elif rank == 0:
            buf = io.BytesIO()
            torch.save(optimizer.state_dict(), buf)
            put("model.safetensors", st_save(trainable_state(model)))
            put("optimizer.pt", buf.getvalue())
        if multi:
            ctx.barrier()
        if rank == 0:
            put("trainer_state.json", json_bytes({**state, **extra,
                                                  "scheduler": scheduler.state_dict(),
                                                  "rng": rng["json"]}))
            files = {}  # other ranks' files (and DCP's) are read back to hash them
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                name = f.relative_to(tmp).as_posix()
                files[name] = written.get(name) or {"bytes": f.stat().st_size,
                                                    "sha256": sha256_file(f)}
            atomic_write(tmp / MANIFEST, json_bytes({"format": FORMAT, "version": VERSION,
                                                     "step": step, "files": files}))
            for sub in {p.parent for p in tmp.rglob("*") if p.is_file()} - {tmp}:
                fsync_dir(sub)
            if final.exists():  # a re-run of the same step (resumed after a kill) replaces it
                old = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(output_dir)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        if keep is not None:
            for d in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(d, ignore_errors=True)
        for d in output_dir.glob(".checkpoint-*"):  # leftovers of killed saves
            if f"-{tag}" not in d.name:
                shutil.rmtree(d, ignore_errors=True)
    if multi:
        ctx.barrier()
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
                    scheduler, ctx=None) -> Dict[str, Any]:
    """Restores ``model`` (trainable parameters), ``optimizer``, ``scheduler`` and the RNGs
    from checkpoint ``d``; returns the trainer state. Under several processes every rank calls
    it (FSDP2: each reads its shards through ``torch.distributed.checkpoint``)."""
    from safetensors.torch import load_file

    verify_checkpoint(d)
    rank = ctx.rank if ctx is not None else 0
    state = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
    if ctx is not None and ctx.strategy == "fsdp2":
        _load_fsdp(d, model, optimizer, state.pop("optimizer_param_groups", None))
    else:
        if (d / "sharded").is_dir():
            raise CheckpointError(f"{d}: written by an FSDP2 run (sharded/); resume it with "
                                  "strategy=fsdp2 and the same number of processes")
        _load_full(d, model, optimizer, load_file)
    scheduler.load_state_dict(state.pop("scheduler"))
    own = d / f"rng-rank{rank}.safetensors"
    set_rng_state(load_file(str(own if rank and own.is_file() else d / "rng.safetensors")),
                  state.pop("rng"))
    return state


def step_of(d: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder (CheckpointError for another name)."""
    try:
        return int(Path(d).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{d}: not a checkpoint-<step> directory") from None


def choose_resume(output_dir: Path, resume, dist) -> Optional[Path]:
    """The checkpoint to resume from: ``resume`` True -> the newest that verifies, a path ->
    that folder, None / False -> None. Under several processes every rank takes rank 0's
    choice (``dist.broadcast_int``)."""
    if resume is None or resume is False:
        return None
    d = find_resumable(output_dir) if resume is True else Path(resume)
    if dist.active:
        pick = dist.broadcast_int(-1 if d is None else step_of(d))
        d = None if pick < 0 else (d if d is not None and step_of(d) == pick
                                   else Path(output_dir) / f"checkpoint-{pick}")
    return d


def check_same_layout(d: Path, dist) -> None:
    """A checkpoint resumes with the world size and strategy that wrote it."""
    try:
        st = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # verify_checkpoint reports it
    world, strat = st.get("world_size", 1), st.get("strategy", "none")
    if world != dist.world_size or (strat == "fsdp2") != (dist.strategy == "fsdp2"):
        raise CheckpointError(
            f"{d} was written by {world} process(es) with strategy={strat!r}; this run has "
            f"{dist.world_size} with strategy={dist.strategy!r}. Resume with "
            f"torchrun --nproc_per_node={world} and strategy={strat!r}")


def restore(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            dist) -> Dict[str, Any]:
    """:func:`load_checkpoint` after :func:`check_same_layout`; any other failure to restore
    becomes a CheckpointError naming ``d``."""
    check_same_layout(d, dist)
    try:
        return load_checkpoint(d, model, optimizer, scheduler,
                               ctx=dist if dist.active else None)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{d}: cannot restore ({type(e).__name__}: {e})") from e


def _load_full(d: Path, model, optimizer, load_file) -> None:
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


def _load_fsdp(d: Path, model, optimizer, groups: Optional[List[Dict[str, Any]]]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, \
        set_optimizer_state_dict

    if not (d / "sharded").is_dir():
        raise CheckpointError(f"{d}: not written by an FSDP2 run (no sharded/); resume it with "
                              "the strategy that wrote it")
    dest = _fsdp_flat(model, optimizer, zeros=True)
    try:
        dcp.load(dest, storage_reader=HuggingFaceStorageReader(str(d / "sharded")))
    except Exception as e:
        raise CheckpointError(f"{d}: cannot read the sharded state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); was it written by "
                              "this model with the same number of processes?") from e
    model_sd = {k[len("model/"):]: v for k, v in dest.items() if k.startswith("model/")}
    set_model_state_dict(model, model_sd, options=_strict())
    ostate: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in dest.items():
        if k.startswith("optim/"):
            fqn, name = k[len("optim/"):].rsplit("/", 1)
            ostate.setdefault(fqn, {})[name] = v
    pg = [{**g, "params": [n for n, p in model.named_parameters() if p.requires_grad]}
          for g in (groups or [{}])]
    for g in pg:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_optimizer_state_dict(model, optimizer, {"state": ostate, "param_groups": pg})


def _strict():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)
