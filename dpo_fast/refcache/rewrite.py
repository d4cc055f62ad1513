"""Whole-cache rewrites, each run while the caller holds the cache's writer lock.

- :func:`compact_locked`: all rows sorted by key into whole shards under the next generation's
  file names, one manifest rename switches, then the old files go (``RefLogProbCache.compact``,
  the automatic compaction after an ensure, and repair).
- :func:`seal_locked`: an interrupted build becomes a finished build of the rows it saved.
- :func:`merge_parts_locked`: the ranks' ``part-<r>/`` directories become one build.
- :func:`wipe`: an overwrite's clearing of the directory.

A kill at any point leaves a valid old or new cache; running the operation again finishes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ..data import KEY_BYTES
from . import store
from .fingerprint import check_fingerprint
from .store import MANIFEST, PART_NAME, CorruptCacheError, RefCacheError


def wipe(path: Path) -> None:
    """Deletes a cache's contents (the manifest first, so no reader sees a partial cache);
    keeps the directory and its lock."""
    (path / MANIFEST).unlink(missing_ok=True)
    store.fsync_dir(path)
    for f in path.iterdir():
        if f.is_dir() and f.name.startswith("part-"):
            shutil.rmtree(f)
        elif f.is_file() and f.name not in (store.LOCK_FILE, store.LOCK_OWNER) and (
                store.TMP_MARK in f.name or f.name.endswith(".safetensors")):
            f.unlink()
    store.fsync_dir(path)


def should_compact(man: Dict[str, Any], rows_per_shard: int) -> bool:
    """The "auto" rule: more than max(16, twice the compacted count) shards."""
    rows = sum(s["rows"] for s in man["shards"])
    return len(man["shards"]) > max(16, 2 * math.ceil(rows / rows_per_shard))


def compact_locked(path: Path, rows_per_shard: int, *, drop_corrupt: bool = False,
                   discard_incomplete: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """Rewrites the cache at ``path`` (whose lock the caller holds) as one build of shards of
    ``rows_per_shard`` rows in key order. Returns ``(manifest, dropped shard files)``.

    Every row keeps its values bit for bit. New shards carry the next generation in their
    names, so the old ones stay readable until the new manifest replaces the old one in one
    rename; then the old files are deleted. A compacted cache with this ``rows_per_shard`` is
    left as it is (nothing written)."""
    man = store.read_manifest(path)
    if man is None:
        raise FileNotFoundError(f"no reference cache at {path} (no {MANIFEST})")
    done_builds, shards = store.complete_part(man, path)
    if len(done_builds) < len(man["builds"]) and not discard_incomplete:
        raise RefCacheError(
            f"the reference cache at {path} holds an unfinished build; finish it before "
            "compacting", hint="Run the same build / ensure again to finish it.",
            cli_hint="Rerun the same `dpo-fast precompute` command to finish it first.")
    per_token = bool(man["per_token"])
    parts, bad = store.load_rows(path, shards, per_token, skip_corrupt=drop_corrupt)
    b0 = done_builds[0] if len(done_builds) == 1 else None
    if (not bad and len(done_builds) == len(man["builds"]) and b0 is not None
            and b0.get("kind") == "compacted" and b0.get("rows_per_shard") == rows_per_shard):
        # already compacted: only what an interrupted compaction left behind goes
        store.remove_unlisted(path, [r["file"] for r in man["shards"]])
        store.remove_temps(path)
        return man, []
    keys = np.concatenate([p["keys"] for p in parts]) if parts else \
        np.zeros((0, KEY_BYTES), np.uint8)
    order = np.argsort(np.ascontiguousarray(keys).view("S16").reshape(-1), kind="stable")
    cols = {k: (np.concatenate([p[k] for p in parts])[order] if parts else np.zeros(0))
            for k in store.SHARD_TENSORS if k != "keys"}
    keys = keys[order]
    tok_rows: List[np.ndarray] = []
    if per_token:
        for p in parts:
            tok_rows.extend(store.part_from_arrays(p, True)["token_logps"])
        tok_rows = [tok_rows[i] for i in order]
    gen = int(man.get("generation", 0)) + 1
    n = len(keys)
    h = hashlib.sha256(b"dpo_fast/compacted/v1\0")
    h.update(json.dumps({"rows_per_shard": rows_per_shard, "per_token": per_token}).encode())
    h.update(keys.tobytes())
    recs = []
    for i, a in enumerate(range(0, n, rows_per_shard)):
        b = min(a + rows_per_shard, n)
        part = {"keys": keys[a:b], **{k: v[a:b] for k, v in cols.items()}}
        if per_token:
            part["token_logps"] = tok_rows[a:b]
        data, rows = store.encode_shard([part], i, per_token)
        name = store.shard_name(i, gen)
        store.atomic_write(path / name, data)
        recs.append({"file": name, "index": i, "rows": rows, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
    new = store.new_manifest(man["fingerprint"], per_token, gen)
    new["builds"] = [{"kind": "compacted", "plan_sha256": h.hexdigest(), "first_shard": 0,
                      "num_shards": len(recs), "rows": n, "rows_per_shard": rows_per_shard,
                      "complete": True}] if n else []
    new["shards"] = recs
    store.write_manifest(path, new)
    store.remove_unlisted(path, [r["file"] for r in recs])
    store.remove_temps(path)
    return new, [r["file"] for r in bad]


def seal_locked(path: Path, man: Dict[str, Any]) -> Dict[str, Any]:
    """Turns the unfinished last build of the cache at ``path`` (whose lock the caller holds)
    into a finished build of the rows it saved: its whole shards, plus one shard made of the
    segments of the shard it was computing. Nothing computed and saved is lost when a run
    with other rows follows an interrupted one. Returns the new manifest (written)."""
    last = man["builds"][-1]
    first = last["first_shard"]
    gen = int(man.get("generation", 0))
    per_token = bool(man["per_token"])
    kept: List[Dict[str, Any]] = []
    for rec in sorted((s for s in man["shards"] if s["index"] >= first),
                      key=lambda r: r["index"]):
        if rec["index"] != first + len(kept):
            break
        try:
            store.read_shard(path, rec)
        except CorruptCacheError:
            break
        kept.append(rec)
    index = first + len(kept)
    parts, end = [], 0
    for rec in sorted((s for s in man.get("segments", []) if s.get("shard") == index),
                      key=lambda r: r.get("batches", [0])[0]):
        if rec.get("batches", [None])[0] != end:
            break
        try:
            parts.append(store.part_from_arrays(store.read_shard(path, rec), per_token))
        except CorruptCacheError:
            break
        end = rec["batches"][1]
    if parts:
        data, n = store.encode_shard(parts, index, per_token)
        name = store.shard_name(index, gen)
        store.atomic_write(path / name, data)
        kept.append({"file": name, "index": index, "rows": n, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
    rows = sum(r["rows"] for r in kept)
    new = dict(man, segments=[], complete=True)
    new["shards"] = [s for s in man["shards"] if s["index"] < first] + kept
    new["builds"] = man["builds"][:-1]
    if kept:
        h = hashlib.sha256(b"dpo_fast/sealed/v1\0")
        h.update(f"{last['plan_sha256']}:{rows}".encode())
        new["builds"].append({"kind": "sealed", "plan_sha256": h.hexdigest(),
                              "first_shard": first, "num_shards": len(kept), "rows": rows,
                              "batch_tokens": last.get("batch_tokens"),
                              "rows_per_shard": last.get("rows_per_shard"), "complete": True})
    store.write_manifest(path, new)
    store.remove_unlisted(path, [s["file"] for s in new["shards"]])
    return new


def merge_parts_locked(path: Path, world_size: int) -> None:
    """Assembles the parts of ``world_size`` ranks into the cache at ``path`` (whose lock the
    caller holds); see :meth:`RefLogProbCache.merge`. Nothing to do if already merged."""
    man = store.read_manifest(path)
    part_dirs = [path / PART_NAME.format(r) for r in range(world_size)]
    if man is not None and man.get("complete") and not any(d.exists() for d in part_dirs):
        return  # already merged
    parts = []
    for r, d in enumerate(part_dirs):
        pm = store.read_json(d / MANIFEST, f"manifest of rank {r}'s part")
        if pm.get("part") != {"rank": r, "world_size": world_size}:
            raise RefCacheError(f"{d}: written by {pm.get('part')}, expected rank {r} of "
                                f"{world_size}")
        if not pm["build"]["complete"]:
            raise RefCacheError(f"{d} is incomplete: rank {r} has not finished its shards")
        parts.append(pm)
    p0 = parts[0]
    for r, pm in enumerate(parts[1:], 1):
        for field in ("fingerprint", "per_token", "build", "base", "generation"):
            if pm.get(field) != p0.get(field):
                raise RefCacheError(f"rank {r}'s part differs from rank 0's in {field!r} "
                                    "(ranks must build the same examples with the same "
                                    "settings)")
    gen = int(p0.get("generation", 0))
    base_builds: List[Dict[str, Any]] = []
    base_shards: List[Dict[str, Any]] = []
    if man is not None:
        check_fingerprint(man["fingerprint"], p0["fingerprint"], path)
        base_builds, base_shards = store.complete_part(man, path)
        if int(man.get("generation", 0)) != gen:
            raise RefCacheError(f"{path}: the cache was compacted since the parts were "
                                "planned; rebuild the parts")
    if [b["plan_sha256"] for b in base_builds] != p0["base"]:
        raise RefCacheError(f"{path}: the cache changed since the parts were planned "
                            "(different completed builds); rebuild the parts")
    build = p0["build"]
    first, n = build["first_shard"], build["num_shards"]
    records = sorted((s for pm in parts for s in pm["shards"]), key=lambda s: s["index"])
    if [s["index"] for s in records] != list(range(first, first + n)):
        raise RefCacheError(f"the parts hold shards {[s['index'] for s in records]}, "
                            f"expected {first}..{first + n - 1} once each")
    for rec in records:
        src = part_dirs[(rec["index"] - first) % world_size] / rec["file"]
        dst = path / rec["file"]
        if src.exists():
            store.read_shard(src.parent, rec)
            src.replace(dst)
        else:  # moved by an earlier, interrupted merge
            store.read_shard(path, rec)
    store.fsync_dir(path)
    new = store.new_manifest(p0["fingerprint"], p0["per_token"], gen)
    new["builds"] = base_builds + [dict(build, complete=True)]
    new["shards"] = base_shards + records
    store.write_manifest(path, new)
    for d in part_dirs:
        shutil.rmtree(d, ignore_errors=True)
    store.remove_temps(path)
    store.remove_unlisted(path, (s["file"] for s in new["shards"]))
    store.fsync_dir(path)
