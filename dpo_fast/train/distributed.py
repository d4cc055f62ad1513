"""Many processes on torch.distributed: launch facts, the model wrapper, work split, reductions.

A run launched by ``torchrun`` (``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` in the environment)
initializes the default process group (nccl on CUDA, gloo on CPU, ``dist_timeout`` seconds per
collective) and trains with one of two engines of torch itself:

- ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel`; every process holds the whole
  model; gradients are all-reduced once per optimizer step (``no_sync`` on the other
  micro-batches).
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer and on the root;
  parameters, gradients and optimizer state are sharded (DTensors, dim 0).

Both wrap :class:`PreferenceModule`, whose forward is body + fused head + loss, so the engine's
hooks see the whole computation. Under FSDP2 the root unit holds the embeddings, the final norm
and the LM head (tied or not): its forward all-gathers them, the fused op reads the unsharded
``[V, D]`` head weight, and backward reduce-scatters its gradient into the shards. The cost per
rank is the unsharded root (head + embeddings, once if tied) and its gradient during a step;
decoder layers are gathered one at a time.

Work split (a pure function of the step, no communication): ``batch_size`` pairs of a global
step are dealt to ranks by tokens (longest first, to the rank with the fewest tokens), each
rank cuts its share into micro-batches by the token budget, and every rank runs the same number
of micro-batches (FSDP2 gathers per forward, so counts must match): a rank with fewer splits its
largest micro-batch, and a rank with no pairs left runs a zero-weight copy of a pair (zero
gradient, not counted in the metrics).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting the
    torch.distributed environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class DistContext:
    """This process's place in the job. ``strategy`` is resolved: none / ddp / fsdp2."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def active(self) -> bool:
        """A process group exists (also with one process under torchrun)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks (a copy; ``t`` itself unchanged; float64 stays float64, carried on
        the process group's device)."""
        return self._all_reduce(t, dist.ReduceOp.SUM) if self.active else t

    def all_max(self, t: Tensor) -> Tensor:
        """Largest value over ranks (a copy)."""
        return self._all_reduce(t, dist.ReduceOp.MAX) if self.active else t

    def _all_reduce(self, t: Tensor, op) -> Tensor:
        x = t.detach().to(self.comm_device).clone()
        dist.all_reduce(x, op=op)
        return x.to(t.device)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return int(value)
        x = torch.tensor([int(value)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(x, 0)
        return int(x.item())

    @property
    def comm_device(self) -> torch.device:
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def setup(strategy: str, device: str, timeout: float) -> tuple:
    """Initializes torch.distributed when launched by torchrun; returns (DistContext, device
    name to use). Outside a launch, ``strategy`` must be auto / none.

    Raises:
        ValueError naming ``strategy`` / ``device`` when they cannot work here.
    """
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        if strategy in ("ddp", "fsdp2"):
            raise ValueError(f"TrainConfig.strategy={strategy!r} needs several processes: "
                             "launch with torchrun --nproc_per_node=N -m dpo_fast train ... "
                             "(or use strategy=auto)")
        return DistContext(), device
    if strategy == "none":
        raise ValueError("TrainConfig.strategy='none' under torchrun: every process would train "
                         "its own copy; use auto, ddp or fsdp2")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if device.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device={device!r} under torchrun: each process "
                             "takes cuda:LOCAL_RANK; use device=cuda or auto")
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={device!r} but CUDA is not available")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        kw: Dict[str, Any] = {}
        if use_cuda:
            kw["device_id"] = torch.device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout), **kw)
    world = dist.get_world_size()
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    return DistContext(dist.get_rank(), world, local, strategy), device


_GROUP_ENDED = False


def teardown(ctx: DistContext) -> None:
    """Destroys the process group (every rank, after its last collective)."""
    global _GROUP_ENDED
    if ctx.active:
        dist.destroy_process_group()
        _GROUP_ENDED = True


def group_ended() -> bool:
    """True once :func:`teardown` destroyed a process group in this process."""
    return _GROUP_ENDED


def end_process(code: int) -> NoReturn:
    """Exits with ``code`` after a process group, without interpreter finalization.

    ``destroy_process_group`` shuts the group down but does not stop gloo's worker threads
    while anything still references the group, and under FSDP2 torch's DTensor caches keep
    the ``DeviceMesh`` (and through it the group) alive until the interpreter goes. A worker
    that drops the last reference to a tensor with a Python object (a collective's input) takes
    the GIL to free it; if the main thread has begun finalizing by then, CPython ends the
    worker inside a ``noexcept`` frame: "terminate called without an active exception",
    SIGABRT, and torchrun fails a job whose run had finished (seen in CI on a 4-process FSDP2
    run; 19 of 30 runs of a 4-process script whose last gloo all-reduce preceded its exit).
    Here the exit handlers (``atexit``: logging, tensorboard, datasets) run and the standard
    streams are flushed while the interpreter is whole, then ``os._exit`` ends the process
    with the worker threads in it, so no thread outlives the interpreter.
    """
    import atexit
    import logging

    try:
        run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
        if run_exit_handlers is not None:
            run_exit_handlers()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


