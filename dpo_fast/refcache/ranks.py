"""Ranks and the writer lock of a build.

Which process this is (:func:`rank_world`: explicit ``rank`` / ``world_size`` or an
initialized ``torch.distributed``) and the lock it must hold (:func:`writer_lock`): one process
locks the cache directory; under torch.distributed rank 0 locks it for the whole job and
broadcasts the outcome, so a refusal reaches every rank; explicit ranks without
torch.distributed lock their own part directories.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import torch

from . import store
from .store import PART_NAME, RefCacheError

# What rank 0 broadcasts after trying the lock.
_OK, _READ_ONLY, _FAILED = 2, 1, 0


def rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int, bool]:
    """(rank, world_size, torch.distributed initialized)."""
    dist = torch.distributed
    inited = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        if inited:
            return dist.get_rank(), dist.get_world_size(), True
        return 0, 1, False
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
            and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, "
                         f"world_size={world_size!r}")
    if inited and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with torch.distributed "
                         f"({dist.get_rank()}, {dist.get_world_size()})")
    return rank, world_size, inited


def _broadcast_code(code: int) -> int:
    """Rank 0's ``code`` on every rank (an int tensor on the backend's device)."""
    dist = torch.distributed
    dev = torch.device("cpu")
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([code], dtype=torch.int64, device=dev)
    dist.broadcast(t, src=0)
    return int(t.item())


@contextlib.contextmanager
def writer_lock(path: Path, rank: int, world: int, inited: bool, timeout: Optional[float],
                on_wait: Optional[Callable[[str], None]]) -> Iterator[Optional[OSError]]:
    """Holds the writer lock this process needs for a build of ``path``; yields None, or the
    OSError that says the directory cannot be written (then nothing may be written).

    One process: the cache directory's lock. torch.distributed ranks: rank 0 holds it for the
    whole job (the other ranks learn the outcome from a broadcast, so a refusal reaches every
    rank instead of leaving them waiting). Explicit ranks without torch.distributed: each
    locks its own part directory; :meth:`RefLogProbCache.merge` takes the cache's lock."""
    shared = inited and world > 1
    d = path / PART_NAME.format(rank) if (world > 1 and not inited) else path
    with contextlib.ExitStack() as stack:
        ro: Optional[OSError] = None
        code = _OK
        if not shared or rank == 0:
            try:
                try:
                    d.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    if not d.is_dir():
                        raise RefCacheError(f"cannot create the cache directory {d}: "
                                            f"{e.strerror or e}") from None
                    raise
                stack.enter_context(store.hold_lock(d, timeout, on_wait))
            except OSError as e:
                if not store.is_read_only_error(e):
                    if shared:
                        _broadcast_code(_FAILED)
                    raise
                ro, code = e, _READ_ONLY
            except BaseException:
                if shared:
                    _broadcast_code(_FAILED)
                raise
        if shared:
            if rank == 0:
                _broadcast_code(code)
            else:
                code = _broadcast_code(_OK)
                if code == _FAILED:
                    raise RefCacheError(f"rank 0 could not lock the reference cache at {path}; "
                                        "its error says why")
                if code == _READ_ONLY:
                    ro = OSError(store.READ_ONLY_ERRNOS[0], "read-only on rank 0")
        if ro is not None and world > 1 and not inited:
            raise RefCacheError(f"cannot write the part directory {d}: {ro.strerror or ro}")
        yield ro
