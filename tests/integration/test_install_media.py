"""The tiny family's installer media and the images installed from them, on real QEMU (TCG).

images/build-installer writes an El Torito ISO (BIOS and UEFI) and a PXE bundle; images/build-from-iso
boots one of them in a throwaway VM on a blank disk and writes the installed image. An installed image
is, byte for byte, the image images/build writes for the same version, and it publishes and rolls
out over a VM on the family's latest track like any other version. Each install is one short
QEMU run (about 10 s to 20 s here).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.host import Host
from agent.seed import KeyPair
from agent.spec import parse_spec
from agent.state import RolloutState
from tests.conftest import ROOT, image
from tests.integration.test_rollout import guest, version_id

pytestmark = pytest.mark.integration
IMAGES = ROOT / "images"
CACHE = IMAGES / "cache"


def _run(tool: str, *args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(IMAGES / tool), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(family: int, version: str, out: Path) -> Path:
    r = _run("build", "--family", family, "--version", version, "--out", out, "--cache", CACHE)
    assert r.returncode == 0, r.stderr
    return out / f"tiny-{version}.qcow2"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyiso-1.4.iso and tinypxe-1.4/ with their manifests."""
    if not shutil.which("xorriso"):
        pytest.fail("xorriso is missing: run .ci/host-setup (Debian package xorriso)")
    out = tmp_path_factory.mktemp("media")
    r = _run("build-installer", "--family", 1, "--version", "1.4", "--out", out, "--cache", CACHE)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def built_1_4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-1.4 as images/build writes it: what every install of 1.4 must equal."""
    return _build(1, "1.4", tmp_path_factory.mktemp("built"))


def test_installer_iso_boots_on_bios_and_uefi(media: Path) -> None:
    iso = media / "tinyiso-1.4.iso"
    m = yaml.safe_load((media / "tinyiso-1.4.yaml").read_text())
    assert (m["name"], m["kind"], m["format"], m["family"], m["version"]) == ("tinyiso", "installer", "iso", 1, "1.4")
    assert m["firmware"] == ["bios", "uefi"] and m["sha256"] == _sha256(iso) and m["size"] == iso.stat().st_size
    assert m["installs"]["name"] == "tiny" and m["installs"]["version"] == "1.4"
    with open(iso, "rb") as f:
        f.seek(32769)
        assert f.read(5) == b"CD001"
    report = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"], capture_output=True,
                            text=True, check=True).stdout
    platforms = [ln.split()[6] for ln in report.splitlines() if ln.startswith("El Torito boot img")]
    assert platforms == ["BIOS", "UEFI"], report


def test_installer_build_is_reproducible(media: Path, tmp_path: Path) -> None:
    r = _run("build-installer", "--family", 1, "--version", "1.4", "--iso", "--out", tmp_path, "--cache", CACHE)
    assert r.returncode == 0, r.stderr
    assert _sha256(tmp_path / "tinyiso-1.4.iso") == _sha256(media / "tinyiso-1.4.iso")


def test_pxe_bundle_lists_its_files(media: Path) -> None:
    bundle = media / "tinypxe-1.4"
    m = yaml.safe_load((media / "tinypxe-1.4.yaml").read_text())
    assert (m["kind"], m["format"], m["bootfile"]) == ("netboot", "pxe", "pxelinux.0")
    assert {m["kernel"], m["initrd"], "pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default"} <= set(m["files"])
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == set(m["files"])
    assert all(_sha256(bundle / f) == s for f, s in m["files"].items())
    assert m["cmdline"] in (bundle / "pxelinux.cfg/default").read_text()


def test_install_from_iso_is_the_built_image_and_rolls_out_over_a_1x_vm(media: Path, built_1_4: Path,
                                                                          state_dir: Path, host: Host,
                                                                          tenant_key: KeyPair) -> None:
    # state_dir: libvirt's QEMU user must reach the image (pytest's tmp_path is 0700)
    r = _run("build-from-iso", "--iso", media / "tinyiso-1.4.iso", "--out", state_dir, "--cache", CACHE)
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    assert "tinyinst: installed tiny 1.4 on /dev/vda" in r.stdout
    installed = state_dir / "tiny-1.4.qcow2"
    assert installed.read_bytes() == built_1_4.read_bytes()
    assert installed.with_suffix(".yaml").read_text() == built_1_4.with_suffix(".yaml").read_text()
    # published like any version, it is what a VM on the family's latest track moves to
    host.catalog.publish(image("tiny-1.0"))
    [vm] = parse_spec({"vms": [{"name": "t-installed", "owner": "alice", "image": "tiny-1.*", "data_disk": 1,
                                "ssh_keys": [tenant_key.public]}]}).vms
    host.provisioner.create(vm)
    host.provisioner.wait(vm.name)
    guest(host, vm.name, tenant_key, "echo kept > /data/f && sync")
    ro = host.rollouts.on_publish(host.catalog.publish(installed))
    assert ro is not None and host.rollouts.run(ro.id).state is RolloutState.DONE
    row = host.state.vm(vm.name)
    assert row is not None and (row.version, str(row.state)) == ("1.4", "running"), row
    assert version_id(host, vm.name, tenant_key) == "1.4"
    assert guest(host, vm.name, tenant_key, "cat /data/f").strip() == "kept"


def test_install_over_pxe_is_the_built_image(media: Path, built_1_4: Path, tmp_path: Path) -> None:
    r = _run("build-from-iso", "--pxe", media / "tinypxe-1.4", "--out", tmp_path, "--cache", CACHE)
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    assert "from the network (TFTP)" in r.stdout
    assert (tmp_path / "tiny-1.4.qcow2").read_bytes() == built_1_4.read_bytes()


def test_install_from_iso_under_uefi_is_the_built_image(tmp_path: Path) -> None:
    media, out, built = tmp_path / "media", tmp_path / "out", tmp_path / "built"
    for d in (media, out, built):
        d.mkdir()
    r = _run("build-installer", "--family", 2, "--version", "2.4", "--iso", "--out", media, "--cache", CACHE)
    assert r.returncode == 0, r.stderr
    r = _run("build-from-iso", "--iso", media / "tinyiso-2.4.iso", "--out", out, "--cache", CACHE)
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    assert "uefi, installer from CD-ROM" in r.stdout
    assert (out / "tiny-2.4.qcow2").read_bytes() == _build(2, "2.4", built).read_bytes()


@pytest.mark.parametrize("case,needle", [
    ("qcow2-as-iso", "--iso"),
    ("no-manifest", "manifest"),
    ("tampered", "sha256"),
    ("wrong-version", "version"),
    ("small-disk", "disk-size"),
    ("bad-size", "disk-size"),
    ("uefi-pxe", "firmware"),
    ("pxe-missing-kernel", "kernel"),
])
def test_build_from_iso_bad_input(media: Path, tmp_path: Path, case: str, needle: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    iso, man = src / "tinyiso-1.4.iso", src / "tinyiso-1.4.yaml"
    shutil.copyfile(media / "tinyiso-1.4.iso", iso)
    shutil.copyfile(media / "tinyiso-1.4.yaml", man)
    args: list[object] = ["--iso", iso]
    if case == "qcow2-as-iso":
        disk = src / "tiny-1.4.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        args = ["--iso", disk]
    elif case == "no-manifest":
        man.unlink()
    elif case == "tampered":
        with open(iso, "r+b") as f:
            f.seek(40000)
            f.write(b"tampered")
    elif case == "wrong-version":
        args += ["--version", "1.9"]
    elif case == "small-disk":
        args += ["--disk-size", "32M"]
    elif case == "bad-size":
        args += ["--disk-size", "1T"]
    elif case in ("uefi-pxe", "pxe-missing-kernel"):
        bundle = src / "tinypxe-1.4"
        shutil.copytree(media / "tinypxe-1.4", bundle)
        shutil.copyfile(media / "tinypxe-1.4.yaml", src / "tinypxe-1.4.yaml")
        args = ["--pxe", bundle]
        if case == "uefi-pxe":
            args += ["--firmware", "uefi"]
        else:
            (bundle / "vmlinuz").chmod(0o644)
            (bundle / "vmlinuz").unlink()
    r = _run("build-from-iso", *args, "--out", out, "--cache", tmp_path / "cache", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(out.iterdir()) == []
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_build_installer_bad_input(tmp_path: Path) -> None:
    for args, needle in ((["--family", "3", "--version", "3.0"], "family"),
                         (["--family", "1", "--version", "2.0"], "family"),
                         (["--family", "1", "--version", "1.x"], "version")):
        r = _run("build-installer", *args, "--out", tmp_path, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []
