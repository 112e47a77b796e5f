"""Installer media through the real CLI: an ISO (made here with xorriso, as images/build-installer
makes one) and a PXE bundle laid out as build_pxe lays it out, with manifests as it writes them.
Both are published, listed with their kind and stored read-only; hostile ones are refused in one
line, exit 2, with the store unchanged; no track, rollout or VM takes media. No VM boots here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import media
from agent.seed import KeyPair
from tests.conftest import hvagent, image, store_snapshot

pytestmark = pytest.mark.integration
CMDLINE = "console=tty0 console=ttyS0,115200 panic=10"
GiB = 1 << 30
# make_iso's volume descriptors (xorriso -J): the primary one, Joliet's supplementary one, the terminator
DESCRIPTORS_END = media.PVD + 3 * media.SECTOR


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_iso(d: Path, version: str = "1.4", plant: bytes = b"") -> Path:
    """tinyiso-VERSION.iso and its manifest; ``plant`` is written at byte 0 (the system area)."""
    if not shutil.which("xorriso"):
        pytest.fail("xorriso is missing: run .ci/host-setup (Debian package xorriso)")
    tree = d / f"tree-{version}"
    (tree / "install").mkdir(parents=True)
    (tree / "install" / "vmlinuz").write_bytes(b"kernel " * 100)
    iso = d / f"tinyiso-{version}.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", "TINYINST", "-J", "-r", str(tree)],
                   check=True, capture_output=True)
    data = bytearray(iso.read_bytes())
    data[:len(plant)] = plant
    iso.write_bytes(data)
    man = {"name": "tinyiso", "kind": "installer", "family": 1, "version": version, "machine": "q35",
           "min_qemu": "7.2", "sha256": _sha256(bytes(data)), "format": "iso", "size": len(data),
           "firmware": ["bios", "uefi"], "boot": {"bios": "isolinux", "uefi": "systemd-boot"}, "devices": ["cdrom"],
           "cmdline": CMDLINE, "packages": {"busybox": "1:1.35.0-4"}, "installs": {"name": "tiny", "version": version}}
    iso.with_suffix(".yaml").write_text(yaml.safe_dump(man, sort_keys=False))
    return iso


def make_bundle(d: Path, version: str = "1.5") -> Path:
    """tinypxe-VERSION/ (build_pxe's files) and tinypxe-VERSION.yaml; the manifest's sha256 is
    that of the SHA256SUMS listing, computed here with sha256sum, as bundle_sums lists them."""
    b = d / f"tinypxe-{version}"
    (b / "pxelinux.cfg").mkdir(parents=True)
    for name, data in {"pxelinux.0": b"pxelinux", "ldlinux.c32": b"ldlinux", "vmlinuz": b"kernel",
                       "initrd.gz": b"\x1f\x8b\x08initrd", "cmdline": f"{CMDLINE}\n".encode(),
                       "pxelinux.cfg/default": b"DEFAULT install\n"}.items():
        (b / name).write_bytes(data)
    names = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    sums = subprocess.run(["sha256sum", "--", *names], cwd=b, check=True, capture_output=True, text=True).stdout
    files = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in sums.splitlines()}
    man = {"name": "tinypxe", "kind": "netboot", "family": 1, "version": version, "machine": "q35", "min_qemu": "7.2",
           "sha256": _sha256(sums.encode()), "format": "pxe", "firmware": ["bios"], "bootfile": "pxelinux.0",
           "kernel": "vmlinuz", "initrd": "initrd.gz", "cmdline": CMDLINE, "files": files,
           "installs": {"name": "tiny", "version": version}}
    (d / f"tinypxe-{version}.yaml").write_text(yaml.safe_dump(man, sort_keys=False))
    return b


def edit_manifest(manifest: Path, drop: str | None = None, **changes: Any) -> None:
    m = yaml.safe_load(manifest.read_text())
    m.pop(drop, None)
    manifest.write_text(yaml.safe_dump({**m, **changes}, sort_keys=False))


def refused(state_dir: Path, *args: str, needle: str) -> float:
    """The seconds the refused command took."""
    before = store_snapshot(state_dir)
    start = time.monotonic()
    r = hvagent(state_dir, *args)
    took = time.monotonic() - start
    line = r.stderr.strip()
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert len(line.splitlines()) == 1 and line.startswith("hvagent: error:"), r.stderr
    assert needle in line, line
    assert store_snapshot(state_dir) == before
    return took


def test_media_published_listed_read_only_and_never_a_vm_disk(state_dir: Path, tenant_key: KeyPair) -> None:
    work = state_dir / "work"
    work.mkdir()
    for args in ([str(image("tiny-1.0"))], [str(make_iso(work))], [str(work / "tinypxe-1.5.yaml")]):
        if args[0].endswith(".yaml"):
            make_bundle(work)
        r = hvagent(state_dir, "images", "publish", *args)
        assert r.returncode == 0, r.stderr
    listed: list[dict[str, Any]] = json.loads(hvagent(state_dir, "images", "list", "--json", check=True).stdout)
    assert {(i["name"], i["version"], i["kind"]) for i in listed} == {
        ("tiny", "1.0", "disk"), ("tinyiso", "1.4", "installer"), ("tinypxe", "1.5", "netboot")}
    table = hvagent(state_dir, "images", "list", check=True).stdout
    assert "installer" in table and "netboot" in table

    store = state_dir / "images"
    iso = store / "tinyiso" / "tinyiso-1.4.iso"
    assert iso.read_bytes() == (work / "tinyiso-1.4.iso").read_bytes() and stat.S_IMODE(iso.stat().st_mode) == 0o444
    bundle = store / "tinypxe" / "tinypxe-1.5"
    modes = {p.relative_to(bundle).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in bundle.rglob("*")}
    assert modes == {"pxelinux.0": 0o444, "ldlinux.c32": 0o444, "vmlinuz": 0o444, "initrd.gz": 0o444,
                     "cmdline": 0o444, "pxelinux.cfg": 0o555, "pxelinux.cfg/default": 0o444}
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o555

    # hostile media, each refused in one line with the store as it was
    planted = make_iso(work, "1.6", plant=b"QFI\xfb\x00\x00\x00\x03")
    refused(state_dir, "images", "publish", str(planted), needle="multiple formats detected (iso, qcow2)")
    wrong = make_iso(work, "1.7")
    edit_manifest(wrong.with_suffix(".yaml"), sha256="0" * 64)
    refused(state_dir, "images", "publish", str(wrong), needle="differs from the manifest's 0000")
    extra = make_bundle(work, "1.8")
    (extra / "extra.cfg").write_text("x")
    refused(state_dir, "images", "publish", str(extra), needle="extra.cfg: not listed in the manifest's files")
    missing = make_bundle(work, "1.9")
    (missing / "initrd.gz").unlink()
    refused(state_dir, "images", "publish", str(work / "tinypxe-1.9.yaml"),
            needle="initrd.gz: listed in the manifest's files, missing from the bundle")

    # media are no VM's disk, no track's or rollout's target
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump({"vms": [{"name": "web-1", "owner": "alice", "image": "tinyiso-1.*",
                                             "ssh_keys": [tenant_key.public]}]}))
    refused(state_dir, "apply", str(spec), needle="names installer media (kind installer)")
    refused(state_dir, "rollout", "start", "tinypxe-1", needle="names netboot media (kind netboot)")


# Hostile media, each made in WORK for a fresh catalog in STATE_DIR: what to publish, and what its
# one-line refusal says (it names the file: the needle starts with it).
Hostile = Callable[[Path, Path], tuple[Path, str]]


def truncated(cut: int, manifest_follows: bool) -> Hostile:
    """make_iso's ISO cut at byte ``cut``; its manifest the full ISO's, or the cut bytes' (size,
    sha256) so that only the ISO's own sizes can tell."""
    def make(work: Path, state_dir: Path) -> tuple[Path, str]:
        iso = make_iso(work)
        full = iso.stat().st_size
        assert cut < full
        os.truncate(iso, cut)
        if not manifest_follows:
            return iso, f"{iso}: {cut} bytes differs from the manifest's size {full}"
        edit_manifest(iso.with_suffix(".yaml"), size=cut, sha256=_sha256(iso.read_bytes()))
        if cut < media.HEAD_BYTES:
            return iso, f"{iso}: too short for an ISO 9660 image ({cut} bytes; its primary volume descriptor ends"
        return iso, f"{iso}: truncated: its volume is {full} bytes, the file {cut}"
    return make


