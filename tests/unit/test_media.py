"""Installer media, pure logic: an ISO's magic and the formats it must not also be, sizes, a PXE
bundle's listing, names and walk; and the catalog keeping media out of tracks and VMs."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from agent import media, qcow2
from agent.catalog import Catalog
from agent.errors import ImageRefused, InputError
from agent.manifest import Kind, MediaManifest, load_any_manifest, load_manifest
from agent.version import Track
from tests.unit.test_publish_checks import Counted, catalog

pytestmark = pytest.mark.unit
__all__ = ["catalog"]  # the fixture, shared with test_publish_checks


def iso_bytes(blocks: int = 18, volume_id: bytes = b"TINYINST_1_4") -> bytearray:
    """A minimal ISO 9660 image: the system area, a primary volume descriptor, a terminator."""
    data = bytearray(blocks * media.SECTOR)
    pvd = media.PVD
    data[pvd:pvd + 7] = b"\x01CD001\x01"
    data[pvd + 40:pvd + 72] = volume_id.ljust(32)
    struct.pack_into("<I", data, pvd + 80, blocks)
    struct.pack_into(">I", data, pvd + 84, blocks)
    struct.pack_into("<H", data, pvd + 128, media.SECTOR)
    struct.pack_into(">H", data, pvd + 130, media.SECTOR)
    data[pvd + media.SECTOR:pvd + media.SECTOR + 7] = b"\xffCD001\x01"
    return data


def test_a_minimal_iso_passes() -> None:
    h = media.parse_head(bytes(iso_bytes()[:media.HEAD_BYTES]), 18 * 2048, "x.iso")
    assert (h.volume_id, h.volume_bytes) == ("TINYINST_1_4", 18 * 2048)
    assert media.MAGIC_OFFSET == 32769


@pytest.mark.parametrize(("offset", "magic", "names"), [
    (0, qcow2.MAGIC + b"\0\0\0\3", "iso, qcow2"),
    (0, b"KDMV", "iso, vmdk"),
    (0, b"# Disk DescriptorFile", "iso, vmdk"),
    (0, b"conectix", "iso, vhd"),
    (512 * 7, qcow2.MAGIC, "iso, qcow2"),  # planted in the system area, not at byte 0
    (30000, b"KDMV", "iso, vmdk"),
])
def test_another_format_in_the_system_area_is_refused(offset: int, magic: bytes, names: str) -> None:
    data = iso_bytes()
    data[offset:offset + len(magic)] = magic
    with pytest.raises(ImageRefused, match=rf"^x\.iso: multiple formats detected \({names}\)"):
        media.parse_head(bytes(data[:media.HEAD_BYTES]), len(data), "x.iso")


def test_a_hybrid_iso_with_an_mbr_and_gpt_passes() -> None:
    data = iso_bytes()
    data[510:512] = b"\x55\xaa"
    data[512:520] = b"EFI PART"
    media.parse_head(bytes(data[:media.HEAD_BYTES]), len(data), "x.iso")


def test_vhd_footer_is_found_by_the_whole_file_check(tmp_path: Path) -> None:
    data = iso_bytes()
    data[-512:-504] = b"conectix"
    p = tmp_path / "x.iso"
    p.write_bytes(data)
    with pytest.raises(ImageRefused, match=r"multiple formats detected \(iso, vhd\)"):
        media.inspect_iso(p, 1 << 30, "x.iso")


@pytest.mark.parametrize(("data", "needle"), [
    (b"", "too short for an ISO 9660 image (0 bytes"),
    (bytes(40000), "not an ISO 9660 image (no CD001 at byte 32769)"),
    (qcow2.MAGIC + bytes(40000), "not an ISO 9660 image (no CD001 at byte 32769); it is qcow2"),
])
def test_not_an_iso(data: bytes, needle: str) -> None:
    with pytest.raises(ImageRefused) as ei:
        media.parse_head(data[:media.HEAD_BYTES], len(data), "x.iso")
    assert ei.value.message == f"x.iso: {needle}" or ei.value.message.startswith(f"x.iso: {needle}")


def test_descriptor_fields_are_checked() -> None:
    data = iso_bytes()
    struct.pack_into(">I", data, media.PVD + 84, 99)
    with pytest.raises(ImageRefused, match="both-endian sizes disagree"):
        media.parse_head(bytes(data[:media.HEAD_BYTES]), len(data), "x.iso")
    data = iso_bytes(blocks=100)
    with pytest.raises(ImageRefused, match="truncated: its volume is 204800 bytes, the file 36864"):
        media.parse_head(bytes(data[:media.HEAD_BYTES]), 36864, "x.iso")


def test_size_bound() -> None:
    media.check_size(1024, 1024, "x.iso")
    with pytest.raises(ImageRefused, match=r"^x\.iso: 1025 bytes .* max_virtual_size is 1024 bytes"):
        media.check_size(1025, 1024, "x.iso")


# -- bundles -----------------------------------------------------------------------------------
def test_listing_is_build_installers_sha256sums() -> None:
    files = {"vmlinuz": "a" * 64, "pxelinux.cfg/default": "b" * 64, "pxelinux.0": "c" * 64, "a.b": "d" * 64,
             "a/b": "e" * 64}
    # sorted as pathlib sorts paths (component by component), as bundle_sums does
    assert [line.split("  ")[1] for line in media.listing(files).splitlines()] == \
        [p.as_posix() for p in sorted(Path(n) for n in files)]
    assert media.listing_sha256(files) == hashlib.sha256(media.listing(files).encode()).hexdigest()


def bundle(d: Path, files: dict[str, bytes]) -> dict[str, str]:
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}


FILES = {"pxelinux.0": b"boot", "pxelinux.cfg/default": b"DEFAULT install\n", "vmlinuz": b"kernel",
         "initrd.gz": b"\x1f\x8binitrd"}


def test_scan_bundle_sizes(tmp_path: Path) -> None:
    listed = bundle(tmp_path, FILES)
    assert media.scan_bundle(tmp_path, listed, "b") == {n: len(v) for n, v in FILES.items()}


@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: (d / "extra.txt").write_text("x"), "b: extra.txt: not listed in the manifest's files"),
    (lambda d: (d / "vmlinuz").unlink(), "b: vmlinuz: listed in the manifest's files, missing from the bundle"),
    (lambda d: ((d / "vmlinuz").unlink(), (d / "vmlinuz").symlink_to("/etc/shadow")),
     "b: vmlinuz: is a symbolic link"),
    (lambda d: (d / "up").symlink_to("/etc"), "b: up: is a symbolic link"),
    (lambda d: os.mkfifo(d / "fifo"), "b: fifo: not a regular file"),
])
def test_scan_bundle_refusals(tmp_path: Path, change: Any, needle: str) -> None:
    listed = bundle(tmp_path, FILES)
    change(tmp_path)
    with pytest.raises(ImageRefused) as ei:
        media.scan_bundle(tmp_path, listed, "b")
    assert ei.value.message.startswith(needle), ei.value.message


def test_open_member_follows_no_link(tmp_path: Path) -> None:
    bundle(tmp_path, FILES)
    (tmp_path / "sub").symlink_to(tmp_path / "pxelinux.cfg")
    with pytest.raises(ImageRefused, match="cannot open without following a link"):
        media.open_member(tmp_path, "sub/default", "b")
    os.close(media.open_member(tmp_path, "pxelinux.cfg/default", "b"))


def test_member_heads() -> None:
    media.check_member_head(b"\x1f\x8b\x08", "initrd.gz", "b")
    with pytest.raises(ImageRefused, match=r"^b: vmlinuz: a vmdk header"):
        media.check_member_head(b"KDMV\x01", "vmlinuz", "b")


# -- manifests ---------------------------------------------------------------------------------
def netboot_manifest(files: dict[str, str], **override: object) -> dict[str, Any]:
    m: dict[str, Any] = {"name": "tinypxe", "kind": "netboot", "family": 1, "version": "1.5",
                         "sha256": media.listing_sha256(files), "format": "pxe", "firmware": ["bios"],
                         "bootfile": "pxelinux.0", "kernel": "vmlinuz", "initrd": "initrd.gz",
                         "cmdline": "console=ttyS0", "files": files}
    m.update(override)
    return m


@pytest.mark.parametrize(("override", "needle"), [
    ({"files": {"../etc/shadow": "a" * 64}}, "files: Value error, '../etc/shadow' is not a file inside the bundle"),
    ({"files": {"/etc/shadow": "a" * 64}}, "is not a file inside the bundle"),
    ({"files": {".hidden": "a" * 64}}, "is not a file inside the bundle"),
    ({"kernel": "../vmlinuz"}, "kernel: Value error, '../vmlinuz' is not a file inside the bundle"),
    ({"kernel": "bzImage"}, "m.yaml: kernel: bzImage is not among the bundle's files"),
    ({"format": "iso"}, "m.yaml: format: kind netboot takes format pxe, not iso"),
    ({"kind": "floppy"}, "m.yaml: kind: 'floppy' is not a kind; accepted: disk, installer, netboot"),
    ({"virtual_size": 1}, "m.yaml: virtual_size: unknown key; accepted for kind netboot: name"),
])
def test_bad_media_manifests(tmp_path: Path, override: dict[str, object], needle: str) -> None:
    p = tmp_path / "m.yaml"
    m = netboot_manifest(bundle(tmp_path, FILES))
    m.update(override)
    p.write_text(yaml.safe_dump(m))
    with pytest.raises(InputError) as ei:
        load_any_manifest(p)
    assert needle in ei.value.message, ei.value.message


def test_media_manifest_is_not_a_disk(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(netboot_manifest(bundle(tmp_path, FILES))))
    m = load_any_manifest(p)
    assert isinstance(m, MediaManifest) and m.kind is Kind.NETBOOT
    with pytest.raises(InputError, match="kind: netboot media are not a disk image"):
        load_manifest(p)


# -- the catalog -------------------------------------------------------------------------------
def iso_manifest(data: bytes, **override: object) -> MediaManifest:
    fields: dict[str, Any] = {"name": "tinyiso", "kind": "installer", "family": 1, "version": "1.4",
                              "sha256": hashlib.sha256(data).hexdigest(), "format": "iso", "size": len(data),
                              "firmware": ["bios", "uefi"], "devices": ["cdrom"]}
    fields.update(override)
    return MediaManifest.model_validate(fields)


def test_an_iso_manifest_gives_its_size() -> None:
    """Without it, an ISO followed by gigabytes of zeros would be copied whole before its sha256
    refused it; with it, the file's size is compared before a byte is copied."""
    with pytest.raises(ValidationError, match="size: an installer ISO's manifest gives its size"):
        iso_manifest(b"x", size=None)