# ------------------------------------------------------------------------------ the module


class PreferenceModule(torch.nn.Module):
    """The policy with its loss as one module (what DDP / FSDP2 wrap).

    ``forward(compute)`` runs ``compute(causal_lm)`` (the trainer's body forward + fused loss
    on the policy's current parameters) and returns what it returns. Under FSDP2 the LM head
    weight the fused op reads inside ``compute`` is the all-gathered one.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, compute: Callable[[torch.nn.Module], Any]):
        return compute(self.lm)


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (classes named in ``_no_split_modules``),
    each one FSDP2 unit."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@dataclass(frozen=True)
class FsdpSettings:
    """What ``fully_shard`` gets for every unit.

    Attributes:
        bf16: ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: the
            gathered parameters (and so the forward and backward) are bf16, the shards, the
            optimizer state and the gradient reduction stay fp32 (``precision=bf16``).
        cpu_offload: ``CPUOffloadPolicy``: shards, their gradients and the optimizer state
            live in host memory; each unit is copied to the device for its forward / backward.
        reshard_after_forward: True: FSDP2's default (``None``): each decoder layer frees
            its gathered parameters after its forward and gathers them again in backward, the
            root keeps its own (embeddings, norm, head: needed again as soon as backward
            starts) instead of gathering them twice; False: every unit keeps them until
            backward (more memory, fewer gathers).
    """

    bf16: bool = False
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def kwargs(self) -> Dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kw: Dict[str, Any] = {"reshard_after_forward": None if self.reshard_after_forward
                              else False}
        if self.bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
        if self.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        return kw


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device,
         fsdp: FsdpSettings = FsdpSettings()):
    """(engine, module for no-grad forwards): ``model`` wrapped for ``ctx.strategy``
    (``fsdp``: the ``fully_shard`` settings under FSDP2)."""
    mod = PreferenceModule(model)
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        engine = DDP(mod, device_ids=ids, gradient_as_bucket_view=True)  # no 2nd grad copy
        return engine, mod
    if ctx.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"TrainConfig.strategy='fsdp2': {type(model).__name__} names no "
                             "repeated block class (_no_split_modules) to shard by; use ddp")
        kw = fsdp.kwargs()
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(mod, **kw)
        return mod, mod
    return mod, mod


def reshard(root: torch.nn.Module) -> None:
    """Frees the gathered parameters FSDP2 keeps after a forward that had no backward (the
    units with ``reshard_after_forward=False``), so the modules hold their shards again (and
    ``parameters()`` are the sharded ones). Nothing to do for other engines."""
    from torch.distributed.fsdp import FSDPModule

    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ------------------------------------------------------------------------------ work split


def deal_pairs(idx: Sequence[int], size: Callable[[int], int], world: int) -> List[List[int]]:
    """Pairs ``idx`` of one step dealt to ``world`` ranks with balanced tokens: longest first
    (ties by position) to the rank with the fewest tokens so far (then fewest pairs, then
    lowest rank); each rank's pairs keep their order in ``idx``."""
    pos = {int(i): k for k, i in enumerate(idx)}
    order = sorted((int(i) for i in idx), key=lambda i: (-size(i), pos[i]))
    tokens = [0] * world
    share: List[List[int]] = [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda r: (tokens[r], len(share[r]), r))
        tokens[r] += size(i)
        share[r].append(i)
    return [sorted(s, key=pos.__getitem__) for s in share]


def equalize(per_rank: List[List[List[int]]]) -> List[List[Optional[List[int]]]]:
    """Every rank's micro-batch list brought to the longest one's count: a shorter list splits
    its largest micro-batch (by pairs) in two while it can, then is padded with None (a
    zero-weight micro-batch)."""
    k = max((len(m) for m in per_rank), default=0)
    out: List[List[Optional[List[int]]]] = []
    for mbs in per_rank:
        mbs = [list(m) for m in mbs]
        while len(mbs) < k:
            j = max(range(len(mbs)), key=lambda j: (len(mbs[j]), -j), default=None)
            if j is None or len(mbs[j]) < 2:
                break
            m = mbs[j]
            mbs[j:j + 1] = [m[:len(m) // 2], m[len(m) // 2:]]
        out.append(mbs + [None] * (k - len(mbs)))
    return out
