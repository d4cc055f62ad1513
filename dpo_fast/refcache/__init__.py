"""Reference log-probs computed once, cached on disk, looked up by content key.

DPO needs, for every preference pair, the reference model's log-probs of the chosen and the
rejected response. :class:`RefLogProbCache` computes them once (forward only, through the
fused log-prob op: the model body gives the last hidden states and
:func:`dpo_fast.linear_logprobs` turns them into per-token log-probs without ever building
the [tokens x vocab] logits), stores them in a directory, and serves them by the examples'
content keys (:attr:`dpo_fast.PreferenceExample.key`), so training holds one model and a
shuffled or filtered dataset still finds its values.

What a value is (``LOGPROB_VERSION`` 1): for a sequence ``prompt + response`` the sum over the
response tokens of ``log_softmax(z_t)[token]`` with ``z_t = h_t W^T + b`` (then softcap, then
temperature; see :func:`dpo_fast.linear_logprobs`), where ``h_t`` is the model body's last
hidden state at the position before the token. Per-token values are fp32 (fp32 accumulation
whatever the model dtype); their sum is taken exactly (``math.fsum``) and rounded to float32.
The model runs in eval mode under ``torch.inference_mode``.

On-disk format (directory ``path``)::

    manifest.json              format, fingerprint, builds, shard list, own SHA-256 (JSON)
    shard-00000.safetensors    rows of the cache (safetensors, no pickle)
    shard-00001.safetensors    (after a compaction: shard-00000-g1.safetensors, ...)
    seg-00002-00000.safetensors  a checkpoint of the shard being computed (while building)
    .lock, .lock-owner.json    the writer lock and who holds it

Each shard holds, for its ``n`` rows: ``keys`` uint8 [n, 16] (content keys),
``chosen_logps`` / ``rejected_logps`` float32 [n], ``chosen_lengths`` / ``rejected_lengths``
int32 [n] (response tokens), and with ``per_token=True`` also ``token_logps`` float32 [T] (row
i's chosen tokens, then its rejected tokens, at ``token_offsets[i]:token_offsets[i+1]``) and
``token_offsets`` int64 [n+1]. The manifest lists every shard with its row count, byte size
and SHA-256, each build (one per ``build``, or per ``ensure`` that appended rows; one after a
compaction) with the hash of its plan, and carries a SHA-256 of its own contents.

Crash safety: every file is written to a temporary name in the same directory, fsync'd,
renamed over its final name, and the directory fsync'd. A file is listed in the manifest only
after its rename, so at any kill point the manifest lists only complete, durable files. The
plan (which rows go into which batch and shard) depends only on the set of examples and the
settings. While a shard is computed, its rows so far are saved as a segment every
``checkpoint_seconds`` (default 30 s), so a kill loses at most that much work; a finished
shard replaces its segments. A re-run keeps what the manifest lists (after checking sizes,
SHA-256s and keys), deletes temporary and unlisted files, and computes the rest; the finished
directory is byte-identical to an uninterrupted build.

Concurrency: writers (build, ensure, merge, compact) hold an OS file lock on the directory
for their whole run, so a second writer waits (or, with ``lock_timeout``, fails naming the
holder); the OS releases the lock of a killed process. Readers (:meth:`RefLogProbCache.open`)
take no lock: they see one manifest's state and re-read if a writer replaced it meanwhile.
A cache on a read-only file system can be opened, and an ensure that has nothing to add
succeeds there without writing.

Distributed build: with ``rank`` / ``world_size`` (or an initialized ``torch.distributed``)
rank r computes the plan's shards ``i`` with ``i % world_size == r`` into ``path/part-<r>/``
(same protocol, its own manifest); :meth:`RefLogProbCache.merge` (rank 0, after a barrier)
checks that every part used the same plan and fingerprint, moves the shards into ``path`` and
writes the manifest. The result is byte-identical to a single-process build (for the same
numerics on each rank: same device type and thread count). Under torch.distributed rank 0
holds the directory's lock for the whole job.
"""

from .progress import BuildProgress
from .cache import RefLogProbCache
from .fingerprint import FINGERPRINT_FIELDS, WEIGHT_METHODS, fingerprint, tokenizer_hash
from .store import (
    FORMAT,
    FORMAT_VERSION,
    KEY_DEFINITION,
    LOGPROB_VERSION,
    MANIFEST,
    CacheLockedError,
    CorruptCacheError,
    FingerprintMismatchError,
    MissingRowsError,
    RefCacheError,
    hold_lock,
    lock_owner,
)

__all__ = [
    "RefLogProbCache",
    "BuildProgress",
    "fingerprint",
    "tokenizer_hash",
    "hold_lock",
    "lock_owner",
    "RefCacheError",
    "CorruptCacheError",
    "FingerprintMismatchError",
    "MissingRowsError",
    "CacheLockedError",
    "FINGERPRINT_FIELDS",
    "WEIGHT_METHODS",
    "LOGPROB_VERSION",
    "FORMAT",
    "FORMAT_VERSION",
    "KEY_DEFINITION",
    "MANIFEST",
]
