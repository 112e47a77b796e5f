"""qemu-img info, confined: an explicit format, resource limits, and its answer checked.

:func:`inspect` is the gate every image file passes before hvagent keeps or uses it: our own
header check first (:mod:`agent.qcow2`), so qemu-img never opens a file that names a backing
or data file, then qemu-img's view, which must agree with ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent import proc, qcow2
from agent.errors import ImageRefused

QEMU_IMG = "qemu-img"
TIMEOUT = 60.0


def qemu_img_info(path: Path, *, cpu_seconds: int = 30, address_space: int = 1 << 30,
                  shown: str | Path | None = None) -> dict[str, Any]:
    """``qemu-img info`` of a qcow2 file, refused if it has a backing file, data file or encryption.

    Refusals name ``shown`` (default ``path``)."""
    name = path if shown is None else shown
    # An absolute path starts with "/", so qemu never reads it as "json:..." or "proto:...".
    target = os.path.abspath(path)
    argv = [QEMU_IMG, "info", "--output=json", "-f", "qcow2", "--force-share", "--", target]
    try:
        result = proc.run(argv, timeout=TIMEOUT, cpu_seconds=cpu_seconds, address_space=address_space)
    except proc.ProcessError as e:
        raise ImageRefused(f"{name}: qemu-img cannot read it as qcow2 ({proc.describe_status(e.returncode)}"
                           f"{': ' + proc.last_line(e.stderr) if e.stderr.strip() else ''})") from e
    try:
        info = json.loads(result.stdout)
    except ValueError as e:
        raise ImageRefused(f"{name}: qemu-img info printed something other than JSON ({e})") from e
    if not isinstance(info, dict):
        raise ImageRefused(f"{name}: qemu-img info printed {type(info).__name__}, not an object")
    _check(name, info)
    return info


def _check(name: str | Path, info: dict[str, Any]) -> None:
    fmt = info.get("format")
    if fmt != "qcow2":
        raise ImageRefused(f"{name}: qemu-img reports format {fmt!r}, not qcow2")
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        if key in info:
            raise ImageRefused(f"{name}: has a backing file ({key} {info[key]!r})")
    if info.get("encrypted") is True:
        raise ImageRefused(f"{name}: is encrypted")
    if info.get("dirty-flag") is True:
        raise ImageRefused(f"{name}: is marked dirty")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if not isinstance(data, dict):
        raise ImageRefused(f"{name}: qemu-img info has no qcow2 format-specific data")
    if "data-file" in data or data.get("data-file-raw") is True:
        raise ImageRefused(f"{name}: uses an external data file ({data.get('data-file')!r})")
    if "encrypt" in data:
        raise ImageRefused(f"{name}: is encrypted")
    if data.get("corrupt") is True:
        raise ImageRefused(f"{name}: is marked corrupt")


def virtual_size(info: dict[str, Any]) -> int:
    """The virtual size qemu-img reports, in bytes."""
    size = info.get("virtual-size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ImageRefused(f"{info.get('filename', 'image')}: qemu-img reports no valid virtual size ({size!r})")
    return size


def inspect(path: Path, limit_bytes: int, shown: str | Path | None = None) -> tuple[qcow2.Qcow2Header, dict[str, Any]]:
    """Check ``path`` with our header reader, then qemu-img; both sizes must agree and fit the limit.

    Refusals name ``shown`` (default ``path``): the user's file when ``path`` is a private copy."""
    name = path if shown is None else shown
    header = qcow2.read_header(path, shown=name)
    qcow2.check_virtual_size(header, limit_bytes, name)  # before qemu-img gets to see the file
    info = qemu_img_info(path, shown=name)
    size = virtual_size(info)
    if size != header.size:  # so qemu-img's size is within the limit too
        raise ImageRefused(f"{name}: qemu-img reports virtual size {size}, the header says {header.size}")
    return header, info