def sparse(iso_head: bool, max_virtual_size: int | None) -> Hostile:
    """x.iso, a sparse 3 GiB file: all zeros, its manifest saying 3 GiB; or make_iso's ISO (and
    manifest) followed by zeros. ``max_virtual_size`` set in the config, or the default (64 GiB)."""
    def make(work: Path, state_dir: Path) -> tuple[Path, str]:
        x = work / "x.iso"
        iso = make_iso(work)
        full = iso.stat().st_size
        shutil.copyfile(iso.with_suffix(".yaml"), x.with_suffix(".yaml"))
        if iso_head:
            shutil.copyfile(iso, x)
        else:
            x.touch()
            edit_manifest(x.with_suffix(".yaml"), size=3 * GiB)
        os.truncate(x, 3 * GiB)
        if max_virtual_size is None:
            if iso_head:
                return x, f"{x}: {3 * GiB} bytes differs from the manifest's size {full}"
            return x, f"{x}: not an ISO 9660 image (no CD001 at byte 32769)"
        (state_dir / "config.yaml").write_text(f"state_dir: {state_dir}\nmax_virtual_size: {max_virtual_size}\n")
        return x, f"{x}: {3 * GiB} bytes (3.0 GiB) is larger than an installer ISO may be: max_virtual_size is"
    return make


