"""FSDP2 models that no process holds whole: built empty, sharded, filled slice by slice.

:func:`load_sharded` (the trainer under ``strategy=fsdp2`` with a model folder):

1. the architecture is built from ``config.json`` with every parameter on the meta device
   (:func:`dpo_fast.models.empty_model`; buffers such as rotary tables are computed as usual);
2. ``prepare`` runs on it (dropout off, LoRA adapters, activation checkpointing): peft wraps
   before sharding, so its adapters are sharded with the layer they sit in;
3. ``fully_shard`` on every decoder layer and the root (:func:`dpo_fast.train.distributed.wrap`)
   and ``to_empty``: each process allocates only its dim-0 shards ``[ceil(d0 / N), ...]``;
4. the shards are filled from the checkpoint (:func:`fill_shards`). From safetensors files each
   process reads only its rows of each tensor (``get_slice``); from anything else
   (``.bin`` / GGUF / hub names, or tensor names that need transformers' own renaming) rank 0
   loads the whole model on the CPU and broadcasts one tensor at a time;
5. LoRA adapters get their seeded values (:func:`init_lora`), the same for every strategy and
   number of processes.

Names: a parameter's *checkpoint name* is its name in the model's own state dict, without a
peft wrapper (``base_model.model.`` / ``.base_layer``); adapter tensors have none
(:func:`checkpoint_name`). The reference fingerprint and the export use the same names.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..models import empty_model, load_model, model_parts, resolve_model_name
from ..safetensors_shards import SafetensorsSource
from .distributed import DistContext, FsdpSettings, PreferenceModule, wrap

_PEFT_PREFIX = "base_model.model."


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft model (LoRA adapters)."""
    return callable(getattr(model, "get_base_model", None)) and \
        callable(getattr(model, "disable_adapter", None))


def checkpoint_name(name: str) -> Optional[str]:
    """The name of parameter / buffer ``name`` (of a model, possibly peft-wrapped) in the base
    model's checkpoint; None for a LoRA adapter tensor."""
    if ".lora_" in name or name.startswith("lora_"):
        return None
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def base_state(model: torch.nn.Module) -> Dict[str, Tensor]:
    """The base model's state dict of ``model`` (a peft model: adapters left out, names as
    in the base checkpoint; else ``model.state_dict()``), values as held (DTensor shards under
    FSDP2)."""
    state = model.state_dict()
    if not is_peft(model):
        return state
    out: Dict[str, Tensor] = {}
    for name, t in state.items():
        key = checkpoint_name(name)
        if key is not None:
            out[key] = t
    return out


# ------------------------------------------------------------------------ local shards


def is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def chunk_rows(d0: int, world: int, rank: int) -> Tuple[int, int]:
    """``(start, stop)``: rank ``rank``'s rows of ``d0`` under ``torch.chunk`` over ``world``
    (FSDP2's dim-0 sharding: ceil(d0 / world) rows each, the last ones short or empty)."""
    chunk = math.ceil(d0 / world) if d0 else 0
    start = min(rank * chunk, d0)
    return start, min(start + chunk, d0)


def local_rows(t: Tensor) -> Tuple[int, int]:
    """``(start, stop)``: the rows of dim 0 of ``t``'s full tensor this process holds
    (``torch.chunk`` over the FSDP2 mesh; all rows for a plain tensor)."""
    if not is_dtensor(t):
        return 0, (t.shape[0] if t.dim() else 0)
    from torch.distributed.tensor import Shard

    if len(t.placements) != 1 or not isinstance(t.placements[0], Shard) \
            or t.placements[0].dim != 0:
        raise ValueError(f"expected a dim-0 FSDP2 shard, got placements {t.placements}")
    mesh = t.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    start, stop = chunk_rows(t.shape[0], world, rank)
    local = t.to_local()
    if local.shape[0] != stop - start:
        raise ValueError(f"FSDP2 shard of {tuple(t.shape)} on rank {rank}/{world} has "
                         f"{local.shape[0]} rows, expected rows {start}:{stop}")
    return start, stop


