"""Progress of a build: the :class:`BuildProgress` events and the counters behind them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Set, Tuple

from .plan import Plan


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


class Tracker:
    """Progress counters of one build (or one rank's part) and the callback.

    ``mine`` are the plan-relative shards this process computes, ``done`` those of them an
    earlier run finished, ``segs`` per unfinished shard its saved segments ``(record, part)``
    (see :func:`.segments.recover`): their rows count as done and saved from the start."""

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

    def computed(self, rows: int, tokens: int) -> None:
        """Counts a batch of ``rows`` rows and ``tokens`` tokens just computed."""
        self.rows_done += rows
        self.rows_computed += rows
        self.tokens_done += tokens
        self.tokens_computed += tokens

    def snapshot(self, event: str) -> BuildProgress:
        return BuildProgress(event, self.rows_done, self.rows_total, self.tokens_done,
                             self.tokens_total, self.shards_done, self.shards_total,
                             self.rows_computed, self.tokens_computed,
                             time.perf_counter() - self.t0, self.rows_saved)

    def emit(self, event: str) -> None:
        if self.cb is not None:
            self.cb(self.snapshot(event))
