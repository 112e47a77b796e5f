"""Our own reading of a qcow2 header, before any tool touches the file (invariant 7).

The file is hostile: it is opened without following symlinks, must be a regular file, and
every field that could make qemu-img reach outside the file (backing file, external data
file) or work on something we did not ask for (encryption, unknown features, tables past
the end) is refused here, in plain Python, with one line naming the file and the problem.

Layout per QEMU's docs/interop/qcow2.txt; all fields are big-endian.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.errors import ImageRefused

MAGIC = b"QFI\xfb"

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # bytes 0..71
_V3 = struct.Struct(">QQQII")  # bytes 72..103
V2_HEADER_LENGTH = _V2.size  # 72
V3_HEADER_LENGTH = _V2.size + _V3.size  # 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
# The header and its extensions lie in the first cluster: these first bytes are all parse_head needs.
HEAD_BYTES = 1 << MAX_CLUSTER_BITS
# QEMU's own ceilings (block/qcow2.h): beyond them it refuses the image too.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_REFUSED_EXTENSIONS = {
    EXT_DATA_FILE: "names an external data file",
    EXT_CRYPTO: "has an encryption header (encrypted)",
    EXT_BACKING_FORMAT: "has a backing file format extension (backing files are refused)",
}


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    header_length: int
    compression_type: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def read_header(path: Path, *, file_size: int | None = None, shown: str | Path | None = None) -> Qcow2Header:
    """Read and check the header of the qcow2 image at ``path``; ImageRefused if unsafe.

    ``file_size`` bounds the table offsets; it defaults to the file's size, and a larger
    value than the file really has is ignored. Refusals name ``shown`` (default ``path``): the
    file the user gave when ``path`` is hvagent's private copy of it.
    """
    name = path if shown is None else shown
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise ImageRefused(f"{name}: is a symbolic link; give the image file itself") from e
        raise ImageRefused(f"{name}: cannot open ({e.strerror})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused(f"{name}: not a regular file")
        size = st.st_size if file_size is None else min(file_size, st.st_size)
        with open(fd, "rb", closefd=False) as f:
            return _parse(name, f, size)
    finally:
        os.close(fd)


def parse_head(head: bytes, file_size: int | None, shown: str | Path) -> Qcow2Header:
    """Check the first bytes of an image (``HEAD_BYTES`` of it, or all of a shorter file) before the
    rest is read or written anywhere. Tables are checked against ``file_size`` when it is known;
    otherwise only once the whole file is there (``read_header``)."""
    return _parse(shown, io.BytesIO(head), file_size)


def max_file_size(max_virtual_size: int) -> int:
    """The largest qcow2 file accepted for images of at most ``max_virtual_size`` bytes: the data
    plus room for its metadata (L1/L2 and refcount tables; clusters of 4 KiB or more need under
    1/128 of the virtual size) and 16 MiB of header, extensions and slack."""
    return max_virtual_size + max_virtual_size // 128 + (16 << 20)


def check_virtual_size(h: Qcow2Header, limit_bytes: int, shown: str | Path | None = None) -> None:
    """Refuse an image whose virtual size exceeds ``limit_bytes``; the refusal names ``shown``."""
    if h.size > limit_bytes:
        where = "" if shown is None else f"{shown}: "
        raise ImageRefused(f"{where}virtual size {h.size} bytes ({human(h.size)}) exceeds the limit of "
                           f"{limit_bytes} bytes ({human(limit_bytes)})")


# --------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, path: str | Path, f: BinaryIO, file_size: int | None) -> None:
        self.path, self.f, self.file_size = path, f, file_size

    def read(self, offset: int, length: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(length)

    def refuse(self, problem: str) -> ImageRefused:
        return ImageRefused(f"{self.path}: {problem}")


def _parse(path: str | Path, f: BinaryIO, file_size: int | None) -> Qcow2Header:
    """``file_size`` None: not known yet, and at least the first cluster is readable from ``f``."""
    r = _Reader(path, f, file_size)
    head = r.read(0, V3_HEADER_LENGTH + 8)
    if len(head) < 8:
        raise r.refuse(f"too short for a qcow2 header ({len(head)} bytes){_guess_suffix(r)}")
    magic, version = head[:4], struct.unpack(">I", head[4:8])[0]
    if magic != MAGIC:
        raise r.refuse(f"not a qcow2 image (magic {magic.hex()}){_guess_suffix(r)}")
    if version not in (2, 3):
        raise r.refuse(f"unsupported qcow2 version {version} (accepted: 2, 3)")
    need = V2_HEADER_LENGTH if version == 2 else V3_HEADER_LENGTH
    if len(head) < need:
        raise r.refuse(f"truncated: {len(head)} bytes is shorter than a qcow2 v{version} header ({need})")

    (_, _, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
     l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
     snapshots_offset) = _V2.unpack_from(head)
    if version == 3:
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(head, _V2.size)
    else:
        incompat, compat, autoclear, refcount_order, header_length = 0, 0, 0, 4, V2_HEADER_LENGTH

    if backing_file_offset != 0:
        raise r.refuse(f"has a backing file (offset {backing_file_offset}); images must be self-contained")
    if incompat & INCOMPAT_DATA_FILE:
        raise r.refuse("uses an external data file (incompatible feature bit 2)")
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        bits = ", ".join(str(b) for b in range(64) if unknown >> b & 1)
        raise r.refuse(f"unknown incompatible features (bits {bits})")
    if incompat & INCOMPAT_CORRUPT:
        raise r.refuse("is marked corrupt (incompatible feature bit 1)")
    if incompat & INCOMPAT_DIRTY:
        raise r.refuse("is marked dirty (incompatible feature bit 0); run 'qemu-img check -r all' first")
    if crypt_method != 0:
        raise r.refuse(f"is encrypted (crypt_method {crypt_method}); encrypted images are refused")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise r.refuse(f"cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster = 1 << cluster_bits
    if header_length < need:
        raise r.refuse(f"header_length {header_length} is too small (at least {need})")
    if header_length > cluster:
        raise r.refuse(f"header_length {header_length} is larger than a cluster ({cluster})")
    if refcount_order > 6:
        raise r.refuse(f"refcount_order {refcount_order} outside 0..6")

    compression_type = 0
    if header_length > V3_HEADER_LENGTH:
        if len(head) <= V3_HEADER_LENGTH:
            raise r.refuse(f"truncated: header_length {header_length} runs past the end of the file")
        compression_type = head[V3_HEADER_LENGTH]
    if compression_type not in COMPRESSION_TYPES:
        raise r.refuse(f"unknown compression type {compression_type}")
    if bool(incompat & INCOMPAT_COMPRESSION) != (compression_type != 0):
        raise r.refuse(f"compression type {compression_type} disagrees with incompatible feature bit 3")

    if size == 0 or size % 512:
        raise r.refuse(f"virtual size {size} is not a positive multiple of 512")
    if l1_size * 8 > MAX_L1_BYTES:
        raise r.refuse(f"L1 table of {l1_size} entries is absurdly large (QEMU's limit: {MAX_L1_BYTES // 8})")
    l2_entries = cluster // (16 if incompat & INCOMPAT_EXTL2 else 8)
    per_l1_entry = l2_entries * cluster
    l1_needed = -(-size // per_l1_entry)
    if l1_size < l1_needed:
        raise r.refuse(f"L1 table of {l1_size} entries is too small for virtual size {size} "
                       f"(needs {l1_needed})")
    _check_table(r, "L1 table", l1_table_offset, l1_size * 8, cluster)
    if refcount_table_clusters == 0:
        raise r.refuse("has no refcount table")
    if refcount_table_clusters * cluster > MAX_REFTABLE_BYTES:
        raise r.refuse(f"refcount table of {refcount_table_clusters} clusters is absurdly large")
    _check_table(r, "refcount table", refcount_table_offset, refcount_table_clusters * cluster, cluster)
    if nb_snapshots > MAX_SNAPSHOTS:
        raise r.refuse(f"{nb_snapshots} snapshots is absurdly many (QEMU's limit: {MAX_SNAPSHOTS})")
    if nb_snapshots:
        # Each snapshot entry is at least 40 bytes.
        _check_table(r, "snapshot table", snapshots_offset, nb_snapshots * 40, cluster)

    _check_extensions(r, header_length, cluster)

    return Qcow2Header(
        version=version, backing_file_offset=backing_file_offset, backing_file_size=backing_file_size,
        cluster_bits=cluster_bits, size=size, crypt_method=crypt_method, l1_size=l1_size,
        l1_table_offset=l1_table_offset, refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset, incompatible_features=incompat, compatible_features=compat,
        autoclear_features=autoclear, header_length=header_length, compression_type=compression_type)


def _check_table(r: _Reader, what: str, offset: int, length: int, cluster: int) -> None:
    if offset == 0 or offset % cluster:
        raise r.refuse(f"{what} offset {offset} is not cluster-aligned ({cluster})")
    if r.file_size is not None and offset + length > r.file_size:
        raise r.refuse(f"{what} at offset {offset} ({length} bytes) lies beyond the end of the file "
                       f"({r.file_size} bytes)")


def _check_extensions(r: _Reader, start: int, cluster: int) -> None:
    """Walk the header extensions, which must end inside the first cluster."""
    end = cluster if r.file_size is None else min(cluster, r.file_size)
    area = r.read(start, end - start) if end > start else b""
    pos = 0
    while True:
        if pos + 8 > len(area):
            raise r.refuse("header extensions run past the first cluster or the end of the file")
        ext_type, length = struct.unpack_from(">II", area, pos)
        if ext_type == EXT_END:
            return
        if ext_type in _REFUSED_EXTENSIONS:
            raise r.refuse(f"{_REFUSED_EXTENSIONS[ext_type]} (header extension 0x{ext_type:08x})")
        pos += 8 + ((length + 7) & ~7)
        if pos > len(area):
            raise r.refuse(f"header extension 0x{ext_type:08x} runs past the first cluster")


def _guess_suffix(r: _Reader) -> str:
    kind = _guess_format(r)
    return f"; it looks like {kind}" if kind else ""


def _guess_format(r: _Reader) -> str | None:
    """Name the format a non-qcow2 file seems to be, to make the refusal actionable."""
    head = r.read(0, 1024)
    if head.startswith(b"KDMV"):
        return "a VMDK image"
    if head.startswith(b"# Disk DescriptorFile"):
        return "a VMDK descriptor"
    if head.startswith(b"conectix"):
        return "a VHD image (dynamic)"
    if head.startswith(b"vhdxfile"):
        return "a VHDX image"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe" or b"VirtualBox Disk Image" in head[:0x40]:
        return "a VDI image"
    if head.startswith(b"QED\x00"):
        return "a QED image"
    if head.startswith(b"LUKS\xba\xbe"):
        return "a LUKS volume"
    if r.file_size is not None and r.file_size >= 512 and r.read(r.file_size - 512, 8) == b"conectix":
        return "a VHD image (fixed)"
    if head[512:520] == b"EFI PART":
        return "a raw disk with a GPT partition table"
    if head[510:512] == b"\x55\xaa":
        return "a raw disk with an MBR boot signature"
    if (r.file_size is None or r.file_size > 0x8006) and r.read(0x8001, 5) == b"CD001":
        return "an ISO 9660 image"
    return None


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
