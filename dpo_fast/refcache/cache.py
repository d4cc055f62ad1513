"""The opened reference cache: verified rows in memory, vectorized lookups by key."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..data import KEY_BYTES, PreferenceExample
from . import store
from .build import DEFAULT_CHECKPOINT_SECONDS, BuildOptions, run_build
from .fingerprint import allowed_fields, check_fingerprint
from .progress import BuildProgress
from .rewrite import compact_locked, merge_parts_locked
from .store import MANIFEST, CorruptCacheError, MissingRowsError, RefCacheError

# How often open() re-reads a cache that a writer replaced while it was being read.
_OPEN_ATTEMPTS = 20


def _keys_array(keys) -> np.ndarray:
    """Keys (hex strings, 16-byte bytes, PreferenceExamples, or a uint8 [B, 16] / S16 array)
    as a numpy "S16" array [B]."""
    if isinstance(keys, np.ndarray):
        if keys.dtype == np.dtype("S16"):
            return keys.reshape(-1)
        if keys.dtype == np.uint8 and keys.ndim == 2 and keys.shape[1] == KEY_BYTES:
            return np.ascontiguousarray(keys).view("S16").reshape(-1)
    if isinstance(keys, (str, bytes, PreferenceExample)):
        raise ValueError("keys must be a sequence of keys (wrap a single key in a list)")
    out = []
    for i, k in enumerate(keys):
        if isinstance(k, PreferenceExample):
            out.append(k.key_bytes)
        elif isinstance(k, str):
            try:
                b = bytes.fromhex(k)
            except ValueError:
                b = b""
            if len(b) != KEY_BYTES:
                raise ValueError(f"keys[{i}] = {k!r} is not a {2 * KEY_BYTES}-hex-digit key")
            out.append(b)
        elif isinstance(k, (bytes, bytearray)) and len(k) == KEY_BYTES:
            out.append(bytes(k))
        else:
            raise ValueError(f"keys[{i}] is a {type(k).__name__}; expected a hex key string, "
                             "16 bytes or a PreferenceExample")
    return np.array(out, dtype="S16").reshape(-1)


def _hex(k: bytes) -> str:
    """Hex of a key taken from an "S16" array (numpy strips trailing NUL bytes)."""
    return bytes(k).ljust(KEY_BYTES, b"\0").hex()


class RefLogProbCache:
    """An opened (verified) reference log-prob cache; see :mod:`dpo_fast.refcache` for the
    format.

    Create one with :meth:`build` / :meth:`ensure`, open an existing one with :meth:`open`.
    Lookups are vectorized (sorted key index + ``np.searchsorted``). The rows are held in
    memory once opened (about 45 bytes a row; per-token values 4 bytes a token).

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json``.
        last_build: :class:`BuildProgress` of the build / ensure that returned this object in
            this process ("done" event), or None.
        pending_rows: rows of an unfinished build that this object does not hold (0 unless
            a build was interrupted or is running; see :meth:`open`).
    """

    def __init__(self, path: Path, manifest: Dict[str, Any], arrays: Dict[str, np.ndarray],
                 tokens: Optional[List[Tuple[np.ndarray, np.ndarray]]]):
        self.path = path
        self.manifest = manifest
        self.last_build: Optional[BuildProgress] = None
        self.pending_rows = 0
        keys = arrays["keys"]
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        if len(self._keys) > 1 and bool((self._keys[1:] == self._keys[:-1]).any()):
            dup = self._keys[1:][self._keys[1:] == self._keys[:-1]][0]
            raise CorruptCacheError(f"{path}: key {_hex(dup)} appears in more than one row")
        self._chosen = arrays["chosen_logps"][order]
        self._rejected = arrays["rejected_logps"][order]
        self._chosen_len = arrays["chosen_lengths"][order]
        self._rejected_len = arrays["rejected_lengths"][order]
        self._row_shard = arrays["row_shard"][order]
        self._row_in_shard = arrays["row_in_shard"][order]
        self._tokens = tokens


    # -- opening ---------------------------------------------------------------------

    @staticmethod
    def _arrays(path: Path, shards: List[Dict[str, Any]], per_token: bool):
        parts, _ = store.load_rows(path, shards, per_token)
        tokens = [(a["token_logps"], a["token_offsets"]) for a in parts] if per_token else None
        for s, (a, rec) in enumerate(zip(parts, shards)):
            a["row_shard"] = np.full(rec["rows"], s, dtype=np.int32)
            a["row_in_shard"] = np.arange(rec["rows"], dtype=np.int64)
        names = store.SHARD_TENSORS + ("row_shard", "row_in_shard")
        empty = {"keys": np.zeros((0, KEY_BYTES), np.uint8),
                 "chosen_logps": np.zeros(0, np.float32),
                 "rejected_logps": np.zeros(0, np.float32),
                 "chosen_lengths": np.zeros(0, np.int32),
                 "rejected_lengths": np.zeros(0, np.int32),
                 "row_shard": np.zeros(0, np.int32), "row_in_shard": np.zeros(0, np.int64)}
        arrays = {k: (np.concatenate([p[k] for p in parts]) if parts else empty[k]) for k in names}
        arrays["keys"] = np.ascontiguousarray(arrays["keys"]).view("S16").reshape(-1)
        return arrays, tokens

    @classmethod
    def open(cls, path, expect: Optional[Dict[str, Any]] = None,
             allow_mismatch: Union[bool, Sequence[str]] = ()) -> "RefLogProbCache":
        """Opens the cache at ``path``, verifying every shard's size and SHA-256.

        Takes no lock: a writer replaces files only by atomic renames and lists a file in the
        manifest only once it is complete, so a reader sees the state of one manifest. If a
        writer replaced the manifest while the shards were being read (a compaction, an
        overwrite), the read starts again. If the last build is unfinished (interrupted, or
        another process is running it) the rows of the finished builds are opened, a
        ``RuntimeWarning`` says so and :attr:`pending_rows` counts the rest.

        Args:
            path: cache directory.
            expect: the fingerprint of this run (see :func:`fingerprint`); a cache whose
                fingerprint differs is refused with :class:`FingerprintMismatchError` naming
                each differing field and both values. None skips the check. To get it for a
                model: ``dpo_fast.refcache.fingerprint(model, tokenizer, max_length=...)``
                with the ``max_length`` and model dtype of the build (``dpo-fast
                precompute`` uses ``weights="sample"``, the default).
            allow_mismatch: expert override: True, or the names of fields allowed to differ
                (a warning lists them).

        Raises:
            FileNotFoundError (no manifest), RefCacheError (the first build is unfinished;
            ``path`` is a file), CorruptCacheError (a shard missing, truncated or with a wrong
            SHA-256, or a damaged manifest; the message names the file and says how to
            recover), FingerprintMismatchError.
        """
        path = Path(path)
        allowed_fields(allow_mismatch)
        if path.exists() and not path.is_dir():
            raise RefCacheError(f"{path} is a file, not a reference cache directory")
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                raw = (path / MANIFEST).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"no reference cache at {path} (no {MANIFEST})") from None
            man = store.parse_manifest(raw, path / MANIFEST)
            done, shards = store.complete_part(man, path)
            if man["builds"] and not done:
                raise RefCacheError(
                    f"the reference cache at {path} is incomplete (its first build is "
                    "unfinished: interrupted, or still running)",
                    hint="Run the same build / ensure again to finish it.",
                    cli_hint="Rerun the same `dpo-fast precompute` command to finish it.")
            if expect is not None:
                check_fingerprint(man["fingerprint"], expect, path, allow_mismatch)
            try:
                arrays, tokens = cls._arrays(path, shards, bool(man["per_token"]))
            except CorruptCacheError:
                try:
                    now = (path / MANIFEST).read_bytes()
                except FileNotFoundError:
                    now = None
                if now == raw:
                    raise  # the files themselves are bad
                time.sleep(min(0.05 * (attempt + 1), 0.5))  # a writer replaced them: again
                continue
            cache = cls(path, man, arrays, tokens)
            if len(done) < len(man["builds"]):
                cache.pending_rows = int(man["builds"][-1]["rows"])
                warnings.warn(f"the reference cache at {path} has an unfinished build of "
                              f"{cache.pending_rows} row(s) (interrupted, or running now); "
                              f"opened the {len(cache)} row(s) of its finished builds",
                              RuntimeWarning, stacklevel=2)
            return cache
        raise RefCacheError(f"the reference cache at {path} kept changing while it was read "
                            f"({_OPEN_ATTEMPTS} attempts): a writer is rewriting it; try again "
                            "when it is done")

    # -- lookups ---------------------------------------------------------------------

    @property
    def fingerprint(self) -> Dict[str, Any]:
        """The fingerprint the cache was built with (a copy)."""
        return dict(self.manifest["fingerprint"])

    @property
    def per_token(self) -> bool:
        return bool(self.manifest["per_token"])

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __contains__(self, key) -> bool:
        try:
            q = _keys_array([key])
        except ValueError:
            return False
        return bool(self._find(q)[1][0])

    def keys(self) -> List[str]:
        """All keys (hex), in sorted order."""
        return [_hex(k) for k in self._keys.tolist()]

    def _find(self, q: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if len(self._keys) == 0:
            return np.zeros(q.shape, np.int64), np.zeros(q.shape, bool)
        pos = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
        return pos, self._keys[pos] == q

    def _positions(self, keys) -> np.ndarray:
        q = _keys_array(keys)
        pos, found = self._find(q)
        if not bool(found.all()):
            miss = [_hex(k) for k in q[~found].tolist()]
            shown = ", ".join(miss[:5]) + (", ..." if len(miss) > 5 else "")
            raise MissingRowsError(
                f"{len(miss)} of {len(q)} key(s) are not in the reference cache at {self.path}: "
                f"{shown}. Compute them with RefLogProbCache.ensure(model, examples, path).",
                miss)
        return pos

    def lookup(self, keys, *, split: bool = False, device=None
               ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Reference log-probs of B examples.

        Args:
            keys: B keys: hex strings, 16-byte ``bytes``, :class:`PreferenceExample`s, or a
                uint8 [B, 16] / "S16" [B] numpy array (fastest).
            split: return ``(chosen [B], rejected [B])`` instead of one tensor.
            device: where to put the result (default CPU).

        Returns:
            float32 [2B] = ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` (the fused
            loss's ``ref_logps`` order), or the pair if ``split``.

        Raises:
            MissingRowsError (a KeyError) saying how many keys are missing and which (first 5).
        """
        pos = self._positions(keys)
        c = torch.from_numpy(self._chosen[pos])
        r = torch.from_numpy(self._rejected[pos])
        if split:
            return (c.to(device), r.to(device)) if device is not None else (c, r)
        out = torch.cat([c, r])
        return out.to(device) if device is not None else out

    def lengths(self, keys, *, split: bool = False, device=None
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Response token counts, int64 [2B] in :meth:`lookup`'s order (or a pair of [B])."""
        pos = self._positions(keys)
        c = torch.from_numpy(self._chosen_len[pos].astype(np.int64))
        r = torch.from_numpy(self._rejected_len[pos].astype(np.int64))
        if split:
            return (c.to(device), r.to(device)) if device is not None else (c, r)
        out = torch.cat([c, r])
        return out.to(device) if device is not None else out

    def token_logps(self, key) -> Tuple[Tensor, Tensor]:
        """Per-token reference log-probs of one example: ``(chosen [Lc], rejected [Lr])``
        float32 (needs a cache built with ``per_token=True``)."""
        if self._tokens is None:
            raise RefCacheError(f"the reference cache at {self.path} has no per-token values "
                                "(build it with per_token=True)")
        p = int(self._positions([key])[0])
        vals, offs = self._tokens[int(self._row_shard[p])]
        i = int(self._row_in_shard[p])
        row = vals[offs[i]:offs[i + 1]]
        lc = int(self._chosen_len[p])
        return torch.from_numpy(row[:lc].copy()), torch.from_numpy(row[lc:].copy())

    def __repr__(self):
        return (f"RefLogProbCache({str(self.path)!r}, rows={len(self)}, "
                f"shards={len(self.manifest['shards'])}, per_token={self.per_token})")

    # -- building --------------------------------------------------------------------

    @classmethod
    def build(cls, model, examples: Iterable[PreferenceExample], path, *,
              batch_tokens: int = 16384, fingerprint: Optional[Dict[str, Any]] = None,
              tokenizer=None, max_length: Optional[int] = None,
              dtype: Union[None, str, torch.dtype] = None, softcap: Optional[float] = None,
              temperature: float = 1.0, per_token: bool = False, rows_per_shard: int = 4096,
              progress: Optional[Callable[[BuildProgress], None]] = None,
              rank: Optional[int] = None, world_size: Optional[int] = None,
              overwrite: bool = False, verify_head: bool = True,
              checkpoint_seconds: Optional[float] = DEFAULT_CHECKPOINT_SECONDS,
              lock_timeout: Optional[float] = None,
              on_lock_wait: Optional[Callable[[str], None]] = None,
              compact: Union[bool, str] = "auto", repair: bool = False,
              allow_empty: bool = False, lockstep: bool = False
              ) -> Optional["RefLogProbCache"]:
        """Computes the reference log-probs of ``examples`` into a new cache at ``path``.

        Forward only: ``torch.inference_mode``, model in eval mode (restored after), the body
        gives [2R, T, D] hidden states, :func:`dpo_fast.linear_logprobs` the per-token
        log-probs (no logits). Duplicate examples (same key) are computed once.

        One writer at a time: the directory's writer lock is held from start to end (another
        build, ensure, merge or compaction of the same directory waits, or fails after
        ``lock_timeout``). A build killed at any point resumes where its last durable write
        left it, and the finished directory is byte-identical to an uninterrupted build.

        Args:
            model: a causal LM (``get_decoder()`` / ``base_model`` = body,
                ``get_output_embeddings()`` = head), on the device to compute on.
            examples: the :class:`PreferenceExample`s.
            path: cache directory (created if needed).
            batch_tokens: padded token budget per forward (rows x 2 x longest sequence).
            fingerprint: the run's fingerprint (:func:`fingerprint`, with tokenizer and
                max_length); default: computed from the model and ``tokenizer`` /
                ``max_length`` / the head settings. Its softcap / temperature / dtype /
                logprob_version must match what this build uses.
            tokenizer, max_length: only for the default fingerprint.
            dtype: if given, must equal the model's dtype (a check, no cast).
            softcap: logit soft-capping; None takes ``config.final_logit_softcapping``.
            temperature: logits are divided by it (after softcap).
            per_token: also store per-token log-probs.
            rows_per_shard: rows per shard file.
            progress: called with a :class:`BuildProgress` at start, after every batch,
                checkpoint and shard, and at the end.
            rank, world_size: distributed build (default: from torch.distributed if
                initialized). Each rank computes its slice into ``path/part-<rank>``; with
                torch.distributed initialized, rank 0 holds the lock, merges after a barrier
                and every rank returns the opened cache; without it this returns None and
                :meth:`merge` must be called once all ranks are done.
            overwrite: replace whatever the directory holds.
            verify_head: before the first batch, compare the fused head with the model's own
                full logits on one example (catches unsupported logit transforms).
            checkpoint_seconds: the most compute a kill may lose: the rows of the shard being
                computed are saved (as a segment) once this many seconds passed since the
                last save. None saves whole shards only; 0 after every batch.
            lock_timeout: seconds to wait for another writer of ``path``; None waits as long
                as it takes, 0 fails at once (:class:`CacheLockedError` names the holder).
            on_lock_wait: called with a message naming the holder when the lock is busy.
            compact: rewrite the cache as few whole shards at the end (:meth:`compact`):
                True, False, or "auto" (when it holds more than max(16, twice the compacted
                count) shards, e.g. after many small ensures).
            repair: drop shards whose checks fail and recompute their rows (one process).
            allow_empty: accept an empty ``examples`` (else ValueError).
            lockstep: the model is sharded over the torch.distributed processes (FSDP2:
                each layer's forward is a collective): every rank makes the same forward
                calls (a rank out of rows runs one-token forwards while others compute), and
                autograd is off by ``no_grad`` instead of inference mode. Call it on every
                rank inside the sharded root's forward.

        Returns:
            the opened cache (``last_build`` holds the final :class:`BuildProgress`).

        Raises:
            RefCacheError if ``path`` holds a cache of other examples or settings (including
            :class:`FingerprintMismatchError`), unless ``overwrite``; if ``path`` is a file or
            cannot be written while rows are missing; :class:`CacheLockedError`.
        """
        options = BuildOptions(
            batch_tokens=batch_tokens, fingerprint=fingerprint, tokenizer=tokenizer,
            max_length=max_length, dtype=dtype, softcap=softcap, temperature=temperature,
            per_token=per_token, rows_per_shard=rows_per_shard, progress=progress, rank=rank,
            world_size=world_size, overwrite=overwrite, verify_head=verify_head,
            checkpoint_seconds=checkpoint_seconds, lock_timeout=lock_timeout,
            on_lock_wait=on_lock_wait, compact=compact, repair=repair, allow_empty=allow_empty,
            lockstep=lockstep)
        return run_build(cls, "build", model, examples, path, options)

    @classmethod
    def ensure(cls, model, examples: Iterable[PreferenceExample], path, **kwargs
               ) -> Optional["RefLogProbCache"]:
        """Opens the cache at ``path`` and computes only the examples it lacks (appended as a
        new build of shards), creating the cache if absent; returns the opened cache.

        Takes :meth:`build`'s keyword arguments. The fingerprint must match the existing
        cache's (else :class:`FingerprintMismatchError`), and so must ``per_token``. An
        interrupted earlier ``ensure`` of the same rows is resumed; one of different rows is
        discarded. ``last_build.rows_computed`` says how many rows were computed. On a
        directory that cannot be written (read-only file system) it succeeds without writing
        anything if the cache already holds every example.
        """
        return run_build(cls, "ensure", model, examples, path, BuildOptions(**kwargs))

    @classmethod
    def compact(cls, path, *, rows_per_shard: int = 4096, lock_timeout: Optional[float] = None,
                on_lock_wait: Optional[Callable[[str], None]] = None) -> "RefLogProbCache":
        """Rewrites the cache at ``path`` as one build of whole shards of ``rows_per_shard``
        rows (in key order) and returns it opened.

        Every row keeps its values bit for bit; a kill at any point leaves the old or the new
        cache, both valid; readers that opened the old one keep their rows. Compacting a
        compacted cache again (same ``rows_per_shard``) writes nothing.
        """
        if not isinstance(rows_per_shard, int) or isinstance(rows_per_shard, bool) \
                or rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be an int >= 1, got {rows_per_shard!r}")
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"no reference cache at {path} (no {MANIFEST})")
        with store.hold_lock(path, lock_timeout, on_lock_wait):
            compact_locked(path, rows_per_shard)
            return cls.open(path)

    @classmethod
    def merge(cls, path, world_size: int) -> "RefLogProbCache":
        """Assembles the parts written by ``world_size`` ranks into the cache at ``path``.

        Checks that every ``part-<r>`` is complete and was made from the same plan, base
        cache and fingerprint, verifies each shard's SHA-256, moves the shards into ``path``,
        writes the manifest, and removes the part directories. Idempotent: safe to re-run
        after an interruption. Holds the cache's writer lock. Returns the opened cache.
        """
        path = Path(path)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        with store.hold_lock(path):
            merge_parts_locked(path, world_size)
            return cls.open(path)