class ShardedHeadGrad:
    """FSDP2's sink for the LM head's weight gradient (:mod:`dpo_fast.ops.head_grad`): the
    blocks are the ranks' shard rows (``torch.chunk`` of the vocabulary, as FSDP2 shards
    dim 0), and block ``r`` is summed onto rank ``r`` (one ``reduce`` per block, every rank
    in the same order) and added, divided by the world size as FSDP2 averages, into that
    rank's shard of the gradient. FSDP2 adds its own reduce-scatter (the tied embeddings'
    gradient) into the same shard after. So no process holds the head's whole ``[V, D]``
    gradient: one ``[V/N, D]`` block at a time instead.

    Args:
        param: the sharded head weight (a DTensor parameter of the FSDP2 root).
        ctx: the process group's ranks.
    """

    def __init__(self, param: torch.nn.Parameter, ctx: DistContext):
        rows = int(param.shape[0])
        self.bounds = [chunk_rows(rows, ctx.world_size, r) for r in range(ctx.world_size)]
        local_rows(param)  # refuses a shard that is not torch.chunk's rows
        self.param, self.ctx = param, ctx

    def __call__(self, block: int, grad: torch.Tensor) -> None:
        grad.div_(self.ctx.world_size)
        torch.distributed.reduce(grad, dst=block)
        if block != self.ctx.rank:
            return
        p = self.param
        with torch.no_grad():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            local.add_(grad.to(device=local.device, dtype=local.dtype))


def head_grad_sink(parts_weight: torch.nn.Parameter, ctx: DistContext
                   ) -> Optional[ShardedHeadGrad]:
    """The FSDP2 head-gradient sink for a sharded, trainable head weight; None otherwise
    (DDP, one process, a frozen head)."""
    if (ctx.strategy != "fsdp2" or not ctx.active or not parts_weight.requires_grad
            or not is_dtensor(parts_weight)):
        return None
    return ShardedHeadGrad(parts_weight, ctx)


