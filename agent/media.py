"""Our own reading of installer media, before anything keeps them (invariant 7).

An ISO is hostile until checked, as a qcow2 is (agent.qcow2): it must carry ISO 9660's primary
volume descriptor (``CD001`` at byte 32769, 32 KiB + 1) and no other disk image format anywhere
this module looks: a qcow2, VMDK, VHD(X), VDI, QED or LUKS header at byte 0, a qcow2 or VMDK
header anywhere in the 32 KiB system area (where an ISO holds only zeros, or an MBR or GPT for
hybrid boot), a VHD footer in its last 512 bytes. A file that reads as two formats is refused,
as OpenStack's format inspector refuses it: QEMU or a later tool could open it as the other one.

A PXE bundle is a directory of regular files, exactly those its manifest lists (name: sha256);
its manifest's sha256 is that of the SHA256SUMS listing of those files (images/build-installer's
``bundle_sums``). Files are walked and opened without following a symbolic link, component by
component, so nothing outside the bundle is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import qcow2
from agent.errors import ImageRefused

SECTOR = 2048
SYSTEM_AREA = 16 * SECTOR          # 32 KiB the ISO 9660 format leaves to the system (boot code)
PVD = SYSTEM_AREA                  # the first volume descriptor: the primary one
MAGIC = b"CD001"
MAGIC_OFFSET = PVD + 1             # 32769
HEAD_BYTES = SYSTEM_AREA + SECTOR  # what parse_head needs: the system area and the primary descriptor
TAIL_BYTES = 512

# Formats a hypervisor opens as such, by their magic at byte 0 (named as OpenStack's inspector names them).
_AT_START: tuple[tuple[str, bytes], ...] = (
    ("qcow2", qcow2.MAGIC), ("vmdk", b"KDMV"), ("vmdk", b"# Disk DescriptorFile"), ("vhd", b"conectix"),
    ("vhdx", b"vhdxfile"), ("qed", b"QED\x00"), ("luks", b"LUKS\xba\xbe"))
_VDI_MAGIC = (0x40, b"\x7f\x10\xda\xbe")
# Headers refused anywhere in an ISO's system area: a tool that seeks to them would find a disk.
_IN_SYSTEM_AREA: tuple[tuple[str, bytes], ...] = (
    ("qcow2", qcow2.MAGIC), ("vmdk", b"KDMV"), ("vmdk", b"# Disk DescriptorFile"))


@dataclass(frozen=True)
class IsoHeader:
    volume_id: str
    volume_blocks: int
    block_size: int

    @property
    def volume_bytes(self) -> int:
        return self.volume_blocks * self.block_size


def formats_at_start(head: bytes) -> list[str]:
    """The disk image formats whose header ``head`` (a file's first bytes) starts with."""
    found = [name for name, magic in _AT_START if head.startswith(magic)]
    if head[_VDI_MAGIC[0]:_VDI_MAGIC[0] + 4] == _VDI_MAGIC[1]:
        found.append("vdi")
    return list(dict.fromkeys(found))


def foreign_formats(head: bytes, tail: bytes = b"") -> list[str]:
    """The other disk image formats an ISO's first bytes (``head``) and last 512 bytes (``tail``) show."""
    found = formats_at_start(head)
    area = head[:SYSTEM_AREA]
    found += [name for name, magic in _IN_SYSTEM_AREA if magic in area]
    if len(tail) == TAIL_BYTES and tail.startswith(b"conectix"):
        found.append("vhd")
    return list(dict.fromkeys(found))


def parse_head(head: bytes, file_size: int | None, shown: str | Path) -> IsoHeader:
    """Check an ISO's first ``HEAD_BYTES`` (all of a shorter file) before the rest is read or
    written anywhere; ``file_size`` (when known) bounds the volume it describes."""
    found = foreign_formats(head)
    if len(head) < HEAD_BYTES or head[MAGIC_OFFSET:MAGIC_OFFSET + len(MAGIC)] != MAGIC:
        what = f"; it is {found[0]}" if found else ""
        if len(head) < HEAD_BYTES:
            raise ImageRefused(f"{shown}: too short for an ISO 9660 image ({len(head)} bytes; its primary volume "
                               f"descriptor ends at byte {HEAD_BYTES}){what}")
        raise ImageRefused(f"{shown}: not an ISO 9660 image (no {MAGIC.decode()} at byte {MAGIC_OFFSET}){what}")
    if found:
        raise ImageRefused(f"{shown}: multiple formats detected (iso, {', '.join(found)}); an installer ISO is "
                           "an ISO 9660 image and nothing else")
    if head[PVD] != 1 or head[PVD + 6] != 1:
        raise ImageRefused(f"{shown}: the first volume descriptor is not a primary one "
                           f"(type {head[PVD]}, version {head[PVD + 6]}; accepted: 1, 1)")
    blocks_le, blocks_be = struct.unpack_from("<I", head, PVD + 80)[0], struct.unpack_from(">I", head, PVD + 84)[0]
    size_le, size_be = struct.unpack_from("<H", head, PVD + 128)[0], struct.unpack_from(">H", head, PVD + 130)[0]
    if blocks_le != blocks_be or size_le != size_be:
        raise ImageRefused(f"{shown}: the primary volume descriptor's both-endian sizes disagree "
                           f"({blocks_le}/{blocks_be} blocks of {size_le}/{size_be} bytes)")
    if size_le != SECTOR:
        raise ImageRefused(f"{shown}: logical block size {size_le} (accepted: {SECTOR})")
    h = IsoHeader(head[PVD + 40:PVD + 72].decode("ascii", "replace").strip(), blocks_le, size_le)
    if file_size is not None and h.volume_bytes > file_size:
        raise ImageRefused(f"{shown}: truncated: its volume is {h.volume_bytes} bytes, the file {file_size}")
    return h


def check_size(size: int, limit: int, shown: str | Path, what: str = "an installer ISO") -> None:
    if size > limit:
        raise ImageRefused(f"{shown}: {size} bytes ({qcow2.human(size)}) is larger than {what} may be: "
                           f"max_virtual_size is {limit} bytes ({qcow2.human(limit)})")


def inspect_iso(path: Path, limit: int, shown: str | Path | None = None) -> IsoHeader:
    """Check the whole ISO at ``path`` (hvagent's private copy); refusals name ``shown``."""
    name = path if shown is None else shown
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ImageRefused(f"{name}: cannot open ({e.strerror})") from e
    with _open_regular(fd, name) as (fd, st):
        check_size(st.st_size, limit, name)
        head = os.pread(fd, HEAD_BYTES, 0)
        tail = os.pread(fd, TAIL_BYTES, st.st_size - TAIL_BYTES) if st.st_size >= HEAD_BYTES else b""
    h = parse_head(head, st.st_size, name)
    if found := foreign_formats(head, tail):
        raise ImageRefused(f"{name}: multiple formats detected (iso, {', '.join(found)}); an installer ISO is "
                           "an ISO 9660 image and nothing else")
    return h


# -- PXE bundles -------------------------------------------------------------------------------
def _path_key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def listing(files: Mapping[str, str]) -> str:
    """The bundle's SHA256SUMS: ``<sha256>  <file>`` lines in path order, as images/build-installer
    writes them (``sorted`` over paths: component by component)."""
    return "".join(f"{files[name]}  {name}\n" for name in sorted(files, key=_path_key))


def listing_sha256(files: Mapping[str, str]) -> str:
    return hashlib.sha256(listing(files).encode()).hexdigest()


def scan_bundle(root: Path, files: Mapping[str, str], shown: str | Path) -> dict[str, int]:
    """Each listed file's size; refused: a symbolic link, anything not a regular file or a
    directory, a file the manifest does not list, a listed file that is missing."""
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(root):
            raise ImageRefused(f"{shown}: is a symbolic link; publish the bundle's directory itself") from e
        raise ImageRefused(f"{shown}: cannot open the bundle's directory ({e.strerror})") from e
    sizes: dict[str, int] = {}
    try:
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for entry in sorted(dirnames + filenames):
                rel = os.path.normpath(os.path.join(dirpath, entry))
                st = os.stat(entry, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise ImageRefused(f"{shown}: {rel}: is a symbolic link; a bundle holds regular files only")
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise ImageRefused(f"{shown}: {rel}: not a regular file; a bundle holds regular files only")
                if rel not in files:
                    raise ImageRefused(f"{shown}: {rel}: not listed in the manifest's files; a bundle holds "
                                       "exactly the files its manifest lists")
                sizes[rel] = st.st_size
    except OSError as e:
        raise ImageRefused(f"{shown}: cannot read the bundle ({e.strerror})") from e
    finally:
        os.close(top)
    if missing := [n for n in sorted(files, key=_path_key) if n not in sizes]:
        raise ImageRefused(f"{shown}: {missing[0]}: listed in the manifest's files, missing from the bundle"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return sizes


def open_member(root: Path, name: str, shown: str | Path) -> int:
    """A read-only descriptor of the bundle's file ``name``, opened component by component without
    following a symbolic link (one swapped in after ``scan_bundle`` is refused, not followed)."""
    *dirs, leaf = name.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags | os.O_DIRECTORY)
        try:
            for d in dirs:
                nxt = os.open(d, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nxt
            member = os.open(leaf, flags | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageRefused(f"{shown}: {name}: cannot open without following a link ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(member).st_mode):
        os.close(member)
        raise ImageRefused(f"{shown}: {name}: not a regular file; a bundle holds regular files only")
    return member


def check_member_head(head: bytes, name: str, shown: str | Path) -> None:
    """A bundle's kernel, initrd and boot file are what they say, not a disk image in disguise."""
    if found := formats_at_start(head):
        raise ImageRefused(f"{shown}: {name}: a {found[0]} header; a bundle's kernel, initrd and boot file "
                           "are not disk images")


@contextlib.contextmanager
def _open_regular(fd: int, shown: str | Path) -> Iterator[tuple[int, os.stat_result]]:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused(f"{shown}: not a regular file")
        yield fd, st
    finally:
        os.close(fd)