def test_iso_with_a_qcow2_header_is_refused_before_a_byte_is_written(catalog: Catalog) -> None:
    data = iso_bytes()
    data[:8] = qcow2.MAGIC + b"\0\0\0\3"
    src = Counted(bytes(data))
    with pytest.raises(ImageRefused, match=r"^x\.iso: multiple formats detected \(iso, qcow2\)"):
        catalog.publish_stream(src, iso_manifest(bytes(data)), "x.iso", len(data))
    assert not catalog.store.exists() and src.taken == media.HEAD_BYTES and catalog.state.pending() == []


def test_iso_larger_than_the_bound_is_refused_unread(catalog: Catalog) -> None:
    data = bytes(iso_bytes())
    src = Counted(data)
    with pytest.raises(ImageRefused, match="max_virtual_size is 1073741824 bytes"):
        catalog.publish_stream(src, iso_manifest(data, size=2 << 30), "x.iso", 2 << 30)
    assert src.taken == 0 and not catalog.store.exists()


def test_published_iso_is_read_only_and_no_track_takes_it(catalog: Catalog) -> None:
    data = bytes(iso_bytes())
    row = catalog.publish_stream(io.BytesIO(data), iso_manifest(data), "x.iso", len(data))
    assert row.path.endswith("tinyiso/tinyiso-1.4.iso") and os.stat(row.path).st_mode & 0o777 == 0o444
    assert row.virtual_size == len(data) and row.manifest["kind"] == "installer" and catalog.verify(row)
    for track in ("tinyiso-1.*", "tinyiso-1.4"):
        with pytest.raises(InputError) as ei:
            catalog.resolve(Track.parse(track))
        assert ei.value.message.startswith(f"image: {track} names installer media (kind installer); a VM's image")
    with pytest.raises(InputError, match="kind installer media are not a VM's disk"):
        catalog.base_for_use(row)
    with pytest.raises(ImageRefused, match=r"^y\.iso: sha256 \w+ differs from the manifest's"):  # an upload: no size
        catalog.publish_stream(io.BytesIO(data + b"x"), iso_manifest(data, version="1.5"), "y.iso")
    assert [r.ref for r in catalog.state.images()] == ["tinyiso-1.4"]


