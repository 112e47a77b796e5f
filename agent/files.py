"""Files written whole or not at all: a temporary file beside the target, fsynced, renamed over
it, and the directory fsynced, so that a crash leaves the old file or the new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Content = bytes | str | Callable[[BinaryIO], None]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_beside(path: Path, content: Content, mode: int) -> Path:
    """A new temporary file beside PATH holding ``content`` (bytes, text, or a function that
    writes into the open file), with ``mode`` (0600 until then, never wider), fsynced."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace(path: Path, content: Content, mode: int = 0o600) -> None:
    """Replace PATH with ``content`` atomically and durably."""
    tmp = temp_beside(path, content, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
