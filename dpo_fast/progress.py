"""The one display of a reference-cache build's progress (:class:`dpo_fast.refcache.BuildProgress`
events): the status text (tokens/s and ETA) and a tqdm bar over the examples. ``dpo-fast
precompute`` and the trainer's progress callback both draw it; it imports neither of them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, TextIO

if TYPE_CHECKING:
    from .refcache import BuildProgress


def format_duration(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour on); ``--:--`` for an unknown (nan / inf) time."""
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def build_status(p: BuildProgress) -> str:
    """``"<rate> tok/s | ETA <mm:ss>"`` of progress ``p``: this run's computed tokens over its
    elapsed time, and the remaining tokens at that rate."""
    rate = p.tokens_computed / p.elapsed_s if p.elapsed_s > 0 else 0.0
    left = p.tokens_total - p.tokens_done
    eta = left / rate if rate > 0 else (0.0 if left == 0 else float("nan"))
    return f"{rate:,.0f} tok/s | ETA {format_duration(eta)}"


class ProgressBar:
    """A tqdm bar for a build's ``progress`` callback
    (:meth:`dpo_fast.RefLogProbCache.build`).

    Shows ``<label> [bar] done/total examples | <build_status>``. Redrawn at most every
    ``min_interval`` seconds on a terminal, every ``log_interval`` seconds otherwise;
    :meth:`close` ends the bar, :meth:`finish` ends it and writes one summary line.

    Args:
        stream: where to write (default ``sys.stderr``).
        total: all examples of the run; those outside the build's plan (already cached)
            count as done. Default: the plan's rows.
        min_interval / log_interval: refresh limits in seconds (terminal / not a terminal).
        width: characters of the bar itself.
        label: the first word of the line.
    """

    def __init__(self, stream: Optional[TextIO] = None, *, total: Optional[int] = None,
                 min_interval: float = 0.1, log_interval: float = 10.0, width: int = 28,
                 label: str = "precompute"):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.interval = min_interval if self.tty else log_interval
        self.width = width
        self.label = label
        self.bar = None
        self.last: Optional[BuildProgress] = None

    @property
    def drawn(self) -> bool:
        """Whether the bar is on the stream (its line then needs ending before more text)."""
        return self.bar is not None

    def __call__(self, p: BuildProgress) -> None:
        from tqdm.auto import tqdm

        self.last = p
        total = p.rows_total if self.total is None else self.total
        if self.bar is None:
            # The status rides in tqdm's description field (a postfix would get a ", ").
            self.bar = tqdm(total=total, file=self.stream, desc=build_status(p), ascii=".#",
                            mininterval=self.interval, miniters=1, ncols=1000, leave=True,
                            bar_format=f"{self.label} [{{bar:{self.width}}}] {{n}}/{{total}} "
                                       "examples | {desc}")
        done = total - (p.rows_total - p.rows_done)
        self.bar.set_description_str(build_status(p), refresh=False)
        self.bar.update(done - self.bar.n)
        if p.event == "done":
            self.bar.refresh()

    def close(self) -> None:
        """Ends the bar's line (if drawn)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, summary: str) -> None:
        """Closes the bar and writes ``summary`` on its own line."""
        self.close()
        self.stream.write(summary + "\n")
        self.stream.flush()