def symlink(work: Path, state_dir: Path) -> tuple[Path, str]:
    iso = make_iso(work)
    link = work / "link" / iso.name
    link.parent.mkdir()
    link.symlink_to(iso)
    shutil.copyfile(iso.with_suffix(".yaml"), link.with_suffix(".yaml"))
    return link, f"{link}: is a symbolic link; publish the file itself"


def iso_as_disk(work: Path, state_dir: Path) -> tuple[Path, str]:
    x = make_iso(work).rename(work / "x.qcow2")
    x.with_suffix(".yaml").write_text(yaml.safe_dump({
        "name": "tiny", "family": 1, "version": "1.4", "sha256": _sha256(x.read_bytes()), "format": "qcow2",
        "virtual_size": 64 << 20, "firmware": "bios"}))
    return x, f"{x}: not a qcow2 image (magic 00000000); it looks like an ISO 9660 image"


def disk_as_iso(work: Path, state_dir: Path) -> tuple[Path, str]:
    iso = make_iso(work)
    iso.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(iso), "64M"], check=True, capture_output=True)
    edit_manifest(iso.with_suffix(".yaml"), size=iso.stat().st_size, sha256=_sha256(iso.read_bytes()))
    return iso, f"{iso}: not an ISO 9660 image (no CD001 at byte 32769); it is qcow2"


def bundle_without_kernel(work: Path, state_dir: Path) -> tuple[Path, str]:
    bundle = make_bundle(work)
    manifest = work / f"{bundle.name}.yaml"
    edit_manifest(manifest, drop="kernel")
    return bundle, f"{manifest}: kernel: a netboot bundle names it"


@pytest.mark.parametrize("hostile", [
    pytest.param(truncated(media.PVD + 1024, manifest_follows=False), id="cut-in-primary-descriptor"),
    pytest.param(truncated(media.PVD + 1024, manifest_follows=True), id="cut-in-primary-descriptor-manifest-follows"),
    pytest.param(truncated(media.HEAD_BYTES + 1024, manifest_follows=True), id="cut-in-joliet-descriptor"),
    pytest.param(truncated(DESCRIPTORS_END + 4 * media.SECTOR, manifest_follows=False), id="cut-after-descriptors"),
    pytest.param(truncated(DESCRIPTORS_END + 4 * media.SECTOR, manifest_follows=True),
                 id="cut-after-descriptors-manifest-follows"),
    pytest.param(sparse(iso_head=False, max_virtual_size=None), id="sparse-3g-zeros"),
    pytest.param(sparse(iso_head=True, max_virtual_size=None), id="sparse-3g-after-an-iso"),
    pytest.param(sparse(iso_head=True, max_virtual_size=GiB), id="sparse-3g-over-max-virtual-size"),
    pytest.param(symlink, id="symlink-to-an-iso"),
    pytest.param(iso_as_disk, id="iso-named-qcow2"),
    pytest.param(disk_as_iso, id="qcow2-named-iso"),
    pytest.param(bundle_without_kernel, id="bundle-manifest-without-kernel"),
])
def test_hostile_media_refused_before_a_byte_is_stored(state_dir: Path, hostile: Hostile) -> None:
    work = state_dir / "work"
    work.mkdir()
    path, needle = hostile(work, state_dir)
    took = refused(state_dir, "images", "publish", str(path), needle=needle)
    # refused from the manifest, the size and the first bytes: a 3 GiB file is not read, let alone copied
    assert took < 5, f"{took:.1f} s"  # nothing copied: a copy of 3 GiB takes far longer
