"""Building a reference cache: forward passes, checkpoints, resume, ranks, compaction.

One writer at a time: every build, ensure, merge and compaction holds the directory's writer
lock (:func:`.store.hold_lock`) from its first read of the manifest to its last write.

Progress is kept at a bounded cost. Rows are computed batch by batch in the plan's order; the
rows of the shard being computed are also written as a *segment* (a small safetensors file
listed in the manifest) whenever ``checkpoint_seconds`` of compute have passed since the last
durable write, so a kill loses at most that much work plus one batch. When a shard's last batch
is done, the shard is written whole and its segments are dropped in the same manifest update:
a finished build holds only whole shards, byte-identical however often it was interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..data import KEY_BYTES, PreferenceExample, pack_pair_batch
from ..models import body_hidden, head_settings, input_device, model_parts
from ..ops.logprobs import linear_logprobs
from . import store
from .fingerprint import check_fingerprint, dtype_name, validate_fingerprint
from .fingerprint import fingerprint as make_fingerprint
from .plan import Plan, make_plan, unique_examples
from .store import (
    FORMAT,
    FORMAT_VERSION,
    KEY_DEFINITION,
    LOGPROB_VERSION,
    MANIFEST,
    PART_NAME,
    CorruptCacheError,
    RefCacheError,
)

_IGNORE = -100
DEFAULT_CHECKPOINT_SECONDS = 30.0


@dataclass(frozen=True)
class BuildProgress:
    """Passed to a build's ``progress`` callable.

    ``event`` is "start", "batch" (after a batch's forward), "checkpoint" (after a segment of
    the current shard is durable), "shard" (after a shard is durable and listed in the
    manifest) or "done". Counts cover this build's plan (for a rank: its shards);
    ``rows_done`` / ``tokens_done`` include rows kept from an earlier run, ``rows_computed`` /
    ``tokens_computed`` only this run's work, ``rows_saved`` the rows on disk (what a kill now
    would keep). Tokens are real tokens of both sequences (prompt counted twice), padding
    excluded.
    """

    event: str
    rows_done: int
    rows_total: int
    tokens_done: int
    tokens_total: int
    shards_done: int
    shards_total: int
    rows_computed: int
    tokens_computed: int
    elapsed_s: float
    rows_saved: int = 0


# ----------------------------------------------------------------------------- computing


class Computer:
    """Runs the reference forward for batches of examples (eval mode, inference mode)."""

    def __init__(self, model, softcap, temperature, per_token, verify_head):
        self.model = model
        self.body, self.weight, self.bias = model_parts(model)
        self.device = input_device(model, self.weight)
        self.softcap, self.temperature = softcap, temperature
        self.per_token = per_token
        self.verify_head = verify_head

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return body_hidden(self.body, input_ids, attention_mask, self.weight.device)

    def check_head(self, ex: PreferenceExample, max_tokens: int = 64) -> None:
        """Compares the fused head with the model's own full logits on the first
        ``max_tokens`` tokens of ``ex``'s prompt + chosen (every next token scored; logits of
        that short prefix only): catches a head transform (logit scale, softcap) that
        softcap / temperature do not describe."""
        seq = np.concatenate([ex.prompt_ids, ex.chosen_ids])[:max_tokens].astype(np.int64)
        ids = torch.from_numpy(seq)[None].to(self.device)
        mask = torch.ones_like(ids)
        tgt = ids[0, 1:].to(self.weight.device)
        ours = linear_logprobs(self.hidden(ids, mask)[0, :-1], self.weight, tgt, bias=self.bias,
                               softcap=self.softcap, temperature=self.temperature)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[0, :-1].float()
        full = torch.log_softmax(logits, -1).gather(-1, tgt.to(logits.device)[:, None])[:, 0]
        ours = ours.to(full.device)
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        tol = (0.25 + 0.02 * full.abs()) if half else (1e-3 + 1e-4 * full.abs())
        err = (ours - full).abs()
        if not bool((err <= tol).all()):
            raise RefCacheError(
                f"the model's own logits disagree with the fused head (max |diff| "
                f"{err.max().item():.3g} nats per token on example {ex.key}): the model "
                "transforms its logits in a way not given by softcap / temperature "
                f"(used softcap={self.softcap}, temperature={self.temperature}); pass the right "
                "softcap= / temperature=, or verify_head=False if this is expected")
        self.verify_head = False

    def rows(self, examples: Sequence[PreferenceExample]) -> Dict[str, Any]:
        """Per-row results for ``examples``: sums, lengths and (per_token) token arrays."""
        if self.verify_head:
            self.check_head(examples[0])
        r = len(examples)
        b = pack_pair_batch(examples, device=self.device)
        logp = linear_logprobs(self.hidden(b.input_ids, b.attention_mask), self.weight,
                               b.targets.to(self.weight.device), bias=self.bias,
                               softcap=self.softcap, temperature=self.temperature)
        lp = logp.float().cpu().numpy()
        sel = (b.targets != _IGNORE).cpu().numpy()
        flat = lp[sel].tolist()  # row-major: each sequence's response tokens in order
        lengths = b.lengths.cpu().numpy()
        offs = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.array([math.fsum(flat[offs[s]:offs[s + 1]]) for s in range(2 * r)],
                        dtype=np.float64).astype(np.float32)
        out = {"keys": np.frombuffer(b"".join(e.key_bytes for e in examples),
                                     dtype=np.uint8).reshape(r, KEY_BYTES),
               "chosen_logps": sums[:r], "rejected_logps": sums[r:],
               "chosen_lengths": lengths[:r].astype(np.int32),
               "rejected_lengths": lengths[r:].astype(np.int32)}
        if self.per_token:
            flat32 = lp[sel]
            out["token_logps"] = [np.concatenate([flat32[offs[i]:offs[i + 1]],
                                                  flat32[offs[r + i]:offs[r + i + 1]]])
                                  for i in range(r)]
        return out


# ----------------------------------------------------------------------------- manifests


def new_manifest(fp: Dict[str, Any], per_token: bool, generation: int = 0) -> Dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp,
            "per_token": per_token, "key": KEY_DEFINITION, "logprob_version": LOGPROB_VERSION,
            "builds": [], "shards": [], "segments": [], "generation": generation,
            "complete": True}


def complete_part(man: Dict[str, Any], where: Path) -> Tuple[List[Dict[str, Any]],
                                                             List[Dict[str, Any]]]:
    """(completed builds, their shards) of a manifest: what a reader may use."""
    builds = man["builds"]
    if any(not b["complete"] for b in builds[:-1]):
        raise store.corrupt_manifest(f"{where / MANIFEST}: only the last build may be "
                                     "incomplete")
    done = [b for b in builds if b["complete"]]
    n = sum(b["num_shards"] for b in done)
    return done, [s for s in man["shards"] if s["index"] < n]


class _Dir:
    """A directory this process writes (the cache or one rank's part) and its manifest."""

    def __init__(self, d: Path, man: Dict[str, Any]):
        self.d = d
        self.man = man
        man.setdefault("segments", [])

    def save(self) -> None:
        store.write_manifest(self.d, self.man)

    def add_segment(self, rec: Dict[str, Any]) -> None:
        self.man["segments"].append(rec)
        self.save()

    def add_shard(self, rec: Dict[str, Any], segments: Sequence[Dict[str, Any]]) -> None:
        """Lists shard ``rec`` and unlists its ``segments`` in one manifest write, then
        deletes the segment files."""
        gone = {s["file"] for s in segments}
        self.man["shards"].append(rec)
        self.man["segments"] = [s for s in self.man["segments"] if s["file"] not in gone]
        self.save()
        for name in gone:
            (self.d / name).unlink(missing_ok=True)

    def clean(self) -> None:
        """Deletes temp files and shard / segment files the manifest does not list."""
        store.remove_temps(self.d)
        store.remove_unlisted(self.d, [s["file"] for s in self.man["shards"]]
                              + [s["file"] for s in self.man["segments"]])


def _recover(w: _Dir, plan: Plan, mine: Sequence[int]
             ) -> Tuple[Set[int], Dict[int, List[Tuple[Dict[str, Any], Dict[str, Any]]]]]:
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
    segs: Dict[int, List[Tuple[Dict[str, Any], Dict[str, Any]]]] = {}
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


# ----------------------------------------------------------------------------- progress


class _Tracker:
    """Progress counters of one build (or one rank's part) and the callback."""

    def __init__(self, cb, plan: Plan, mine: Sequence[int], done: Set[int],
                 segs: Dict[int, List[Tuple[Dict[str, Any], Dict[str, Any]]]]):
        self.cb = cb
        self.t0 = time.perf_counter()
        rows = {s: plan.shard_rows(s)[1] - plan.shard_rows(s)[0] for s in mine}
        toks = {s: plan.shard_tokens(s) for s in mine}
        self.rows_total, self.tokens_total = sum(rows.values()), sum(toks.values())
        self.rows_done = sum(rows[s] for s in done)
        self.tokens_done = sum(toks[s] for s in done)
        for s, v in segs.items():
            for rec, _ in v:
                b0, b1 = rec["batches"]
                a, b = plan.shards[s][b0][0], plan.shards[s][b1 - 1][1]
                self.rows_done += b - a
                self.tokens_done += sum(ex.num_tokens for ex in plan.examples[a:b])
        self.rows_saved = self.rows_done
        self.shards_total, self.shards_done = len(mine), len(done)
        self.rows_computed = self.tokens_computed = 0

    def snapshot(self, event: str) -> BuildProgress:
        return BuildProgress(event, self.rows_done, self.rows_total, self.tokens_done,
                             self.tokens_total, self.shards_done, self.shards_total,
                             self.rows_computed, self.tokens_computed,
                             time.perf_counter() - self.t0, self.rows_saved)

    def emit(self, event: str) -> None:
        if self.cb is not None:
            self.cb(self.snapshot(event))


def _compute(w: _Dir, plan: Plan, mine: Sequence[int], done: Set[int],
             segs: Dict[int, List[Tuple[Dict[str, Any], Dict[str, Any]]]], computer: Computer,
             tracker: _Tracker, checkpoint_seconds: Optional[float], generation: int) -> None:
    """Computes the plan's shards ``mine`` (plan-relative) not in ``done`` into ``w``,
    continuing each from its segments; writes a segment whenever ``checkpoint_seconds`` of
    compute passed since the last durable write, and each finished shard whole."""
    model = computer.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in mine:
                if s in done:
                    continue
                index = plan.first_shard + s
                batches = plan.shards[s]
                have = segs.get(s, [])
                seg_recs = [rec for rec, _ in have]
                parts = [part for _, part in have]
                start = have[-1][0]["batches"][1] if have else 0
                pending: List[Dict[str, Any]] = []
                pending_from = start
                last_save = time.perf_counter()
                for j in range(start, len(batches)):
                    a, b = batches[j]
                    exs = plan.examples[a:b]
                    part = computer.rows(exs)
                    parts.append(part)
                    pending.append(part)
                    toks = sum(ex.num_tokens for ex in exs)
                    tracker.rows_done += b - a
                    tracker.rows_computed += b - a
                    tracker.tokens_done += toks
                    tracker.tokens_computed += toks
                    tracker.emit("batch")
                    if (checkpoint_seconds is not None and j + 1 < len(batches)
                            and time.perf_counter() - last_save >= checkpoint_seconds):
                        data, n = store.encode_shard(pending, index, plan.per_token,
                                                     segment=(pending_from, j + 1))
                        name = store.segment_name(index, pending_from, generation)
                        store.atomic_write(w.d / name, data)
                        rec = {"file": name, "shard": index, "batches": [pending_from, j + 1],
                               "rows": n, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}
                        w.add_segment(rec)
                        seg_recs.append(rec)
                        pending, pending_from = [], j + 1
                        tracker.rows_saved += n
                        tracker.emit("checkpoint")
                        last_save = time.perf_counter()
                data, n = store.encode_shard(parts, index, plan.per_token)
                name = store.shard_name(index, generation)
                store.atomic_write(w.d / name, data)
                w.add_shard({"file": name, "index": index, "rows": n,
                             "tokens": plan.shard_tokens(s), "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}, seg_recs)
                tracker.rows_saved += sum(len(p["keys"]) for p in pending)
                tracker.shards_done += 1
                tracker.emit("shard")
    finally:
        model.train(was_training)


def _build_single(path: Path, man: Optional[Dict[str, Any]], fp: Dict[str, Any], plan: Plan,
                  base_shards: List[Dict[str, Any]], base_builds: List[Dict[str, Any]],
                  computer: Computer, progress, checkpoint_seconds) -> BuildProgress:
    """Single-process build of ``plan`` on top of the completed builds ``base_builds``."""
    fresh = man is None
    if man is None:
        man = new_manifest(fp, plan.per_token)
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
    w = _Dir(path, man)
    done, segs = _recover(w, plan, range(len(plan.shards))) if resume and not man["complete"] \
        else (set(range(len(plan.shards))) if man["complete"] else set(), {})
    if not man["complete"]:
        w.clean()
    tracker = _Tracker(progress, plan, range(len(plan.shards)), done, segs)
    if not man["complete"]:
        tracker.emit("start")
        _compute(w, plan, range(len(plan.shards)), done, segs, computer, tracker,
                 checkpoint_seconds, man.get("generation", 0))
        man["builds"][-1]["complete"] = True
        man["complete"] = True
        w.save()
    tracker.emit("done")
    return tracker.snapshot("done")


def _build_part(path: Path, rank: int, world: int, fp: Dict[str, Any], plan: Plan,
                base: List[str], generation: int, computer: Computer, progress,
                checkpoint_seconds) -> BuildProgress:
    """Rank ``rank``'s shards of ``plan`` (those with ``i % world == rank``) into
    ``path/part-<rank>``, with the same write protocol as a single build."""
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
    w = _Dir(d, pm)
    done, segs = _recover(w, plan, mine) if resume else (set(), {})
    w.clean()
    tracker = _Tracker(progress, plan, mine, done, segs)
    if not pm["build"]["complete"]:
        tracker.emit("start")
        _compute(w, plan, mine, done, segs, computer, tracker, checkpoint_seconds, generation)
        pm["build"]["complete"] = True
        w.save()
    tracker.emit("done")
    return tracker.snapshot("done")


# ----------------------------------------------------------------------------- whole-cache ops


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


def load_rows(path: Path, shards: List[Dict[str, Any]], per_token: bool, *,
              skip_corrupt: bool = False):
    """Reads (and verifies) ``shards``: ``(parts, bad)`` where ``parts`` are the shards'
    arrays in order and ``bad`` the records of corrupt shards (only with ``skip_corrupt``;
    otherwise the first one raises)."""
    parts, bad = [], []
    for rec in shards:
        try:
            a = store.read_shard(path, rec)
        except CorruptCacheError:
            if not skip_corrupt:
                raise
            bad.append(rec)
            continue
        if per_token and "token_logps" not in a:
            raise store.corrupt_shard(f"shard {path / rec['file']}: per-token cache without "
                                      "'token_logps'")
        parts.append(a)
    return parts, bad


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
    done_builds, shards = complete_part(man, path)
    if len(done_builds) < len(man["builds"]) and not discard_incomplete:
        raise RefCacheError(
            f"the reference cache at {path} holds an unfinished build; finish it before "
            "compacting", hint="Run the same build / ensure again to finish it.",
            cli_hint="Rerun the same `dpo-fast precompute` command to finish it first.")
    per_token = bool(man["per_token"])
    parts, bad = load_rows(path, shards, per_token, skip_corrupt=drop_corrupt)
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
    new = new_manifest(man["fingerprint"], per_token, gen)
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


def _should_compact(man: Dict[str, Any], rows_per_shard: int) -> bool:
    rows = sum(s["rows"] for s in man["shards"])
    return len(man["shards"]) > max(16, 2 * math.ceil(rows / rows_per_shard))


# ----------------------------------------------------------------------------- locking


def _dist_rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int, bool]:
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


_OK, _READ_ONLY, _FAILED = 2, 1, 0


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


# ----------------------------------------------------------------------------- the driver


def run_build(cls, mode: str, model, examples, path, *, batch_tokens: int = 16384,
              fingerprint: Optional[Dict[str, Any]] = None, tokenizer=None,
              max_length: Optional[int] = None, dtype=None, softcap: Optional[float] = None,
              temperature: float = 1.0, per_token: bool = False, rows_per_shard: int = 4096,
              progress: Optional[Callable[[BuildProgress], None]] = None,
              rank: Optional[int] = None, world_size: Optional[int] = None,
              overwrite: bool = False, verify_head: bool = True,
              checkpoint_seconds: Optional[float] = DEFAULT_CHECKPOINT_SECONDS,
              lock_timeout: Optional[float] = None,
              on_lock_wait: Optional[Callable[[str], None]] = None,
              compact: Union[bool, str] = "auto", repair: bool = False,
              allow_empty: bool = False):
    """Shared driver of :meth:`RefLogProbCache.build` (``mode="build"``: the directory must
    hold these rows or nothing) and :meth:`RefLogProbCache.ensure` (``mode="ensure"``: add the
    rows it lacks)."""
    for name, v in (("batch_tokens", batch_tokens), ("rows_per_shard", rows_per_shard)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if checkpoint_seconds is not None and not (
            isinstance(checkpoint_seconds, (int, float)) and checkpoint_seconds >= 0):
        raise ValueError(f"checkpoint_seconds must be None or a number >= 0, got "
                         f"{checkpoint_seconds!r}")
    if lock_timeout is not None and not (isinstance(lock_timeout, (int, float))
                                         and lock_timeout >= 0):
        raise ValueError(f"lock_timeout must be None or a number >= 0, got {lock_timeout!r}")
    if compact not in (True, False, "auto"):
        raise ValueError(f"compact must be True, False or 'auto', got {compact!r}")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be None or a callable taking a BuildProgress")
    rank, world, inited = _dist_rank_world(rank, world_size)
    if repair and world > 1:
        raise ValueError("repair=True runs in one process (not with rank / world_size)")
    per_token = bool(per_token)
    path = Path(path)
    check_target(path)

    eff_softcap, eff_temperature = head_settings(model, softcap, temperature)
    weight = model_parts(model).weight
    m_dtype = dtype_name(weight.dtype)
    if dtype is not None and dtype_name(dtype) != m_dtype:
        raise ValueError(f"dtype={dtype_name(dtype)} but the model is {m_dtype}; load or "
                         "cast the model to the dtype the cache should reflect")
    if fingerprint is None:
        fp = make_fingerprint(model, tokenizer, max_length=max_length, softcap=softcap,
                              temperature=temperature, dtype=m_dtype)
    else:
        fp = dict(fingerprint)
        validate_fingerprint(fp, eff_softcap, eff_temperature, m_dtype)
    uniq = unique_examples(examples, int(weight.shape[0]))
    if not uniq and not allow_empty:
        raise ValueError("examples is empty: there is nothing to cache (allow_empty=True "
                         "accepts it)")
    computer = Computer(model, eff_softcap, eff_temperature, per_token, verify_head)
    settings = dict(batch_tokens=batch_tokens, rows_per_shard=rows_per_shard, per_token=per_token)

    with writer_lock(path, rank, world, inited, lock_timeout, on_lock_wait) as read_only:
        if read_only is not None:
            return _use_read_only(cls, path, fp, uniq, per_token, read_only)
        if overwrite and world > 1 and not inited and (path / MANIFEST).exists():
            raise ValueError("overwrite=True with an explicit rank / world_size needs "
                             "torch.distributed (rank 0 clears the directory); clear it first")
        args = (path, mode, uniq, settings)
        if rank == 0 and (world == 1 or inited):  # rank 0 alone changes what is there
            if overwrite:
                wipe(path)
            man = _checked_manifest(path, fp, per_token)
            if repair and man is not None:
                if man["builds"] and not man["builds"][-1]["complete"]:
                    man = seal_locked(path, man)
                if load_rows(path, complete_part(man, path)[1], per_token,
                             skip_corrupt=True)[1]:
                    man, dropped = compact_locked(path, rows_per_shard, drop_corrupt=True)
                    warnings.warn(f"repair: dropped the damaged shard(s) {dropped} of {path}; "
                                  "their rows are recomputed", RuntimeWarning, stacklevel=3)
            planned = _plan_for(man, *args)
            builds = man["builds"] if man is not None else []
            if builds and not builds[-1]["complete"] and \
                    builds[-1]["plan_sha256"] != planned[2].sha256:
                # an interrupted run of other rows: keep what it saved as a finished build
                man = seal_locked(path, man)
                planned = _plan_for(man, *args)
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
                last = _build_single(path, man, fp, plan, base_shards, complete, computer,
                                     progress, checkpoint_seconds)
        else:
            last = _build_part(path, rank, world, fp, plan, [b["plan_sha256"] for b in complete],
                               gen, computer, progress, checkpoint_seconds)
            if not inited:
                return None
            torch.distributed.barrier()
            if rank == 0:
                cls.merge(path, world)
        if rank == 0 and (world == 1 or inited):  # (explicit ranks hold only a part's lock)
            after = store.read_manifest(path)
            if compact is True or (compact == "auto" and _should_compact(after, rows_per_shard)):
                compact_locked(path, rows_per_shard)
        if inited and world > 1:
            torch.distributed.barrier()
        elif world > 1 and rank != 0:
            return None
        cache = cls.open(path, expect=fp)
        cache.last_build = last
        return cache


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
    complete, base = complete_part(man, path) if man is not None else ([], [])
    n_base = sum(b["num_shards"] for b in complete)
    per_token = settings["per_token"]
    if mode == "ensure":
        have = _keys_of(load_rows(path, base, per_token)[0])
        return complete, base, make_plan([ex for ex in uniq if ex.key_bytes not in have],
                                         first_shard=n_base, **settings)
    plan = make_plan(uniq, first_shard=0, **settings)
    if not builds or (len(builds) == 1 and builds[0]["plan_sha256"] == plan.sha256):
        return [], [], plan
    have = (_keys_of(load_rows(path, base, per_token)[0])
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
