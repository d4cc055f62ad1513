"""The build plan: which rows go into which forward batch and which shard.

The plan depends only on the set of examples and the settings, never on where a run resumed
or how long it ran, so a resumed build computes exactly the batches an uninterrupted one would
(same padding, same numbers) and writes the same shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Tuple

from ..data import PreferenceExample
from .store import LOGPROB_VERSION


@dataclass
class Plan:
    """Deterministic split of the rows to compute: ``examples`` (unique, sorted by their
    longer sequence, longest first, then by key), shards of ``rows_per_shard`` consecutive
    rows, and within each shard batches of consecutive rows whose padded size (rows x 2 x
    longest sequence) fits ``batch_tokens`` (a longer single row is a batch of its own).
    Longest first: a batch too large for the device fails at the start, not hours in."""

    examples: List[PreferenceExample]
    shards: List[List[Tuple[int, int]]]  # per shard: [start, end) row ranges of its batches
    first_shard: int
    batch_tokens: int
    rows_per_shard: int
    per_token: bool
    sha256: str

    def shard_rows(self, s: int) -> Tuple[int, int]:
        return self.shards[s][0][0], self.shards[s][-1][1]

    def shard_tokens(self, s: int) -> int:
        a, b = self.shard_rows(s)
        return sum(ex.num_tokens for ex in self.examples[a:b])

    def batch_keys(self, s: int, first: int, end: int) -> bytes:
        """The keys (concatenated bytes) of batches ``[first, end)`` of shard ``s``."""
        a, b = self.shards[s][first][0], self.shards[s][end - 1][1]
        return b"".join(ex.key_bytes for ex in self.examples[a:b])

    def record(self, complete: bool) -> Dict[str, Any]:
        return {"plan_sha256": self.sha256, "first_shard": self.first_shard,
                "num_shards": len(self.shards), "rows": len(self.examples),
                "tokens": sum(ex.num_tokens for ex in self.examples),
                "batch_tokens": self.batch_tokens, "rows_per_shard": self.rows_per_shard,
                "complete": complete}


def make_plan(examples: List[PreferenceExample], *, batch_tokens: int, rows_per_shard: int,
              per_token: bool, first_shard: int) -> Plan:
    """The :class:`Plan` of the (unique) ``examples``."""
    exs = sorted(examples, key=lambda e: (-e.max_sequence_length, e.key_bytes))
    h = hashlib.sha256(b"dpo_fast/plan/v1\0")
    h.update(json.dumps({"batch_tokens": batch_tokens, "rows_per_shard": rows_per_shard,
                         "per_token": per_token, "first_shard": first_shard,
                         "logprob_version": LOGPROB_VERSION}, sort_keys=True).encode())
    shards = []
    for s0 in range(0, len(exs), rows_per_shard):
        s1 = min(s0 + rows_per_shard, len(exs))
        batches = []
        i = s0
        while i < s1:
            j = i + 1
            while j < s1 and (j + 1 - i) * 2 * exs[i].max_sequence_length <= batch_tokens:
                j += 1
            batches.append((i, j))
            i = j
        shards.append(batches)
        h.update(b"S")
        for a, b in batches:
            h.update(b"B")
            h.update(b"".join(e.key_bytes for e in exs[a:b]))
    return Plan(exs, shards, first_shard, batch_tokens, rows_per_shard, per_token, h.hexdigest())


def unique_examples(examples: Iterable[PreferenceExample], vocab: int) -> List[PreferenceExample]:
    """The examples with duplicates (same key) removed, first occurrence kept.

    Raises:
        ValueError naming the index of an item that is not a PreferenceExample or holds a
        token id outside ``[0, vocab)``.
    """
    uniq: Dict[bytes, PreferenceExample] = {}
    for i, ex in enumerate(examples):
        if not isinstance(ex, PreferenceExample):
            raise ValueError(f"examples[{i}] is a {type(ex).__name__}, not a PreferenceExample")
        top = max(int(ex.prompt_ids.max()), int(ex.chosen_ids.max()), int(ex.rejected_ids.max()))
        if top >= vocab:
            raise ValueError(f"examples[{i}] (key {ex.key}) has token id {top}, outside the "
                             f"model's vocabulary of {vocab}")
        uniq.setdefault(ex.key_bytes, ex)
    return list(uniq.values())
