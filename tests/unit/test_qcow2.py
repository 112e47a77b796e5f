"""agent.qcow2: our header reader against real qemu-img images, byte-patched into hostile ones."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent import qcow2
from agent.errors import ImageRefused
from tests.conftest import luks_qcow2

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]

GiB = 1 << 30

# Field offsets in the header (docs/interop/qcow2.txt).
VERSION, BACKING_OFFSET, CLUSTER_BITS, SIZE, CRYPT = 4, 8, 20, 24, 32
L1_SIZE, L1_OFFSET, REFTABLE_OFFSET, REFTABLE_CLUSTERS = 36, 40, 48, 56
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
INCOMPAT, HEADER_LENGTH, COMPRESSION_TYPE = 72, 100, 104


def create(path: Path, size: str = "1G", *args: str, fmt: str = "qcow2") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *args, "--", str(path), size], check=True,
                   stdin=subprocess.DEVNULL)
    return path


def patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, value))


def peek(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">" + fmt, f.read(struct.calcsize(fmt)))[0]
        return value


def refused(path: Path, fragment: str) -> str:
    with pytest.raises(ImageRefused) as ei:
        qcow2.read_header(path)
    message = ei.value.message
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    assert "\n" not in message
    return message


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return create(tmp_path / "good.qcow2")


# -- accepted ---------------------------------------------------------------------------------

def test_valid_v3_image(good: Path) -> None:
    h = qcow2.read_header(good)
    assert (h.version, h.size, h.cluster_bits, h.cluster_size) == (3, GiB, 16, 65536)
    assert h.backing_file_offset == 0 and h.crypt_method == 0
    assert h.incompatible_features == 0
    assert h.header_length >= 104
    assert h.l1_size == 2
    assert h.compression_type == 0


def test_valid_v2_image(tmp_path: Path) -> None:
    h = qcow2.read_header(create(tmp_path / "v2.qcow2", "1G", "-o", "compat=0.10"))
    assert (h.version, h.size, h.header_length) == (2, GiB, 72)
    assert h.incompatible_features == h.compatible_features == h.autoclear_features == 0


@pytest.mark.parametrize("opts", [
    "cluster_size=512",
    "cluster_size=2M",
    "extended_l2=on,compression_type=zstd",
    "lazy_refcounts=on,refcount_bits=64",
])
def test_valid_variants(tmp_path: Path, opts: str) -> None:
    h = qcow2.read_header(create(tmp_path / "v.qcow2", "3G", "-o", opts))
    assert h.size == 3 * GiB


def test_valid_image_with_data(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(1 << 20))
    img = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(img)],
                   check=True)
    assert qcow2.read_header(img).size == 1 << 20


def test_file_size_argument_only_tightens(good: Path) -> None:
    assert qcow2.read_header(good, file_size=1 << 40).size == GiB
    with pytest.raises(ImageRefused, match="beyond the end of the file"):
        qcow2.read_header(good, file_size=4096)


# -- things that reach outside the file ------------------------------------------------------

def test_backing_file_pointing_at_etc_shadow(tmp_path: Path) -> None:
    img = create(tmp_path / "b.qcow2", "1G", "-u", "-F", "raw", "-b", "/etc/shadow")
    refused(img, "has a backing file")


def test_json_backing(tmp_path: Path) -> None:
    spec = 'json:{"file": {"driver": "file", "filename": "/etc/shadow"}}'
    img = create(tmp_path / "j.qcow2", "1G", "-u", "-F", "raw", "-b", spec)
    refused(img, "has a backing file")


def test_backing_format_extension_alone(tmp_path: Path) -> None:
    img = create(tmp_path / "b.qcow2", "1G", "-u", "-F", "raw", "-b", "/etc/shadow")
    patch(img, BACKING_OFFSET, "Q", 0)
    refused(img, "backing file format extension")


def test_external_data_file(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", "1G", "-o", f"data_file={tmp_path / 'data.raw'}")
    refused(img, "external data file")


def test_external_data_file_name_extension_alone(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", "1G", "-o", f"data_file={tmp_path / 'data.raw'}")
    patch(img, INCOMPAT, "Q", peek(img, INCOMPAT, "Q") & ~(1 << 2))
    refused(img, "names an external data file")


def test_symlink_to_a_host_file(tmp_path: Path) -> None:
    link = tmp_path / "evil.qcow2"
    link.symlink_to("/etc/passwd")
    refused(link, "symbolic link")


def test_symlink_to_a_valid_image(tmp_path: Path, good: Path) -> None:
    link = tmp_path / "link.qcow2"
    link.symlink_to(good)
    refused(link, "symbolic link")


def test_directory_and_fifo_are_not_regular_files(tmp_path: Path) -> None:
    refused(tmp_path, "not a regular file")
    fifo = tmp_path / "fifo.qcow2"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")  # and must not block waiting for a writer


def test_missing_file(tmp_path: Path) -> None:
    refused(tmp_path / "nope.qcow2", "cannot open")


# -- not qcow2 at all ------------------------------------------------------------------------

def test_raw_file_named_qcow2(tmp_path: Path) -> None:
    img = tmp_path / "raw.qcow2"
    img.write_bytes(bytes(1 << 20))
    refused(img, "not a qcow2 image (magic 00000000)")


def test_raw_disk_with_mbr(tmp_path: Path) -> None:
    img = tmp_path / "mbr.qcow2"
    data = bytearray(1 << 20)
    data[510:512] = b"\x55\xaa"
    img.write_bytes(bytes(data))
    refused(img, "MBR")


@pytest.mark.parametrize(("fmt", "opts", "looks_like"), [
    ("vmdk", (), "VMDK image"),
    ("vmdk", ("-o", "subformat=monolithicFlat"), "VMDK descriptor"),
    ("vpc", (), "VHD image (dynamic)"),
    ("vpc", ("-o", "subformat=fixed"), "VHD image (fixed)"),
    ("vhdx", (), "VHDX image"),
    ("vdi", (), "VDI image"),
    ("qed", (), "QED image"),
])
def test_other_formats_in_disguise(tmp_path: Path, fmt: str, opts: tuple[str, ...], looks_like: str) -> None:
    img = create(tmp_path / "disguised.qcow2", "16M", *opts, fmt=fmt)
    message = refused(img, "not a qcow2 image")
    assert looks_like in message


def test_raw_file_mimicking_a_qcow2_header(tmp_path: Path) -> None:
    img = tmp_path / "mimic.qcow2"
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, 16, GiB, 0, 2, 0x30000,
                         0x10000, 1, 0, 0, 0, 0, 0, 4, 104)
    img.write_bytes(header + bytes(4096 - len(header)))
    refused(img, "beyond the end of the file")


# -- truncated and corrupt headers -----------------------------------------------------------

def test_empty_file(tmp_path: Path) -> None:
    img = tmp_path / "empty.qcow2"
    img.write_bytes(b"")
    refused(img, "too short for a qcow2 header")


def test_truncated_inside_the_header(good: Path) -> None:
    os.truncate(good, 50)
    refused(good, "truncated")


def test_truncated_before_the_tables(good: Path) -> None:
    os.truncate(good, 100_000)
    refused(good, "beyond the end of the file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_bad_version(good: Path, version: int) -> None:
    patch(good, VERSION, "I", version)
    refused(good, f"unsupported qcow2 version {version}")


@pytest.mark.parametrize("bits", [0, 8, 22, 63])
def test_bad_cluster_bits(good: Path, bits: int) -> None:
    patch(good, CLUSTER_BITS, "I", bits)
    refused(good, f"cluster_bits {bits} outside 9..21")


def test_header_length_too_small(good: Path) -> None:
    patch(good, HEADER_LENGTH, "I", 72)
    refused(good, "header_length 72 is too small")


def test_header_length_larger_than_a_cluster(good: Path) -> None:
    patch(good, HEADER_LENGTH, "I", 65536 + 8)
    refused(good, "larger than a cluster")


def test_header_extensions_running_off_the_cluster(good: Path) -> None:
    # A feature-name extension claiming to be 1 MiB long.
    patch(good, peek(good, HEADER_LENGTH, "I") + 4, "I", 1 << 20)
    refused(good, "runs past the first cluster")


def test_l1_table_past_eof(good: Path) -> None:
    patch(good, L1_OFFSET, "Q", 1 << 40)
    refused(good, "L1 table at offset 1099511627776")


def test_l1_table_unaligned(good: Path) -> None:
    patch(good, L1_OFFSET, "Q", 0x30008)
    refused(good, "L1 table offset 196616 is not cluster-aligned")


def test_refcount_table_past_eof(good: Path) -> None:
    patch(good, REFTABLE_OFFSET, "Q", 0x100000)
    refused(good, "refcount table at offset 1048576")


def test_refcount_table_unaligned(good: Path) -> None:
    patch(good, REFTABLE_OFFSET, "Q", 0x10001)
    refused(good, "refcount table offset 65537 is not cluster-aligned")


def test_refcount_table_absurdly_large(good: Path) -> None:
    patch(good, REFTABLE_CLUSTERS, "I", 1 << 20)
    refused(good, "refcount table of 1048576 clusters is absurdly large")


def test_snapshot_table_past_eof(good: Path) -> None:
    patch(good, NB_SNAPSHOTS, "I", 1)
    patch(good, SNAPSHOTS_OFFSET, "Q", 0x1000000)
    refused(good, "snapshot table at offset 16777216")


def test_zero_virtual_size(good: Path) -> None:
    patch(good, SIZE, "Q", 0)
    refused(good, "virtual size 0 is not a positive multiple of 512")


def test_virtual_size_not_a_multiple_of_512(good: Path) -> None:
    patch(good, SIZE, "Q", GiB + 1)
    refused(good, "is not a positive multiple of 512")


def test_l1_too_small_for_the_virtual_size(good: Path) -> None:
    patch(good, SIZE, "Q", 1 << 50)
    refused(good, "L1 table of 2 entries is too small")


def test_l1_absurdly_large(good: Path) -> None:
    patch(good, L1_SIZE, "I", 0xFFFFFFFF)
    refused(good, "absurdly large")


# -- features, encryption --------------------------------------------------------------------

def test_dirty_bit(good: Path) -> None:
    patch(good, INCOMPAT, "Q", 1 << 0)
    refused(good, "dirty")


def test_corrupt_bit(good: Path) -> None:
    patch(good, INCOMPAT, "Q", 1 << 1)
    refused(good, "corrupt")


@pytest.mark.parametrize("bit", [5, 17, 63])
def test_unknown_incompatible_bit(good: Path, bit: int) -> None:
    patch(good, INCOMPAT, "Q", 1 << bit)
    refused(good, f"unknown incompatible features (bits {bit})")


def test_compression_type_without_its_feature_bit(good: Path) -> None:
    if peek(good, HEADER_LENGTH, "I") <= 104:
        pytest.skip("this qemu-img writes no compression_type field")
    patch(good, COMPRESSION_TYPE, "B", 1)
    refused(good, "disagrees with incompatible feature bit 3")


def test_unknown_compression_type(good: Path) -> None:
    if peek(good, HEADER_LENGTH, "I") <= 104:
        pytest.skip("this qemu-img writes no compression_type field")
    patch(good, INCOMPAT, "Q", 1 << 3)
    patch(good, COMPRESSION_TYPE, "B", 7)
    refused(good, "unknown compression type 7")


def test_encrypted_luks(tmp_path: Path) -> None:
    refused(luks_qcow2(tmp_path / "enc.qcow2"), "encrypted")


def test_luks_header_extension_alone(tmp_path: Path) -> None:
    img = luks_qcow2(tmp_path / "enc.qcow2")
    patch(img, CRYPT, "I", 0)
    refused(img, "encryption header")


def test_legacy_aes_crypt_method(good: Path) -> None:
    patch(good, CRYPT, "I", 1)
    refused(good, "is encrypted (crypt_method 1)")


# -- the size bound --------------------------------------------------------------------------

def test_check_virtual_size(good: Path) -> None:
    h = qcow2.read_header(good)
    qcow2.check_virtual_size(h, GiB)
    with pytest.raises(ImageRefused) as ei:
        qcow2.check_virtual_size(h, GiB - 512)
    assert "virtual size 1073741824" in ei.value.message
    assert "limit of 1073741312" in ei.value.message


def test_huge_virtual_size_vs_limit(tmp_path: Path) -> None:
    img = create(tmp_path / "huge.qcow2", "1P")
    h = qcow2.read_header(img)
    assert h.size == 1 << 50
    with pytest.raises(ImageRefused, match=r"virtual size 1125899906842624 bytes \(1\.0 PiB\) exceeds"):
        qcow2.check_virtual_size(h, 100 * GiB)


def test_image_with_an_internal_snapshot(good: Path) -> None:
    subprocess.run(["qemu-img", "snapshot", "-q", "-c", "s1", str(good)], check=True)
    h = qcow2.read_header(good)
    assert h.nb_snapshots == 1
    assert h.snapshots_offset % h.cluster_size == 0
