"""The command line's error type and the one map from an error to its message and exit
status: 1 the run failed, 2 a bad command line or config, 130 interrupted (Ctrl-C)."""

from __future__ import annotations

from typing import Tuple

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A problem a command reports in one line, exiting with ``code`` (:data:`EXIT_ERROR`,
    or :data:`EXIT_USAGE` for a bad command line or config)."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def error_message(e: Exception) -> Tuple[str, int]:
    """``(message, exit status)`` of an error that ended a command: a :class:`CliError` with
    its code; the errors of the library (bad data, cache, assets, model, trainer) in their
    own words with status 1; anything else as "unexpected ..." with status 1."""
    from ..assets import AssetMissingError
    from ..refcache import RefCacheError
    from ..train import CheckpointError, TrainingError

    if isinstance(e, CliError):
        return str(e), e.code
    if isinstance(e, RefCacheError):
        return e.message + (f"\n{e.cli_hint}" if e.cli_hint else ""), EXIT_ERROR
    if isinstance(e, (ValueError, FileNotFoundError, OSError, ImportError, AssetMissingError,
                      TrainingError, CheckpointError)):
        return str(e), EXIT_ERROR
    return f"unexpected {type(e).__name__}: {e} (--debug shows the traceback)", EXIT_ERROR
