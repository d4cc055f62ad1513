"""Crash-safe file writes shared by the reference cache and the trainer.

Every file is written under a temporary name in its final directory, flushed and fsync'd,
renamed over its final name, and the directory fsync'd: a reader (or a resumed run) only ever
sees whole files, and a kill at any point leaves either the old or the new file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

#: Marks a temporary file (``.<name>.tmp-<pid>-<random>``); such files are never read.
TMP_MARK = ".tmp-"


def fsync_dir(d: Path) -> None:
    """fsync a directory, so the renames inside it are durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path``: temp name in the same dir, fsync, rename, fsync the dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented, key-sorted UTF-8 JSON with a final newline."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