def test_a_name_keeps_its_kind(catalog: Catalog, tmp_path: Path) -> None:
    data = bytes(iso_bytes())
    catalog.publish_stream(io.BytesIO(data), iso_manifest(data), "x.iso", len(data))
    d = tmp_path / "tinyiso-1.5"
    d.mkdir()
    files = bundle(d, FILES)
    m = MediaManifest.model_validate(netboot_manifest(files, name="tinyiso"))
    with pytest.raises(InputError, match="kind netboot, and tinyiso names kind installer images"):
        catalog.publish_bundle(d, m)


def test_bundle_is_stored_read_only(catalog: Catalog, tmp_path: Path) -> None:
    d = tmp_path / "tinypxe-1.5"
    d.mkdir()
    m = MediaManifest.model_validate(netboot_manifest(bundle(d, FILES)))
    row = catalog.publish_bundle(d, m)
    stored = Path(row.path)
    assert stored == catalog.store / "tinypxe" / "tinypxe-1.5" and catalog.verify(row)
    assert {p.relative_to(stored).as_posix(): p.stat().st_mode & 0o777 for p in stored.rglob("*")} == \
        {"pxelinux.0": 0o444, "pxelinux.cfg": 0o555, "pxelinux.cfg/default": 0o444, "vmlinuz": 0o444,
         "initrd.gz": 0o444}
    assert row.virtual_size == sum(len(v) for v in FILES.values())
    with pytest.raises(InputError, match="names netboot media"):
        catalog.resolve(Track.parse("tinypxe-1.*"))


def test_bundle_refusals_store_nothing(catalog: Catalog, tmp_path: Path) -> None:
    d = tmp_path / "tinypxe-1.5"
    d.mkdir()
    files = bundle(d, {**FILES, "vmlinuz": qcow2.MAGIC + b"\0\0\0\3"})
    with pytest.raises(ImageRefused, match="vmlinuz: a qcow2 header"):
        catalog.publish_bundle(d, MediaManifest.model_validate(netboot_manifest(files)))
    files = bundle(d, FILES)
    with pytest.raises(ImageRefused, match="the listing of the manifest's files has sha256"):
        catalog.publish_bundle(d, MediaManifest.model_validate(netboot_manifest(files, sha256="0" * 64)))
    wrong = {**files, "vmlinuz": "0" * 64}
    with pytest.raises(ImageRefused, match=r"vmlinuz: sha256 .* differs from the manifest.s 0000"):
        catalog.publish_bundle(d, MediaManifest.model_validate(netboot_manifest(wrong)))
    assert list(catalog.store.rglob("*")) == [] and catalog.state.images() == [] and catalog.state.pending() == []
