"""One-line error texts: how the data reader, the model loader and the command line quote an
exception from a library (transformers, datasets) inside their own message."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
