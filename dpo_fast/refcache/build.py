"""The build driver: :func:`run_build`, behind ``RefLogProbCache.build`` and ``ensure``.

The entry points' keywords become one checked :class:`BuildOptions`. The driver resolves the
process's rank, the fingerprint and the unique rows, takes the writer lock
(:func:`.ranks.writer_lock`), brings the directory to a state it can plan from (overwrite,
repair, sealing an interrupted build of other rows), plans the rows the cache lacks, computes
them (:mod:`.segments`: one process, or one part per rank and a merge), compacts if asked and
returns the opened cache. One writer at a time: the lock is held from the first read of the
manifest to the last write.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..data import PreferenceExample
from ..models import head_settings, model_parts
from . import store
from .compute import Computer
from .fingerprint import check_fingerprint, dtype_name, validate_fingerprint
from .fingerprint import fingerprint as make_fingerprint
from .plan import Plan, make_plan, unique_examples
from .progress import BuildProgress
from .ranks import rank_world, writer_lock
from .rewrite import compact_locked, seal_locked, should_compact, wipe
from .segments import build_part, build_single
from .store import MANIFEST, RefCacheError

DEFAULT_CHECKPOINT_SECONDS = 30.0


@dataclass(frozen=True)
class BuildOptions:
    """The keyword arguments of :meth:`RefLogProbCache.build` / ``ensure`` (their meaning is
    documented there), checked when constructed (ValueError naming the argument)."""

    batch_tokens: int = 16384
    fingerprint: Optional[Dict[str, Any]] = None
    tokenizer: Any = None
    max_length: Optional[int] = None
    dtype: Union[None, str, torch.dtype] = None
    softcap: Optional[float] = None
    temperature: float = 1.0
    per_token: bool = False
    rows_per_shard: int = 4096
    progress: Optional[Callable[[BuildProgress], None]] = None
    rank: Optional[int] = None
    world_size: Optional[int] = None
    overwrite: bool = False
    verify_head: bool = True
    checkpoint_seconds: Optional[float] = DEFAULT_CHECKPOINT_SECONDS
    lock_timeout: Optional[float] = None
    on_lock_wait: Optional[Callable[[str], None]] = None
    compact: Union[bool, str] = "auto"
    repair: bool = False
    allow_empty: bool = False
    lockstep: bool = False

    def __post_init__(self):
        for name, v in (("batch_tokens", self.batch_tokens),
                        ("rows_per_shard", self.rows_per_shard)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        cs = self.checkpoint_seconds
        if cs is not None and not (isinstance(cs, (int, float)) and cs >= 0):
            raise ValueError(f"checkpoint_seconds must be None or a number >= 0, got {cs!r}")
        lt = self.lock_timeout
        if lt is not None and not (isinstance(lt, (int, float)) and lt >= 0):
            raise ValueError(f"lock_timeout must be None or a number >= 0, got {lt!r}")
        if self.compact not in (True, False, "auto"):
            raise ValueError(f"compact must be True, False or 'auto', got {self.compact!r}")
        if self.progress is not None and not callable(self.progress):
            raise ValueError("progress must be None or a callable taking a BuildProgress")
        object.__setattr__(self, "per_token", bool(self.per_token))

    def plan_settings(self) -> Dict[str, Any]:
        """The settings :func:`.plan.make_plan` takes from the options."""
        return dict(batch_tokens=self.batch_tokens, rows_per_shard=self.rows_per_shard,
                    per_token=self.per_token)


def check_target(path: Path) -> None:
    """RefCacheError if ``path`` cannot be a cache directory (a file, or under a file)."""
    if path.exists() and not path.is_dir():
        raise RefCacheError(f"{path} exists and is not a directory: a reference cache is a "
                            "directory", hint="Give a directory path (created if missing).",
                            cli_hint="Give --out a directory path (it is created if missing).")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RefCacheError(f"cannot create {path}: {parent} is a file")
            break


def run_build(cls, mode: str, model, examples, path, options: BuildOptions):
    """Shared driver of :meth:`RefLogProbCache.build` (``mode="build"``: the directory must
    hold these rows or nothing) and :meth:`RefLogProbCache.ensure` (``mode="ensure"``: add the
    rows it lacks). ``cls`` is the cache class (its ``open`` / ``merge``)."""
    o = options
    rank, world, inited = rank_world(o.rank, o.world_size)
    if o.repair and world > 1:
        raise ValueError("repair=True runs in one process (not with rank / world_size)")
    per_token = o.per_token
    path = Path(path)
    check_target(path)

    eff_softcap, eff_temperature = head_settings(model, o.softcap, o.temperature)
    weight = model_parts(model).weight
    m_dtype = dtype_name(weight.dtype)
    if o.dtype is not None and dtype_name(o.dtype) != m_dtype:
        raise ValueError(f"dtype={dtype_name(o.dtype)} but the model is {m_dtype}; load or "
                         "cast the model to the dtype the cache should reflect")
    if o.fingerprint is None:
        fp = make_fingerprint(model, o.tokenizer, max_length=o.max_length, softcap=o.softcap,
                              temperature=o.temperature, dtype=m_dtype)
    else:
        fp = dict(o.fingerprint)
        validate_fingerprint(fp, eff_softcap, eff_temperature, m_dtype)
    uniq = unique_examples(examples, int(weight.shape[0]))
    if not uniq and not o.allow_empty:
        raise ValueError("examples is empty: there is nothing to cache (allow_empty=True "
                         "accepts it)")
    if o.lockstep and not inited:
        raise ValueError("lockstep=True is for a model sharded over torch.distributed "
                         "processes; torch.distributed is not initialized")
    computer = Computer(model, eff_softcap, eff_temperature, per_token, o.verify_head,
                        lockstep=o.lockstep)
    settings = o.plan_settings()

    with writer_lock(path, rank, world, inited, o.lock_timeout, o.on_lock_wait) as read_only:
        if read_only is not None:
            return _use_read_only(cls, path, fp, uniq, per_token, read_only)
        if o.overwrite and world > 1 and not inited and (path / MANIFEST).exists():
            raise ValueError("overwrite=True with an explicit rank / world_size needs "
                             "torch.distributed (rank 0 clears the directory); clear it first")
        args = (path, mode, uniq, settings)
        if rank == 0 and (world == 1 or inited):  # rank 0 alone changes what is there
            man, planned = _settle_locked(o, fp, args)
        if inited and world > 1:  # the other ranks plan from what rank 0 left
            torch.distributed.barrier()
            man = _checked_manifest(path, fp, per_token)
            planned = _plan_for(man, *args)
        elif world > 1:  # explicit ranks: each plans from the finished builds on its own
            man = _checked_manifest(path, fp, per_token)
            planned = _plan_for(man, *args)
        complete, base_shards, plan = planned
        builds = man["builds"] if man is not None else []

        done_already = not plan.shards or (
            bool(builds) and builds[-1]["plan_sha256"] == plan.sha256 and builds[-1]["complete"])
        gen = int(man.get("generation", 0)) if man is not None else 0
        last: Optional[BuildProgress] = None
        if world == 1 or done_already:
            if rank == 0:  # nothing to split: one process finishes (or just opens) the cache
                last = build_single(path, man, fp, plan, base_shards, complete, computer,
                                    o.progress, o.checkpoint_seconds)
        else:
            last = build_part(path, rank, world, fp, plan, [b["plan_sha256"] for b in complete],
                              gen, computer, o.progress, o.checkpoint_seconds)
            if not inited:
                return None
            torch.distributed.barrier()
            if rank == 0:
                cls.merge(path, world)
        if rank == 0 and (world == 1 or inited):  # (explicit ranks hold only a part's lock)
            after = store.read_manifest(path)
            if o.compact is True or (o.compact == "auto"
                                     and should_compact(after, o.rows_per_shard)):
                compact_locked(path, o.rows_per_shard)
        if inited and world > 1:
            torch.distributed.barrier()
        elif world > 1 and rank != 0:
            return None
        cache = cls.open(path, expect=fp)
        cache.last_build = last
        return cache


def _settle_locked(o: BuildOptions, fp: Dict[str, Any], args: Tuple
                   ) -> Tuple[Optional[Dict[str, Any]], Tuple]:
    """Rank 0's changes to the locked directory before planning (``args`` as for
    :func:`_plan_for`): an overwrite clears it; a repair seals an interrupted build and drops
    damaged shards; an interrupted build of other rows is sealed. Returns ``(manifest,
    _plan_for's result)``."""
    path = args[0]
    if o.overwrite:
        wipe(path)
    man = _checked_manifest(path, fp, o.per_token)
    if o.repair and man is not None:
        if man["builds"] and not man["builds"][-1]["complete"]:
            man = seal_locked(path, man)
        if store.load_rows(path, store.complete_part(man, path)[1], o.per_token,
                           skip_corrupt=True)[1]:
            man, dropped = compact_locked(path, o.rows_per_shard, drop_corrupt=True)
            warnings.warn(f"repair: dropped the damaged shard(s) {dropped} of {path}; "
                          "their rows are recomputed", RuntimeWarning, stacklevel=4)
    planned = _plan_for(man, *args)
    builds = man["builds"] if man is not None else []
    if builds and not builds[-1]["complete"] and builds[-1]["plan_sha256"] != planned[2].sha256:
        # an interrupted run of other rows: keep what it saved as a finished build
        man = seal_locked(path, man)
        planned = _plan_for(man, *args)
    return man, planned


def _keys_of(parts) -> set:
    return {bytes(k) for p in parts for k in p["keys"]}


def _checked_manifest(path: Path, fp: Dict[str, Any], per_token: bool
                      ) -> Optional[Dict[str, Any]]:
    """The manifest at ``path`` (None if absent), refused if its fingerprint or per_token
    differ from this run's."""
    man = store.read_manifest(path)
    if man is not None:
        check_fingerprint(man["fingerprint"], fp, path)
        if bool(man["per_token"]) != per_token:
            raise RefCacheError(f"the reference cache at {path} has per_token="
                                f"{bool(man['per_token'])}; this run asks per_token={per_token}")
    return man


def _plan_for(man: Optional[Dict[str, Any]], path: Path, mode: str,
              uniq: List[PreferenceExample], settings: Dict[str, Any]
              ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], Plan]:
    """(completed builds, their shards, the plan of what this run computes) for a cache in
    the state ``man``. ``build``: the cache must hold these rows or nothing (else
    RefCacheError); ``ensure``: the plan holds the rows the finished builds lack."""
    builds = man["builds"] if man is not None else []
    complete, base = store.complete_part(man, path) if man is not None else ([], [])
    n_base = sum(b["num_shards"] for b in complete)
    per_token = settings["per_token"]
    if mode == "ensure":
        have = _keys_of(store.load_rows(path, base, per_token)[0])
        return complete, base, make_plan([ex for ex in uniq if ex.key_bytes not in have],
                                         first_shard=n_base, **settings)
    plan = make_plan(uniq, first_shard=0, **settings)
    if not builds or (len(builds) == 1 and builds[0]["plan_sha256"] == plan.sha256):
        return [], [], plan
    have = (_keys_of(store.load_rows(path, base, per_token)[0])
            if len(complete) == len(builds) else None)
    if have is None or have != {ex.key_bytes for ex in uniq}:
        raise RefCacheError(
            f"{path} already holds a reference cache of other examples or build settings "
            f"(plan {builds[0]['plan_sha256'][:12]}..., this run's {plan.sha256[:12]}...)",
            hint="Use overwrite=True, another directory, or RefLogProbCache.ensure to add "
                 "rows.",
            cli_hint="Use --overwrite or another --out.")
    return complete, base, make_plan([], first_shard=n_base, **settings)  # the same rows


def _use_read_only(cls, path: Path, fp, uniq: List[PreferenceExample], per_token: bool,
                   err: OSError):
    """A build in a directory that cannot be written: fine if the cache there already holds
    every row with this fingerprint (nothing is written), else an error saying what is
    missing."""
    why = f"{path} cannot be written ({err.strerror or err})"
    if store.read_manifest(path) is None:
        raise RefCacheError(f"{why} and holds no reference cache",
                            cli_hint="Give --out a writable directory.")
    cache = cls.open(path, expect=fp)
    if cache.per_token != per_token:
        raise RefCacheError(f"the reference cache at {path} has per_token={cache.per_token}; "
                            f"this run asks per_token={per_token}")
    missing = [ex for ex in uniq if ex not in cache]
    if missing:
        raise RefCacheError(f"{why}: {len(missing)} of {len(uniq)} examples are not in the "
                            "reference cache there",
                            hint="Build into a writable copy of the directory.",
                            cli_hint="Copy the cache to a writable place and give that as --out.")
    n = len(uniq)
    cache.last_build = BuildProgress("done", n, n, 0, 0, 0, 0, 0, 0, 0.0, n)
    return cache
