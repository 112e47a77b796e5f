"""The guest OS compatibility list as pure logic: libvirt's domain capabilities (captured from
``virsh domcapabilities --virttype qemu --machine q35 --arch x86_64`` on Debian 12, libvirt 9.0 and
QEMU 7.2, CPU models left out) and QEMU's firmware descriptors parsed, an image's needs checked
against host values given here, and the catalog's refusals and skips with those values injected.
The same against the real libvirtd and CLI: tests/integration/test_compat.py."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.catalog import Catalog
from agent.compat import (
    BASE_DEVICES,
    Device,
    HostCaps,
    Needs,
    check,
    choose_uefi,
    host_caps,
    parse_domcaps,
    parse_qemu_version,
    read_descriptors,
)
from agent.config import Config
from agent.domxml import FALLBACK_UEFI, Domain, Firmware, Metadata, UefiPaths, from_xml, to_xml
from agent.errors import Conflict, ImageRefused, InputError, NotFound
from agent.manifest import Manifest, load_manifest
from agent.rollout import Rollouts
from agent.state import ImageRow, ImageState, State
from agent.version import Track
from tests.unit.hostcaps import CAPS, DESCRIPTORS, DOMCAPS, OVMF, QEMU_7_2_22, descriptor

pytestmark = pytest.mark.unit



# -- reading what libvirt and QEMU say -------------------------------------------------------------

def test_domain_capabilities_are_parsed() -> None:
    dc = parse_domcaps(DOMCAPS)
    assert dc.machine == "pc-q35-7.2" and dc.efi
    assert [p.name for p in dc.loaders] == ["OVMF_CODE_4M.ms.fd", "OVMF_CODE_4M.secboot.fd", "OVMF_CODE_4M.fd"]
    assert dc.devices == set(Device)


def test_host_caps_take_the_loader_without_secure_boot_and_its_descriptors_template() -> None:
    assert CAPS.qemu == (7, 2, 22) and CAPS.machine == "pc-q35-7.2"
    assert CAPS.uefi == UefiPaths(Path(f"{OVMF}/OVMF_CODE_4M.fd"), Path(f"{OVMF}/OVMF_VARS_4M.fd"))
    assert CAPS.describe()["firmware"]["loader"] == f"{OVMF}/OVMF_CODE_4M.fd"


def test_a_loader_is_chosen_from_libvirts_list_not_the_constants() -> None:
    other = [Path("/opt/edk2/CODE.fd")]
    desc = [descriptor("/opt/edk2/CODE.fd", "/opt/edk2/VARS.fd", [])]
    assert choose_uefi(other, desc) == UefiPaths(Path("/opt/edk2/CODE.fd"), Path("/opt/edk2/VARS.fd"))
    # secure boot by name, or by the descriptor's features; a loader no descriptor names has no template
    assert choose_uefi([Path(f"{OVMF}/OVMF_CODE_4M.secboot.fd")], DESCRIPTORS) is None
    assert choose_uefi([Path("/opt/CODE.fd")], [descriptor("/opt/CODE.fd", "/opt/V.fd", ["secure-boot"])]) is None
    assert choose_uefi(other, []) is None


def test_descriptors_are_read_by_name_etc_first(tmp_path: Path) -> None:
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    for d in (etc, usr):
        d.mkdir()
    (usr / "60-edk2.json").write_text('{"description": "usr"}')
    (etc / "60-edk2.json").write_text('{"description": "etc"}')
    (usr / "10-bad.json").write_text("{not json")
    (usr / "50-other.json").write_text('{"description": "other"}')
    assert [d["description"] for d in read_descriptors([etc, usr, tmp_path / "missing"])] == ["other", "etc"]


def test_libvirt_refusing_the_machine_leaves_no_machine_and_says_why() -> None:
    caps = host_caps(QEMU_7_2_22, "kvm", "q35", None, "KVM is not supported by '/usr/bin/qemu-system-x86_64'")
    assert caps.machine is None and caps.uefi is None and not caps.devices
    assert check(Needs(), caps) == ["machine: needs q35, and libvirt offers none here "
                                    "(KVM is not supported by '/usr/bin/qemu-system-x86_64')"]
    assert host_caps(QEMU_7_2_22, "qemu", "q35", "<capabilities/>").machine is None


# -- checking needs --------------------------------------------------------------------------------

def test_an_ordinary_image_runs_here() -> None:
    assert check(Needs(), CAPS) == []
    assert check(Needs(min_qemu="7.2.22", firmware=Firmware.UEFI, devices=(Device.CDROM,)), CAPS) == []


def test_min_qemu_is_compared_numerically_and_named_with_both_versions() -> None:
    assert parse_qemu_version("7.10") > parse_qemu_version("7.9")
    assert check(Needs(min_qemu="99.0"), CAPS) == ["min_qemu: needs QEMU 99.0, this host runs 7.2.22"]
    assert check(Needs(min_qemu="7.2.23"), CAPS) == ["min_qemu: needs QEMU 7.2.23, this host runs 7.2.22"]
    assert check(Needs(min_qemu="7.10"), dataclasses.replace(CAPS, qemu=(7, 9, 0))) != []
    for bad in ("7", "7.2.1.0", "07.2", "x"):
        with pytest.raises(ValueError, match=r"accepted: X\.Y or X\.Y\.Z"):
            parse_qemu_version(bad)


def test_uefi_without_a_usable_loader_is_unmet() -> None:
    no_efi = host_caps(QEMU_7_2_22, "qemu", "q35", DOMCAPS.replace("<value>efi</value>", ""), descriptors=DESCRIPTORS)
    assert no_efi.loaders == () and no_efi.uefi is None
    assert check(Needs(firmware=Firmware.UEFI), no_efi) == [
        "firmware: uefi needs an OVMF loader, and libvirt offers none here"]
    only_secure = dataclasses.replace(CAPS, loaders=CAPS.loaders[:2], uefi=None)
    [line] = check(Needs(firmware=Firmware.UEFI), only_secure)
    assert line.startswith("firmware: uefi needs an OVMF loader without secure boot") and "secboot" in line
    bare = dataclasses.replace(CAPS, loaders=(), uefi=None)
    assert check(Needs(firmware=Firmware.UEFI), bare) == [
        "firmware: uefi needs an OVMF loader, and libvirt offers none here"]
    assert check(Needs(firmware=Firmware.BIOS), bare) == []


def test_devices_every_domain_uses_are_needed_and_a_manifests_own_too() -> None:
    no_rng = host_caps(QEMU_7_2_22, "qemu", "q35", DOMCAPS.replace("<rng supported='yes'>", "<rng supported='no'>"),
                       descriptors=DESCRIPTORS)
    assert Device.VIRTIO_RNG in BASE_DEVICES and Device.VIRTIO_RNG not in no_rng.devices
    [line] = check(Needs(), no_rng)
    assert line.startswith("devices: needs virtio-rng; this host offers cdrom, qemu-guest-agent")
    no_cdrom = dataclasses.replace(CAPS, devices=CAPS.devices - {Device.CDROM})
    assert check(Needs(), no_cdrom) == []
    assert check(Needs(devices=(Device.CDROM,)), no_cdrom)[0].startswith("devices: needs cdrom;")


def test_every_unmet_need_is_its_own_line() -> None:
    old = dataclasses.replace(CAPS, qemu=(6, 2, 0), uefi=None, loaders=())
    lines = check(Needs(min_qemu="7.2", firmware=Firmware.UEFI), old)
    assert [x.split(":")[0] for x in lines] == ["min_qemu", "firmware"] and all("\n" not in x for x in lines)


def test_stored_manifests_give_needs_with_defaults() -> None:
    assert Needs.stored({}) == Needs()
    assert Needs.stored({"firmware": "uefi", "min_qemu": "8.0", "devices": ["cdrom"]}) == \
        Needs("8.0", "q35", Firmware.UEFI, (Device.CDROM,))


# -- the manifest's fields -------------------------------------------------------------------------

GOOD: dict[str, Any] = {"name": "tiny", "family": 1, "version": "1.7", "sha256": "a" * 64, "format": "qcow2",
                        "virtual_size": 1 << 20, "firmware": "bios", "machine": "q35", "min_qemu": "7.2"}


def load(tmp_path: Path, **override: Any) -> Manifest:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({**GOOD, **override}))
    return load_manifest(p)


def test_manifest_devices_default_empty_and_take_known_names(tmp_path: Path) -> None:
    assert load(tmp_path).devices == ()
    assert load(tmp_path, devices=["cdrom", "virtio-rng"]).devices == (Device.CDROM, Device.VIRTIO_RNG)


@pytest.mark.parametrize("override,needle", [
    ({"devices": ["floppy"]}, "m.yaml: devices: Value error, 'floppy' is not a device hvagent checks; "
                              "accepted: virtio-blk, virtio-net, virtio-rng, qemu-guest-agent, serial, cdrom"),
    ({"devices": "cdrom"}, "devices: Value error, must be a list of device names; accepted: virtio-blk"),
    ({"devices": [{"a": 1}]}, "devices: .* is not a device hvagent checks"),
    ({"min_qemu": "99"}, "min_qemu: Value error, '99' is not a QEMU version; accepted: X.Y or X.Y.Z"),
])
def test_bad_needs_are_refused_naming_the_field(tmp_path: Path, override: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        load(tmp_path, **override)


# -- the UEFI pair in the domain XML ---------------------------------------------------------------

def uefi_domain(uefi: UefiPaths | None) -> Domain:
    return Domain(name="u", uuid="5a0c1c3e-2b64-4d8e-9f3a-0c8d2b7e6a11", memory_mib=128, vcpus=1,
                  firmware=Firmware.UEFI, console_log=Path("/v/console.log"), nvram=Path("/v/VARS.fd"),
                  metadata=Metadata("o", "t-1.*", "t", "1.0", "i", None, "h"), uefi=uefi)


def test_the_chosen_pair_is_rendered_and_parsed_back() -> None:
    chosen = UefiPaths(Path("/opt/edk2/CODE.fd"), Path("/opt/edk2/VARS.fd"))
    xml = to_xml(uefi_domain(chosen))
    assert "<loader readonly=\"yes\" secure=\"no\" type=\"pflash\">/opt/edk2/CODE.fd</loader>" in xml
    assert "template=\"/opt/edk2/VARS.fd\"" in xml
    assert from_xml(xml) == uefi_domain(chosen)
    # not chosen (Virt.define chooses): the fallback pair, which parses back as not chosen
    assert f"<loader readonly=\"yes\" secure=\"no\" type=\"pflash\">{FALLBACK_UEFI.code}</loader>" in \
        to_xml(uefi_domain(None))
    assert from_xml(to_xml(uefi_domain(None))).uefi is None


def test_a_loader_on_a_bios_domain_is_refused() -> None:
    with pytest.raises(InputError, match="a UEFI loader is only for uefi firmware"):
        dataclasses.replace(uefi_domain(FALLBACK_UEFI), firmware=Firmware.BIOS, nvram=None)


# -- the catalog with the host's values injected ---------------------------------------------------

@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = State(Config(state_dir=tmp_path).db_path)
    yield s
    s.close()


def row(tmp_path: Path, version: str, min_qemu: str = "7.2") -> ImageRow:
    major, minor = version.split(".")
    manifest = {**GOOD, "version": version, "min_qemu": min_qemu, "devices": []}
    return ImageRow("tiny", version, int(major), int(minor), "0" * 64, str(tmp_path / f"tiny-{version}.qcow2"),
                    1 << 20, ImageState.ACTIVE, manifest, 0.0)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_publish_refuses_an_image_this_host_cannot_run_before_writing(tmp_path: Path, state: State) -> None:
    path = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    data = path.read_bytes()
    catalog = Catalog(Config(state_dir=tmp_path), state, caps=lambda: CAPS)
    m = Manifest.model_validate({**GOOD, "sha256": hashlib.sha256(data).hexdigest(), "min_qemu": "99.0"})
    with pytest.raises(ImageRefused) as ei:
        catalog.publish_stream(io.BytesIO(data), m, "in.qcow2", len(data))
    assert ei.value.message == ("in.qcow2: this host cannot run tiny-1.7: "
                                "min_qemu: needs QEMU 99.0, this host runs 7.2.22")
    assert not catalog.store.exists() and state.images() == [] and state.pending() == []
    runs = Manifest.model_validate({**m.model_dump(), "min_qemu": "7.2"})
    published = catalog.publish_stream(io.BytesIO(data), runs, "in.qcow2", len(data))
    assert published.manifest["devices"] == [] and catalog.compat()["images"][0]["runs"]


def test_a_track_skips_versions_this_host_cannot_run_and_use_refuses_them(tmp_path: Path, state: State) -> None:
    for r in (row(tmp_path, "1.0"), row(tmp_path, "1.1"), row(tmp_path, "1.2", min_qemu="99.0")):
        state.add_image(r)
    catalog = Catalog(Config(state_dir=tmp_path, canary=False), state, caps=lambda: CAPS)
    assert catalog.resolve(Track("tiny", 1, None)).version == "1.1"
    assert catalog.resolve(Track("tiny", 1, 2)).version == "1.2"  # a pin names it: use refuses it
    with pytest.raises(Conflict, match=r"^image tiny-1.2: this host cannot run it: min_qemu: needs QEMU 99.0, "
                                       r"this host runs 7.2.22$"):
        catalog.base_for_use(catalog.get("tiny-1.2"))
    [(skipped, why)] = catalog.unrunnable("tiny", 1, newest_only=True)
    assert skipped.ref == "tiny-1.2" and why == ["min_qemu: needs QEMU 99.0, this host runs 7.2.22"]
    report = catalog.compat()
    assert [(i["image"], i["runs"]) for i in report["images"]] == [("tiny-1.0", True), ("tiny-1.1", True),
                                                                   ("tiny-1.2", False)]
    assert report["host"]["qemu"] == "7.2.22"
    # a rollout never targets it, and says why
    rollouts = Rollouts(catalog.cfg, state, catalog, None, None)  # type: ignore[arg-type]
    assert rollouts.start("tiny", 1) is None
    assert any(e.kind == "rollout.skipped" and e.message.startswith("tiny-1.2 is not a target: this host cannot "
                                                                     "run it (min_qemu: needs QEMU 99.0")
               for e in state.events())
    # nothing in the family runs here: the track names why
    old = dataclasses.replace(CAPS, qemu=(6, 2, 0))
    with pytest.raises(NotFound, match=r"tiny-1\.\* has no active version this host can run \(tiny-1.2: min_qemu"):
        Catalog(catalog.cfg, state, caps=lambda: old).resolve(Track("tiny", 1, None))


def test_caps_from_a_fake_host_are_plain_values() -> None:
    caps = HostCaps((8, 0, 0), "kvm", "q35", "pc-q35-8.0", devices=frozenset(Device))
    assert check(Needs(min_qemu="8.0"), caps) == []
