"""Computing a plan into one directory: checkpoint segments, resume, whole shards.

A build writes either the cache directory itself (:func:`build_single`, one process) or one
rank's ``part-<r>/`` (:func:`build_part`), with the same protocol. Rows are computed batch by
batch in the plan's order; the rows of the shard being computed are also written as a
*segment* (a small safetensors file listed in the manifest) whenever ``checkpoint_seconds`` of
compute have passed since the last durable write, so a kill loses at most that much work plus
one batch. When a shard's last batch is done, the shard is written whole and its segments are
dropped in the same manifest update: a finished build holds only whole shards, byte-identical
however often it was interrupted. A re-run first takes stock (:func:`recover`): it keeps the
shards and segments that pass their checks and continues from there.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import store
from .compute import Computer
from .plan import Plan
from .progress import BuildProgress, Tracker
from .store import FORMAT, FORMAT_VERSION, MANIFEST, PART_NAME, CorruptCacheError

# per unfinished plan-relative shard: its saved segments (manifest record, part), in order
Segments = Dict[int, List[Tuple[Dict[str, Any], Dict[str, Any]]]]


class WriteDir:
    """A directory this process writes (the cache or one rank's part) and its manifest."""

    def __init__(self, d: Path, man: Dict[str, Any]):
        self.d = d
        self.man = man
        man.setdefault("segments", [])

    def save(self) -> None:
        store.write_manifest(self.d, self.man)

    def write_segment(self, parts: List[Dict[str, Any]], index: int, batches: Tuple[int, int],
                      per_token: bool, generation: int) -> Dict[str, Any]:
        """Writes ``parts`` (batches ``[first, end)`` of shard ``index``) as a segment and
        lists it in the manifest; returns its record."""
        data, n = store.encode_shard(parts, index, per_token, segment=batches)
        name = store.segment_name(index, batches[0], generation)
        store.atomic_write(self.d / name, data)
        rec = {"file": name, "shard": index, "batches": list(batches), "rows": n,
               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.man["segments"].append(rec)
        self.save()
        return rec

    def write_shard(self, parts: List[Dict[str, Any]], index: int, tokens: int, per_token: bool,
                    generation: int, segments: Sequence[Dict[str, Any]]) -> None:
        """Writes ``parts`` as shard ``index`` whole, lists it and unlists its ``segments`` in
        one manifest write, then deletes the segment files."""
        data, n = store.encode_shard(parts, index, per_token)
        name = store.shard_name(index, generation)
        store.atomic_write(self.d / name, data)
        gone = {s["file"] for s in segments}
        self.man["shards"].append({"file": name, "index": index, "rows": n, "tokens": tokens,
                                   "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})
        self.man["segments"] = [s for s in self.man["segments"] if s["file"] not in gone]
        self.save()
        for f in gone:
            (self.d / f).unlink(missing_ok=True)

    def clean(self) -> None:
        """Deletes temp files and shard / segment files the manifest does not list."""
        store.remove_temps(self.d)
        store.remove_unlisted(self.d, [s["file"] for s in self.man["shards"]]
                              + [s["file"] for s in self.man["segments"]])


def recover(w: WriteDir, plan: Plan, mine: Sequence[int]) -> Tuple[Set[int], Segments]:
    """What an interrupted run of ``plan`` left in ``w``: the plan-relative shards that are
    done, and per unfinished shard its segments ``(record, part)`` covering its first
    batches. Whatever fails its checks (size, SHA-256, the plan's keys) or does not continue
    a shard's first batches is unlisted (and recomputed)."""
    first, n = plan.first_shard, len(plan.shards)
    mine_set = set(mine)
    keep_shards, done = [], set()
    changed = False
    for rec in w.man["shards"]:
        s = rec["index"] - first
        if s < 0:
            keep_shards.append(rec)  # an earlier build's shard: not this run's business
            continue
        ok = s < n and s in mine_set and s not in done
        if ok:
            try:
                arrays = store.read_shard(w.d, rec)
                ok = arrays["keys"].tobytes() == plan.batch_keys(s, 0, len(plan.shards[s]))
            except CorruptCacheError as e:
                warnings.warn(f"{e.message}; recomputing it", RuntimeWarning, stacklevel=4)
                ok = False
        if ok:
            keep_shards.append(rec)
            done.add(s)
        else:
            changed = True
    segs: Segments = {}
    for rec in sorted(w.man["segments"], key=lambda r: (r.get("shard", -1),
                                                        r.get("batches", [0])[0])):
        s = rec.get("shard", -1) - first
        b = rec.get("batches")
        have = segs.get(s, [])
        ok = (s in mine_set and s not in done and isinstance(b, list) and len(b) == 2
              and b[0] == (have[-1][0]["batches"][1] if have else 0)
              and b[0] < b[1] <= len(plan.shards[s]))
        if ok:
            try:
                arrays = store.read_shard(w.d, rec)
                ok = arrays["keys"].tobytes() == plan.batch_keys(s, b[0], b[1])
            except CorruptCacheError:
                ok = False
        if ok:
            segs.setdefault(s, []).append((rec, store.part_from_arrays(arrays, plan.per_token)))
        else:
            changed = True
    if changed:
        w.man["shards"] = keep_shards
        w.man["segments"] = [rec for v in segs.values() for rec, _ in v]
        w.save()
    return done, segs


def compute_shards(w: WriteDir, plan: Plan, mine: Sequence[int], done: Set[int],
                   segs: Segments, computer: Computer, tracker: Tracker,
                   checkpoint_seconds: Optional[float], generation: int) -> None:
    """Computes the plan's shards ``mine`` (plan-relative) not in ``done`` into ``w``,
    continuing each from its segments; writes a segment whenever ``checkpoint_seconds`` of
    compute passed since the last durable write, and each finished shard whole. The model
    runs in eval mode (its mode is restored after) without autograd (:meth:`Computer.running`)."""
    with computer.running():
        for s in mine:
            if s not in done:
                _compute_shard(w, plan, s, segs.get(s, []), computer, tracker,
                               checkpoint_seconds, generation)


def _compute_shard(w: WriteDir, plan: Plan, s: int,
                   have: List[Tuple[Dict[str, Any], Dict[str, Any]]], computer: Computer,
                   tracker: Tracker, checkpoint_seconds: Optional[float], generation: int
                   ) -> None:
    """Shard ``s`` of :func:`compute_shards`, continued after its saved segments ``have``."""
    index = plan.first_shard + s
    batches = plan.shards[s]
    seg_recs = [rec for rec, _ in have]
    parts = [part for _, part in have]
    start = have[-1][0]["batches"][1] if have else 0
    pending: List[Dict[str, Any]] = []  # computed, not yet in a segment
    pending_from = start
    last_save = time.perf_counter()
    for j in range(start, len(batches)):
        a, b = batches[j]
        exs = plan.examples[a:b]
        part = computer.rows(exs)
        parts.append(part)
        pending.append(part)
        tracker.computed(b - a, sum(ex.num_tokens for ex in exs))
        tracker.emit("batch")
        if (checkpoint_seconds is not None and j + 1 < len(batches)
                and time.perf_counter() - last_save >= checkpoint_seconds):
            rec = w.write_segment(pending, index, (pending_from, j + 1), plan.per_token,
                                  generation)
            seg_recs.append(rec)
            pending, pending_from = [], j + 1
            tracker.rows_saved += rec["rows"]
            tracker.emit("checkpoint")
            last_save = time.perf_counter()
    w.write_shard(parts, index, plan.shard_tokens(s), plan.per_token, generation, seg_recs)
    tracker.rows_saved += sum(len(p["keys"]) for p in pending)
    tracker.shards_done += 1
    tracker.emit("shard")


def build_single(path: Path, man: Optional[Dict[str, Any]], fp: Dict[str, Any], plan: Plan,
                 base_shards: List[Dict[str, Any]], base_builds: List[Dict[str, Any]],
                 computer: Computer, progress, checkpoint_seconds: Optional[float]
                 ) -> BuildProgress:
    """Single-process build of ``plan`` into the cache at ``path`` (manifest ``man``, None if
    absent) on top of the completed builds ``base_builds`` and their ``base_shards``."""
    fresh = man is None
    if man is None:
        man = store.new_manifest(fp, plan.per_token)
    last = man["builds"][-1] if man["builds"] else None
    resume = last is not None and last["plan_sha256"] == plan.sha256
    if not resume:  # a new build; an interrupted build of other rows, if any, is dropped
        stale = (man["builds"] != base_builds or man["shards"] != base_shards
                 or man.get("segments") or not man["complete"])
        man["builds"] = list(base_builds)
        man["shards"] = list(base_shards)
        man["segments"] = []
        if plan.shards:
            man["builds"].append(plan.record(False))
        man["complete"] = not plan.shards
        if fresh or stale or plan.shards:
            store.write_manifest(path, man)
    w = WriteDir(path, man)
    done, segs = recover(w, plan, range(len(plan.shards))) if resume and not man["complete"] \
        else (set(range(len(plan.shards))) if man["complete"] else set(), {})
    if not man["complete"]:
        w.clean()
    tracker = Tracker(progress, plan, range(len(plan.shards)), done, segs)
    if not man["complete"]:
        tracker.emit("start")
        with computer.running():
            computer.begin(plan.examples[0])
            compute_shards(w, plan, range(len(plan.shards)), done, segs, computer, tracker,
                           checkpoint_seconds, man.get("generation", 0))
        man["builds"][-1]["complete"] = True
        man["complete"] = True
        w.save()
    tracker.emit("done")
    return tracker.snapshot("done")


def build_part(path: Path, rank: int, world: int, fp: Dict[str, Any], plan: Plan,
               base: List[str], generation: int, computer: Computer, progress,
               checkpoint_seconds: Optional[float]) -> BuildProgress:
    """Rank ``rank``'s shards of ``plan`` (those with ``i % world == rank``) into
    ``path/part-<rank>``, with the same write protocol as a single build. ``base`` are the
    plan hashes of the cache's completed builds (checked again by the merge)."""
    d = path / PART_NAME.format(rank)
    d.mkdir(parents=True, exist_ok=True)
    mine = [s for s in range(len(plan.shards)) if s % world == rank]
    want = {"part": {"rank": rank, "world_size": world}, "fingerprint": fp,
            "per_token": plan.per_token, "base": base, "generation": generation}
    pm = store.read_json(d / MANIFEST, "part manifest") if (d / MANIFEST).exists() else None
    resume = (pm is not None and pm["build"]["plan_sha256"] == plan.sha256
              and all(pm.get(k) == v for k, v in want.items()))
    if not resume:
        pm = {"format": FORMAT, "format_version": FORMAT_VERSION, **want,
              "build": plan.record(False), "shards": [], "segments": []}
        store.write_manifest(d, pm)
    w = WriteDir(d, pm)
    done, segs = recover(w, plan, mine) if resume else (set(), {})
    w.clean()
    tracker = Tracker(progress, plan, mine, done, segs)
    with computer.running():
        computer.begin(plan.examples[0])
        if not pm["build"]["complete"]:
            tracker.emit("start")
            compute_shards(w, plan, mine, done, segs, computer, tracker, checkpoint_seconds,
                           generation)
            pm["build"]["complete"] = True
            w.save()
        computer.drain()
    tracker.emit("done")
    return tracker.snapshot("done")
