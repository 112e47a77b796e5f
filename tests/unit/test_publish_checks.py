"""Catalog.publish_stream refuses what the manifest, the size and the first bytes tell before it
writes a byte: no store directory, no temporary file, and only the header's bytes read."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import qcow2
from agent.catalog import Catalog
from agent.config import Config
from agent.errors import ImageRefused
from agent.manifest import Manifest
from agent.state import State
from tests.unit.hostcaps import CAPS

pytestmark = pytest.mark.unit

GiB = 1 << 30


class Counted(io.BytesIO):
    """An upload whose bytes are counted as they are read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self.taken += len(chunk)
        return chunk


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cfg = Config(state_dir=tmp_path, max_virtual_size=GiB)
    state = State(cfg.db_path)
    yield Catalog(cfg, state, lambda: CAPS)
    state.db.close()


def manifest(data: bytes, virtual_size: int) -> Manifest:
    return Manifest(name="x", family=1, version="1.0", sha256=hashlib.sha256(data).hexdigest(), format="qcow2",
                    virtual_size=virtual_size, firmware="bios")


def refused(catalog: Catalog, src: Counted, m: Manifest, fragment: str, size: int | None = None) -> str:
    with pytest.raises(ImageRefused) as ei:
        catalog.publish_stream(src, m, "x.qcow2", size)
    message = ei.value.message
    assert message.startswith("x.qcow2: ") and fragment in message, message
    assert not catalog.store.exists(), list(catalog.store.rglob("*"))
    assert catalog.state.pending() == []
    return message


def test_max_file_size_is_the_virtual_size_plus_metadata() -> None:
    assert qcow2.max_file_size(GiB) == GiB + GiB // 128 + (16 << 20)


def test_manifest_virtual_size_over_the_limit_reads_nothing(catalog: Catalog) -> None:
    src = Counted(b"QFI\xfb")
    message = refused(catalog, src, manifest(b"", 2 * GiB), "the manifest's virtual size 2147483648 bytes")
    assert "max_virtual_size is 1073741824 bytes (1.0 GiB)" in message
    assert src.taken == 0


def test_a_file_larger_than_any_accepted_image_reads_nothing(catalog: Catalog) -> None:
    src = Counted(b"")
    message = refused(catalog, src, manifest(b"", GiB), "3221225472 bytes (3.0 GiB) is larger", size=3 * GiB)
    assert f"at most {qcow2.max_file_size(GiB)} bytes" in message
    assert src.taken == 0


def test_not_qcow2_is_refused_after_its_header_only(catalog: Catalog) -> None:
    data = b"\0" * (8 << 20)
    src = Counted(data)
    refused(catalog, src, manifest(data, 8 << 20), "not a qcow2 image (magic 00000000)")
    assert src.taken == qcow2.HEAD_BYTES


def test_a_short_stream_is_judged_whole(catalog: Catalog) -> None:
    refused(catalog, Counted(b"QF"), manifest(b"QF", 1 << 20), "too short for a qcow2 header (2 bytes)")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
@pytest.mark.parametrize(("create", "fragment"), [
    (["2G"], "virtual size 2147483648 bytes (2.0 GiB) exceeds the limit"),
    (["-o", "compat=0.10", "512M"], "virtual size 536870912 differs from the manifest's 1073741824"),
    (["-b", "/etc/shadow", "-F", "raw", "-u", "1G"], "has a backing file"),
])
def test_qcow2_headers_are_checked_before_copying(catalog: Catalog, tmp_path: Path, create: list[str],
                                                  fragment: str) -> None:
    path = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create[:-1], str(path), create[-1]], check=True)
    data = path.read_bytes()
    refused(catalog, Counted(data), manifest(data, GiB), fragment)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_unknown_size_stream_is_cut_at_the_bound(catalog: Catalog, tmp_path: Path) -> None:
    """A stream of unknown length (an upload) stops being copied once it passes the largest file."""
    cfg = Config(state_dir=tmp_path, max_virtual_size=1 << 20)
    small = Catalog(cfg, catalog.state, lambda: CAPS)
    path = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    data = path.read_bytes() + b"\0" * (qcow2.max_file_size(1 << 20))
    with pytest.raises(ImageRefused, match=f"larger than {qcow2.max_file_size(1 << 20)} bytes"):
        small.publish_stream(Counted(data), manifest(data, 1 << 20), "x.qcow2")
    assert [p for p in small.store.rglob("*") if p.is_file()] == []
    assert small.state.pending() == []