@torch.no_grad()
def set_full(t: Tensor, full: Tensor) -> None:
    """Writes ``full`` (the whole tensor, t's full shape) into ``t``: its own rows for a
    DTensor shard, all of it otherwise."""
    if tuple(full.shape) != tuple(t.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not fit {tuple(t.shape)}")
    if is_dtensor(t):
        a, b = local_rows(t)
        t.to_local().copy_(full[a:b] if full.dim() else full)
    else:
        t.copy_(full)


# ------------------------------------------------------------------------ sources


class BroadcastSource:
    """Rank 0's whole state dict (``state``, CPU, checkpoint names; None elsewhere), sent to
    every process one tensor at a time: :meth:`rows` is a collective every rank calls in
    the same order; each holds one whole tensor while it runs."""

    def __init__(self, state: Optional[Dict[str, Tensor]], dist: DistContext):
        self.state = state
        self.dist = dist

    def rows(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, start: int,
             stop: int) -> Tensor:
        dev = self.dist.comm_device
        if self.dist.is_main:
            buf = self.state[name].to(device=dev, dtype=dtype).contiguous()
            if tuple(buf.shape) != tuple(shape):
                raise ValueError(f"{name}: the loaded model has shape {tuple(buf.shape)}, "
                                 f"the sharded one {tuple(shape)}")
        else:
            buf = torch.empty(shape, dtype=dtype, device=dev)
        if self.dist.active:
            torch.distributed.broadcast(buf, 0)
        return buf[start:stop] if buf.dim() else buf


class FileSource:
    """Each process reads its own rows of each tensor from the safetensors files."""

    def __init__(self, files: SafetensorsSource):
        self.files = files

    def rows(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, start: int,
             stop: int) -> Tensor:
        return self.files.rows(name, start, stop)


def file_source_problem(files: SafetensorsSource, wanted: Dict[str, Tensor]) -> Optional[str]:
    """Why the safetensors files cannot fill ``wanted`` (checkpoint name -> tensor) directly
    (a name missing, a shape differing), or None."""
    have = set(files.names())
    for key, t in wanted.items():
        if key not in have:
            return f"the tensor {key} is not in the files under that name"
        shape = tuple(files.spec(key).shape)
        if shape != tuple(t.shape):
            return f"{key} has shape {shape} in the files, {tuple(t.shape)} in the model"
    return None


def to_fill(model: torch.nn.Module) -> Dict[str, Tensor]:
    """Checkpoint name -> parameter (each tied parameter once) or persistent buffer of
    ``model`` that the checkpoint provides (adapters excluded)."""
    out: Dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        key = checkpoint_name(name)
        if key is not None:
            out[key] = p
    persistent = set(model.state_dict())
    for name, b in model.named_buffers():
        key = checkpoint_name(name)
        if key is not None and name in persistent:
            out[key] = b
    return out


def fill_shards(wanted: Dict[str, Tensor], source) -> None:
    """Fills every tensor of ``wanted`` (checkpoint name -> parameter / buffer, in order) with
    its rows from ``source`` (a :class:`FileSource` or :class:`BroadcastSource`)."""
    with torch.no_grad():
        for key, t in wanted.items():
            start, stop = local_rows(t)
            part = source.rows(key, tuple(t.shape), t.dtype, start, stop)
            dst = t.to_local() if is_dtensor(t) else t
            if tuple(part.shape) != tuple(dst.shape):
                raise ValueError(f"{key}: read {tuple(part.shape)}, the shard is "
                                 f"{tuple(dst.shape)}")
            dst.copy_(part)


# ------------------------------------------------------------------------ LoRA


def lora_generator(seed: int, name: str) -> torch.Generator:
    """The generator of adapter tensor ``name``: seeded by the run's seed and the name."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode()))
                                         % (2 ** 63))


def init_lora(model: torch.nn.Module, seed: int) -> int:
    """Gives every LoRA tensor of ``model`` its initial value from :func:`lora_generator`:
    ``lora_A`` Kaiming-uniform (a = sqrt 5, peft's default), ``lora_B`` zeros (so the adapted
    model equals the base), embedding adapters A zeros / B normal. The same values for one
    process, DDP and FSDP2 (each shard takes its rows of the full tensor). Returns the count.

    Raises:
        ValueError for an adapter tensor of another kind (e.g. DoRA magnitudes).
    """
    n = 0
    for name, p in model.named_parameters():
        if checkpoint_name(name) is not None:
            continue
        full = torch.empty(tuple(p.shape), dtype=torch.float32)
        g = lora_generator(seed, name)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
        elif ".lora_B." in name or ".lora_embedding_A." in name:
            full.zero_()
        elif ".lora_embedding_B." in name:
            torch.nn.init.normal_(full, generator=g)
        else:
            raise ValueError(f"cannot initialize the adapter tensor {name} (LoRA A / B "
                             "only)")
        set_full(p, full.to(p.dtype))
        n += 1
    return n


# ------------------------------------------------------------------------ loading


def snapshot_buffers(model: torch.nn.Module) -> Dict[str, Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def restore_buffers(model: torch.nn.Module, saved: Dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, b in saved.items():
            model.get_buffer(n).copy_(b)


def load_sharded(name: str, *, dtype: torch.dtype, dist: DistContext, device: torch.device,
                 fsdp: FsdpSettings, what: str, seed: int,
                 prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                 stage: Callable[[str], None] = lambda s: None
                 ) -> Tuple[torch.nn.Module, PreferenceModule, str]:
    """``(model, FSDP2 root, how)``: the model folder ``name`` built empty, ``prepare``d,
    sharded over the processes of ``dist`` and filled (see the module docstring). ``how``
    says where the weights came from (``"slices"``: each process read its rows of the
    safetensors files; ``"broadcast"``: rank 0 loaded the whole model on the CPU)."""
    model = prepare(empty_model(name, dtype=dtype, device=device, what=what))
    model_parts(model)  # refuses a model without a findable head before any work
    buffers = snapshot_buffers(model)
    engine, root = wrap(model, dist, device, fsdp)
    root.to_empty(device=device)
    restore_buffers(model, buffers)
    wanted = to_fill(model)
    folder = resolve_model_name(name)
    problem = None
    files = SafetensorsSource(folder) if SafetensorsSource.available(folder) else None
    if files is None:
        problem = "the model folder has no safetensors weights"
    else:
        problem = file_source_problem(files, wanted)
    # the decision must be the same on every process
    if dist.active and int(dist.all_max(torch.tensor(int(problem is not None)))) and \
            problem is None:
        problem = "another process cannot read the files"
    if problem is None:
        with files:
            fill_shards(wanted, FileSource(files))
        how = "slices"
    else:
        if files is not None:
            files.close()
        stage(f"{what}={name}: {problem}; rank 0 loads the whole model on the CPU and "
              "sends each tensor to the other processes")
        state = None
        if dist.is_main:
            full = load_model(name, dtype=dtype, device="cpu", what=what)
            state = full.state_dict()
            del full
        fill_shards(wanted, BroadcastSource(state, dist))
        del state
        how = "broadcast"
    if is_peft(model):
        init_lora(model, seed)
    return model, root, how
