"""agent.imageinfo: qemu-img info, confined, against real images (hostile ones included)."""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent import imageinfo
from agent.errors import ImageRefused
from tests.conftest import luks_qcow2

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]

GiB = 1 << 30
INCOMPAT = 72


def create(path: Path, size: str = "1G", *args: str, fmt: str = "qcow2") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *args, "--", str(path), size], check=True,
                   stdin=subprocess.DEVNULL)
    return path


def set_incompat(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(INCOMPAT)
        f.write(struct.pack(">Q", bits))


def info_refused(path: Path, fragment: str) -> str:
    """qemu_img_info alone (without our header check first) must still refuse."""
    with pytest.raises(ImageRefused) as ei:
        imageinfo.qemu_img_info(path)
    message = ei.value.message
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    return message


def inspect_refused(path: Path, fragment: str, limit: int = 100 * GiB) -> str:
    with pytest.raises(ImageRefused) as ei:
        imageinfo.inspect(path, limit)
    message = ei.value.message
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    return message


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return create(tmp_path / "good.qcow2")


def test_info_of_a_valid_image(good: Path) -> None:
    info = imageinfo.qemu_img_info(good)
    assert info["format"] == "qcow2"
    assert imageinfo.virtual_size(info) == GiB
    assert info["filename"] == str(good)


def test_exact_command_line(good: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="hvagent.proc"):
        imageinfo.qemu_img_info(good)
    commands = [r.getMessage() for r in caplog.records if r.name == "hvagent.proc"]
    assert f"+ qemu-img info --output=json -f qcow2 --force-share -- {good}" in commands


def test_relative_path_is_never_read_as_a_json_or_protocol_spec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Read as a spec, this would be qcow2 over an all-zero null device and fail.
    name = 'json:{"file": {"driver": "null-co", "size": "1M"}}'
    create(tmp_path / name, "64M")
    info = imageinfo.qemu_img_info(Path(name))
    assert info["filename"] == str(tmp_path / name)
    assert imageinfo.virtual_size(info) == 64 << 20


def test_inspect_valid_v3_and_v2(tmp_path: Path) -> None:
    for opts in ((), ("-o", "compat=0.10")):
        img = create(tmp_path / f"img{len(opts)}.qcow2", "2G", *opts)
        header, info = imageinfo.inspect(img, 2 * GiB)
        assert header.size == imageinfo.virtual_size(info) == 2 * GiB


def test_backing_file_is_refused_by_qemu_img_info_too(tmp_path: Path) -> None:
    img = create(tmp_path / "b.qcow2", "1G", "-u", "-F", "raw", "-b", "/etc/shadow")
    info_refused(img, "has a backing file")
    inspect_refused(img, "has a backing file")


def test_json_backing(tmp_path: Path) -> None:
    spec = 'json:{"file": {"driver": "file", "filename": "/etc/shadow"}}'
    img = create(tmp_path / "j.qcow2", "1G", "-u", "-F", "raw", "-b", spec)
    info_refused(img, "has a backing file")
    inspect_refused(img, "has a backing file")


def test_external_data_file(tmp_path: Path) -> None:
    img = create(tmp_path / "d.qcow2", "1G", "-o", f"data_file={tmp_path / 'data.raw'}")
    info_refused(img, "external data file")
    inspect_refused(img, "external data file")


def test_encrypted(tmp_path: Path) -> None:
    img = luks_qcow2(tmp_path / "enc.qcow2")
    info_refused(img, "encrypted")
    inspect_refused(img, "encrypted")


def test_corrupt_bit(good: Path) -> None:
    set_incompat(good, 1 << 1)
    info_refused(good, "corrupt")
    inspect_refused(good, "corrupt")


def test_dirty_bit(good: Path) -> None:
    set_incompat(good, 1 << 0)
    info_refused(good, "dirty")
    inspect_refused(good, "dirty")


def test_unknown_incompatible_bit(good: Path) -> None:
    set_incompat(good, 1 << 40)
    info_refused(good, "qemu-img cannot read it as qcow2")
    inspect_refused(good, "unknown incompatible features")


def test_raw_file_named_qcow2(tmp_path: Path) -> None:
    img = tmp_path / "raw.qcow2"
    img.write_bytes(bytes(1 << 20))
    message = info_refused(img, "qemu-img cannot read it as qcow2 (exited with status 1")
    assert "\n" not in message
    inspect_refused(img, "not a qcow2 image")


@pytest.mark.parametrize(("fmt", "looks_like"), [("vmdk", "VMDK"), ("vpc", "VHD")])
def test_other_format_in_disguise(tmp_path: Path, fmt: str, looks_like: str) -> None:
    img = create(tmp_path / "disguised.qcow2", "64M", fmt=fmt)
    info_refused(img, "qemu-img cannot read it as qcow2")
    assert looks_like in inspect_refused(img, "not a qcow2 image")


def test_truncated(good: Path) -> None:
    with open(good, "r+b") as f:
        f.truncate(100_000)
    inspect_refused(good, "beyond the end of the file")


def test_symlink_to_a_host_file(tmp_path: Path) -> None:
    link = tmp_path / "evil.qcow2"
    link.symlink_to("/etc/passwd")
    inspect_refused(link, "symbolic link")


def test_virtual_size_over_the_limit(tmp_path: Path) -> None:
    img = create(tmp_path / "big.qcow2", "2G")
    message = inspect_refused(img, "virtual size 2147483648 bytes (2.0 GiB) exceeds the limit", limit=GiB)
    assert "1073741824" in message


def test_huge_virtual_size(tmp_path: Path) -> None:
    img = create(tmp_path / "huge.qcow2", "1P")
    inspect_refused(img, "virtual size 1125899906842624 bytes (1.0 PiB) exceeds the limit")


@pytest.mark.parametrize("info", [
    {},
    {"virtual-size": 0},
    {"virtual-size": -512},
    {"virtual-size": "1024"},
    {"virtual-size": True},
])
def test_virtual_size_rejects_nonsense(info: dict[str, Any]) -> None:
    with pytest.raises(ImageRefused, match="no valid virtual size"):
        imageinfo.virtual_size(info)
