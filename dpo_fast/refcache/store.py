"""The reference cache's files: names, errors, atomic writes, manifest, shards, the writer lock.

Everything that touches the disk goes through here. Every file is written under a temporary
name in its final directory, flushed and fsync'd, renamed over its final name and the directory
fsync'd (:func:`atomic_write`), so a reader or a resumed build only ever sees whole files. The
manifest carries a SHA-256 of its own contents (``manifest_sha256``), so a damaged manifest is
told apart from a damaged shard. Writers exclude each other with an OS file lock on the
directory (:func:`hold_lock`); readers take no lock (they retry if a writer replaced what they
were reading, see :meth:`dpo_fast.RefLogProbCache.open`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..data import KEY_BYTES
from ..fileio import TMP_MARK, atomic_write, fsync_dir, json_bytes  # noqa: F401 (re-exported)

LOGPROB_VERSION = 1
FORMAT = "dpo_fast.refcache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
LOCK_OWNER = ".lock-owner.json"
KEY_DEFINITION = ("first 16 bytes of SHA-256(b'dpo_fast/pref/v1\\0' + uint64-LE lengths of "
                  "prompt, chosen, rejected + their int32-LE ids)")
PART_NAME = "part-{:05d}"
SHARD_TENSORS = ("keys", "chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")
TOKEN_TENSORS = ("token_logps", "token_offsets")
# What a manifest may name: shard-<index>[-g<generation>] and seg-<index>-<first batch>[-g<gen>].
_DATA_FILE = re.compile(r"^(?:shard-\d{5,}|seg-\d{5,}-\d{5,})(?:-g\d+)?\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Errors that mean "this directory cannot be written" (not "something went wrong").
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def shard_name(index: int, generation: int = 0) -> str:
    """File name of shard ``index``; compacted generations (> 0) carry ``-g<generation>``."""
    return f"shard-{index:05d}" + (f"-g{generation}" if generation else "") + ".safetensors"


def segment_name(index: int, first_batch: int, generation: int = 0) -> str:
    """File name of a checkpoint segment of shard ``index`` starting at its batch
    ``first_batch``."""
    return (f"seg-{index:05d}-{first_batch:05d}" + (f"-g{generation}" if generation else "")
            + ".safetensors")


# ----------------------------------------------------------------------------- errors


class RefCacheError(RuntimeError):
    """A reference cache cannot be built or opened as asked.

    ``message`` says what is wrong; ``hint`` how to recover from Python and ``cli_hint`` from
    the ``dpo-fast`` command line (each None if there is nothing to add). ``str(e)`` is the
    message and the Python hint.
    """

    def __init__(self, message: str, *, hint: Optional[str] = None,
                 cli_hint: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.cli_hint = cli_hint if cli_hint is not None else hint

    def __str__(self):
        return self.message + (f"\n{self.hint}" if self.hint else "")


class CorruptCacheError(RefCacheError):
    """A shard or the manifest on disk does not match what was recorded."""


class FingerprintMismatchError(RefCacheError):
    """The cache was built with different settings. ``differences`` maps each differing field
    to ``(cache value, expected value)``."""

    def __init__(self, message: str, differences: Dict[str, Tuple[Any, Any]], **kw):
        super().__init__(message, **kw)
        self.differences = differences


class CacheLockedError(RefCacheError):
    """Another process holds the cache directory's writer lock. ``owner`` describes it."""

    def __init__(self, message: str, owner: str, **kw):
        super().__init__(message, **kw)
        self.owner = owner


class MissingRowsError(KeyError):
    """Keys looked up that the cache does not hold. ``missing`` lists them (hex)."""

    def __init__(self, message: str, missing: List[str]):
        super().__init__(message)
        self.message = message
        self.missing = missing

    def __str__(self):  # KeyError would print the repr of the message
        return self.message


_CORRUPT_CLI_HINT = ("Rerun the same `dpo-fast precompute` command with --repair to recompute "
                     "the damaged rows, or with --overwrite to rebuild the whole cache.")
_CORRUPT_HINT = ("RefLogProbCache.ensure(..., repair=True) recomputes the damaged rows; "
                 "overwrite=True rebuilds the whole cache.")
_MANIFEST_CLI_HINT = ("The manifest cannot be rebuilt from the shards (it holds the "
                      "fingerprint): rebuild the cache with --overwrite, or restore manifest.json "
                      "from a copy.")
_MANIFEST_HINT = ("The manifest cannot be rebuilt from the shards (it holds the fingerprint): "
                  "rebuild with overwrite=True, or restore manifest.json from a copy.")


def corrupt_shard(message: str) -> CorruptCacheError:
    """A :class:`CorruptCacheError` for a damaged shard, with the recovery hints."""
    return CorruptCacheError(message, hint=_CORRUPT_HINT, cli_hint=_CORRUPT_CLI_HINT)


def corrupt_manifest(message: str) -> CorruptCacheError:
    """A :class:`CorruptCacheError` for a damaged manifest, with the recovery hints."""
    return CorruptCacheError(message, hint=_MANIFEST_HINT, cli_hint=_MANIFEST_CLI_HINT)


# ----------------------------------------------------------------------------- writing


def _manifest_digest(man: Dict[str, Any]) -> str:
    body = {k: v for k, v in man.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def write_manifest(d: Path, man: Dict[str, Any]) -> None:
    """Writes ``man`` as ``d/manifest.json`` (atomically), with its own SHA-256 added."""
    man["manifest_sha256"] = _manifest_digest(man)
    atomic_write(d / MANIFEST, json_bytes(man))


def remove_temps(d: Path) -> None:
    """Deletes temporary files (``.<name>.tmp-*``) left in ``d`` by killed writers."""
    for f in d.iterdir():
        if f.name.startswith(".") and TMP_MARK in f.name and f.is_file():
            f.unlink(missing_ok=True)


def remove_unlisted(d: Path, listed: Iterable[str]) -> None:
    """Deletes shard and segment files in ``d`` that ``listed`` (file names) does not name."""
    keep = set(listed)
    for f in d.iterdir():
        if _DATA_FILE.match(f.name) and f.name not in keep and f.is_file():
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading


def parse_manifest(raw: bytes, path: Path, what: str = "reference cache manifest"
                   ) -> Dict[str, Any]:
    """Parses and checks a manifest's bytes (format, version, own SHA-256, file records)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt_manifest(f"{path}: not valid JSON ({e}); the {what} is damaged") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise corrupt_manifest(f"{path}: not a {FORMAT} manifest")
    if obj.get("format_version") != FORMAT_VERSION:
        raise RefCacheError(f"{path}: format version {obj.get('format_version')!r}; this "
                            f"dpo_fast reads version {FORMAT_VERSION}")
    want = obj.get("manifest_sha256")
    if want is not None and want != _manifest_digest(obj):
        raise corrupt_manifest(f"{path}: the manifest's own SHA-256 does not match its "
                               "contents: manifest.json was edited or damaged (the shards "
                               "were not checked)")
    for field in ("shards", "segments"):
        recs = obj.get(field, [])
        if not isinstance(recs, list):
            raise corrupt_manifest(f"{path}: {field!r} is not a list")
        for i, rec in enumerate(recs):
            _check_record(rec, f"{path}: {field}[{i}]", field == "segments")
    return obj


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_record(rec: Any, where: str, segment: bool) -> None:
    ok = (isinstance(rec, dict) and isinstance(rec.get("file"), str)
          and _DATA_FILE.match(rec["file"]) is not None
          and isinstance(rec.get("sha256"), str) and _SHA256.match(rec["sha256"]) is not None
          and all(_count(rec.get(k)) for k in ("rows", "bytes", "shard" if segment else "index")))
    if ok and segment:
        b = rec.get("batches")
        ok = isinstance(b, list) and len(b) == 2 and all(_count(x) for x in b)
    if not ok:
        raise corrupt_manifest(f"{where} is not a valid file record ({rec!r}): the manifest "
                               "is damaged")


def read_json(path: Path, what: str) -> Dict[str, Any]:
    """Reads and checks the manifest at ``path`` (FileNotFoundError naming ``what``)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    return parse_manifest(raw, path, what)


def read_manifest(d: Path) -> Optional[Dict[str, Any]]:
    """The checked manifest of the cache directory ``d``, or None if it has none."""
    m = d / MANIFEST
    return read_json(m, "reference cache manifest") if m.exists() else None


def read_shard(d: Path, rec: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Reads, verifies (size, SHA-256, tensors) and decodes the shard or segment ``rec``."""
    from safetensors.numpy import load

    f = d / rec["file"]
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        raise corrupt_shard(f"shard {f} is listed in the manifest but missing") from None
    if len(data) != rec["bytes"]:
        raise corrupt_shard(f"shard {f} has {len(data)} bytes, the manifest says "
                            f"{rec['bytes']} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec["sha256"]:
        raise corrupt_shard(f"shard {f}: SHA-256 {digest} does not match the manifest's "
                            f"{rec['sha256']} (the file is corrupted)")
    try:
        arrays = load(data)
    except Exception as e:  # a valid hash of an invalid file: written by something else
        raise corrupt_shard(f"shard {f}: not a readable safetensors file ({e})") from None
    n = rec["rows"]
    shapes = {"keys": (n, KEY_BYTES), "chosen_logps": (n,), "rejected_logps": (n,),
              "chosen_lengths": (n,), "rejected_lengths": (n,)}
    if "token_logps" in arrays:
        shapes["token_offsets"] = (n + 1,)
    for name, shape in shapes.items():
        if name not in arrays or arrays[name].shape != shape:
            got = arrays[name].shape if name in arrays else "missing"
            raise corrupt_shard(f"shard {f}: tensor {name!r} is {got}, expected {shape}")
    return arrays


def load_rows(path: Path, shards: List[Dict[str, Any]], per_token: bool, *,
              skip_corrupt: bool = False):
    """Reads (and verifies) ``shards``: ``(parts, bad)`` where ``parts`` are the shards'
    arrays in order and ``bad`` the records of corrupt shards (only with ``skip_corrupt``;
    otherwise the first one raises)."""
    parts, bad = [], []
    for rec in shards:
        try:
            a = read_shard(path, rec)
        except CorruptCacheError:
            if not skip_corrupt:
                raise
            bad.append(rec)
            continue
        if per_token and "token_logps" not in a:
            raise corrupt_shard(f"shard {path / rec['file']}: per-token cache without "
                                "'token_logps'")
        parts.append(a)
    return parts, bad


# ----------------------------------------------------------------------------- manifest contents


def new_manifest(fp: Dict[str, Any], per_token: bool, generation: int = 0) -> Dict[str, Any]:
    """An empty (complete) cache manifest with fingerprint ``fp``."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp,
            "per_token": per_token, "key": KEY_DEFINITION, "logprob_version": LOGPROB_VERSION,
            "builds": [], "shards": [], "segments": [], "generation": generation,
            "complete": True}


def complete_part(man: Dict[str, Any], where: Path) -> Tuple[List[Dict[str, Any]],
                                                             List[Dict[str, Any]]]:
    """(completed builds, their shards) of a manifest: what a reader may use."""
    builds = man["builds"]
    if any(not b["complete"] for b in builds[:-1]):
        raise corrupt_manifest(f"{where / MANIFEST}: only the last build may be incomplete")
    done = [b for b in builds if b["complete"]]
    n = sum(b["num_shards"] for b in done)
    return done, [s for s in man["shards"] if s["index"] < n]


# ----------------------------------------------------------------------------- shard bytes


def encode_shard(parts: List[Dict[str, Any]], index: int, per_token: bool,
                 segment: Optional[Tuple[int, int]] = None) -> Tuple[bytes, int]:
    """safetensors bytes of one shard (or, with ``segment=(first, end)`` batches, one
    checkpoint segment of it) from its batches' results, and its row count.

    A part is a dict of row arrays (:data:`SHARD_TENSORS`) and, with ``per_token``, a list
    ``token_logps`` of each row's float32 values (chosen tokens, then rejected tokens)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(np.concatenate([p[k] for p in parts]))
              for k in SHARD_TENSORS}
    n = arrays["keys"].shape[0]
    if per_token:
        rows = [t for p in parts for t in p["token_logps"]]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([t.size for t in rows])
        arrays["token_logps"] = np.ascontiguousarray(
            np.concatenate(rows) if rows else np.zeros(0), dtype=np.float32)
        arrays["token_offsets"] = offsets
    info = {"format_version": FORMAT_VERSION, "shard": index, "logprob_version": LOGPROB_VERSION}
    if segment is not None:
        info["segment_batches"] = list(segment)
    # one metadata entry: safetensors writes the metadata map in hash order, so several
    # entries would make the bytes differ from run to run
    return save(arrays, metadata={FORMAT: json.dumps(info, sort_keys=True)}), n


def part_from_arrays(arrays: Dict[str, np.ndarray], per_token: bool,
                     rows: Optional[slice] = None) -> Dict[str, Any]:
    """The part (see :func:`encode_shard`) holding the rows ``rows`` (default all) of a read
    shard: re-encoding it gives the same values bit for bit."""
    n = arrays["keys"].shape[0]
    sl = rows if rows is not None else slice(0, n)
    part: Dict[str, Any] = {k: arrays[k][sl] for k in SHARD_TENSORS}
    if per_token:
        vals, offs = arrays["token_logps"], arrays["token_offsets"]
        part["token_logps"] = [vals[offs[i]:offs[i + 1]] for i in range(*sl.indices(n))]
    return part


# ----------------------------------------------------------------------------- the lock


class _Held:
    def __init__(self, lock):
        self.lock = lock
        self.count = 1


_held: Dict[Tuple[str, int], _Held] = {}
_held_guard = threading.Lock()


def lock_owner(d: Path) -> str:
    """Who holds (or last held) the writer lock of ``d``, in words."""
    try:
        info = json.loads((d / LOCK_OWNER).read_text(encoding="utf-8"))
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (no owner record)"
    alive = ""
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = ", no longer running"
        except PermissionError:
            pass
    cmd = str(info.get("command", ""))
    cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
    return (f"pid {pid} on {host}{alive} (since {info.get('since', '?')}"
            + (f": {cmd}" if cmd else "") + ")")


def _write_owner(d: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""}
    atomic_write(d / LOCK_OWNER, json_bytes(info))


@contextlib.contextmanager
def hold_lock(d: Path, timeout: Optional[float] = None,
              on_wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Holds the writer lock of the cache directory ``d`` (which must exist).

    An OS file lock (``filelock``: ``flock`` on POSIX) on ``d/.lock``: the OS drops it when the
    holder exits or is killed, so a dead writer never blocks the next. Re-entrant in the
    holding thread. The holder writes its pid, host, start time and command to
    ``d/.lock-owner.json`` for the messages of those who wait.

    Args:
        timeout: seconds to wait for another holder; None waits as long as it takes, 0 does
            not wait.
        on_wait: called once with a message naming the holder if the lock is busy (default:
            a ``RuntimeWarning`` with that message).

    Raises:
        CacheLockedError when ``timeout`` passes; OSError when ``d/.lock`` cannot be created
        (e.g. a read-only file system: ``errno`` in :data:`READ_ONLY_ERRNOS`).
    """
    from filelock import FileLock, Timeout

    key = (os.path.realpath(d), threading.get_ident())
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            held.count += 1
    if held is None:
        lock = FileLock(str(d / LOCK_FILE), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            owner = lock_owner(d)
            if timeout is not None and timeout <= 0:
                raise CacheLockedError(
                    f"the reference cache at {d} is locked by another writer: {owner}", owner,
                    hint="Wait for it to finish (lock_timeout=None waits), or use another "
                         "directory.",
                    cli_hint="Wait for it to finish (drop --no-wait to wait), or use another "
                             "--out.") from None
            msg = f"waiting for the reference cache at {d}: another writer holds it, {owner}"
            if on_wait is not None:
                on_wait(msg)
            else:
                warnings.warn(msg, RuntimeWarning, stacklevel=4)
            t0 = time.monotonic()
            try:
                lock.acquire(timeout=-1 if timeout is None else timeout)
            except Timeout:
                owner = lock_owner(d)
                raise CacheLockedError(
                    f"the reference cache at {d} is still locked after {time.monotonic() - t0:.0f}"
                    f" s: {owner}", owner) from None
        try:
            _write_owner(d)
        except BaseException:
            lock.release()
            raise
        held = _Held(lock)
        with _held_guard:
            _held[key] = held
    try:
        yield
    finally:
        with _held_guard:
            held.count -= 1
            last = held.count == 0
            if last:
                del _held[key]
        if last:
            with contextlib.suppress(OSError):
                (d / LOCK_OWNER).unlink()
            held.lock.release()


def is_read_only_error(e: BaseException) -> bool:
    """True for an OSError that means the place cannot be written (read-only file system,
    no permission)."""
    return isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS
