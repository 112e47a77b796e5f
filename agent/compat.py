"""The host's guest OS compatibility list: what an image needs against what this host offers.

An image's needs are in its manifest: a minimum QEMU, a machine type, a firmware, devices. What the
host offers comes from libvirt: the QEMU version it runs and its domain capabilities for the
machine (``getDomainCapabilities``): the canonical machine, the UEFI loaders, the device models.
``check`` compares them: pure logic, one line per unmet need (invariant 12). The OVMF pair hvagent
boots UEFI guests with comes from here too: a loader libvirt lists and the NVRAM template QEMU's
firmware descriptor gives it.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.domxml import Firmware, UefiPaths

if TYPE_CHECKING:
    from agent.manifest import Manifest

# Where QEMU's firmware descriptors live; libvirt reads the same, /etc first.
DESCRIPTOR_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
# Loader builds with secure boot (Debian's names; edk2 descriptors also say so in "features"): they
# need SMM and secure='yes', which hvagent's domains do not ask for.
_SECURE_MARKERS = (".ms.", ".secboot.", ".snakeoil.", "secure")
_SECURE_FEATURES = frozenset({"secure-boot", "requires-smm", "enrolled-keys"})
_QEMU_RE = re.compile(r"^(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})(?:\.(0|[1-9][0-9]{0,3}))?$")

QemuVersion = tuple[int, int, int]


class Device(StrEnum):
    """The devices a manifest may say it needs (and the host's capabilities are read for)."""

    VIRTIO_BLK = "virtio-blk"
    VIRTIO_NET = "virtio-net"
    VIRTIO_RNG = "virtio-rng"
    GUEST_AGENT = "qemu-guest-agent"
    SERIAL = "serial"
    CDROM = "cdrom"


# What every domain hvagent defines uses (domxml.Domain): a manifest needs them without saying so.
BASE_DEVICES = (Device.VIRTIO_BLK, Device.VIRTIO_NET, Device.VIRTIO_RNG, Device.GUEST_AGENT, Device.SERIAL)


def parse_qemu_version(text: str) -> QemuVersion:
    """``X.Y`` or ``X.Y.Z`` in decimal, compared numerically (7.10 > 7.9); ValueError otherwise."""
    m = _QEMU_RE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a QEMU version; accepted: X.Y or X.Y.Z, e.g. 7.2")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def qemu_from_libvirt(version: int) -> QemuVersion:
    """libvirt's ``getVersion``: major * 1,000,000 + minor * 1,000 + micro."""
    return version // 1_000_000, version // 1000 % 1000, version % 1000


def show(v: QemuVersion) -> str:
    return ".".join(map(str, v))


@dataclass(frozen=True)
class Needs:
    """What an image needs from the host, from its manifest."""

    min_qemu: str = "7.2"
    machine: str = "q35"
    firmware: Firmware = Firmware.BIOS
    devices: tuple[Device, ...] = ()

    @classmethod
    def of(cls, m: Manifest) -> Needs:
        return cls(m.min_qemu, m.machine, m.firmware, m.devices)

    @classmethod
    def stored(cls, manifest: Mapping[str, Any]) -> Needs:
        """From a catalog row's manifest (validated at publish; a key it lacks takes its default)."""
        d = cls()
        return cls(str(manifest.get("min_qemu", d.min_qemu)), str(manifest.get("machine", d.machine)),
                   Firmware(manifest.get("firmware", d.firmware)),
                   tuple(Device(x) for x in manifest.get("devices", ())))

    @property
    def all_devices(self) -> tuple[Device, ...]:
        return BASE_DEVICES + tuple(d for d in self.devices if d not in BASE_DEVICES)


@dataclass(frozen=True)
class DomCaps:
    """What libvirt's domain capabilities say, parsed (see ``parse_domcaps``)."""

    machine: str
    efi: bool
    loaders: tuple[Path, ...]
    devices: frozenset[Device]


@dataclass(frozen=True)
class HostCaps:
    """What this host offers images: read from libvirt once per use (``Virt.host_caps``)."""

    qemu: QemuVersion
    virttype: str                 # the domain type the capabilities were asked for: kvm or qemu
    machine_alias: str            # the machine asked for (q35)
    machine: str | None           # libvirt's canonical name for it (pc-q35-7.2); None: not offered
    loaders: tuple[Path, ...] = ()
    uefi: UefiPaths | None = None  # the OVMF pair hvagent uses; None: no usable loader
    devices: frozenset[Device] = frozenset()
    why: str = ""                 # what libvirt said when it gave no capabilities

    def describe(self) -> dict[str, Any]:
        return {"qemu": show(self.qemu), "virttype": self.virttype,
                "machine": {"asked": self.machine_alias, "canonical": self.machine},
                "firmware": {"bios": True, "uefi": self.uefi is not None,
                             "loaders": [str(p) for p in self.loaders],
                             "loader": str(self.uefi.code) if self.uefi else None,
                             "nvram_template": str(self.uefi.vars) if self.uefi else None},
                "devices": sorted(self.devices), **({"error": self.why} if self.why else {})}


def _values(el: ET.Element | None, enum: str) -> set[str]:
    if el is None:
        return set()
    return {(v.text or "").strip() for v in el.findall(f"enum[@name='{enum}']/value")}


def _supported(devices: ET.Element | None, tag: str) -> ET.Element | None:
    el = devices.find(tag) if devices is not None else None
    return el if el is not None and el.get("supported") == "yes" else None


def parse_domcaps(xml: str) -> DomCaps:
    """libvirt's ``<domainCapabilities>`` for one machine. ValueError if it is not that document."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"domain capabilities: not well-formed ({e})") from None
    if root.tag != "domainCapabilities":
        raise ValueError(f"domain capabilities: root element is <{root.tag}>")
    os_el = root.find("os")
    os_ok = os_el is not None and os_el.get("supported") == "yes"
    loader = os_el.find("loader") if os_ok and os_el is not None else None
    loaders = tuple(Path((v.text or "").strip()) for v in loader.findall("value")) \
        if loader is not None and loader.get("supported") == "yes" else ()
    devices = root.find("devices")
    disk, rng = _supported(devices, "disk"), _supported(devices, "rng")
    offered: set[Device] = set()
    if "virtio" in _values(disk, "bus"):
        # libvirt does not list NIC models; virtio-net rides on the same virtio-pci transport.
        offered |= {Device.VIRTIO_BLK, Device.VIRTIO_NET}
    if "cdrom" in _values(disk, "diskDevice"):
        offered.add(Device.CDROM)
    if "virtio" in _values(rng, "model") and "random" in _values(rng, "backendModel"):
        offered.add(Device.VIRTIO_RNG)
    # <channel> and <console> appeared in later libvirt releases: absent means not reported,
    # and unix channels and a pty serial console are older than any libvirt hvagent runs on.
    channel = devices.find("channel") if devices is not None else None
    if channel is None or "unix" in _values(_supported(devices, "channel"), "type"):
        offered.add(Device.GUEST_AGENT)
    console = devices.find("console") if devices is not None else None
    if console is None or "pty" in _values(_supported(devices, "console"), "type"):
        offered.add(Device.SERIAL)
    return DomCaps(machine=(root.findtext("machine") or "").strip(),
                   efi="efi" in _values(os_el, "firmware") if os_ok else False,
                   loaders=loaders, devices=frozenset(offered))


def read_descriptors(dirs: Iterable[Path] = DESCRIPTOR_DIRS) -> list[dict[str, Any]]:
    """QEMU's firmware descriptors (``*.json``), by file name; one in /etc hides its namesake."""
    seen: dict[str, dict[str, Any]] = {}
    for d in dirs:
        try:
            files = sorted(d.glob("*.json"))
        except OSError:
            continue
        for f in files:
            if f.name in seen:
                continue
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # unreadable or not JSON: libvirt skips it too
            if isinstance(data, dict):
                seen[f.name] = data
    return [seen[k] for k in sorted(seen)]


def _descriptor_for(loader: Path, descriptors: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for desc in descriptors:
        mapping = desc.get("mapping")
        if isinstance(mapping, dict) and mapping.get("device") == "flash" \
                and (mapping.get("executable") or {}).get("filename") == str(loader):
            return desc
    return None


def is_secure(loader: Path, descriptors: Iterable[Mapping[str, Any]] = ()) -> bool:
    desc = _descriptor_for(loader, descriptors)
    features = set(desc.get("features") or ()) if desc is not None else set()
    return any(m in loader.name.lower() for m in _SECURE_MARKERS) or bool(features & _SECURE_FEATURES)


def choose_uefi(loaders: Iterable[Path], descriptors: Iterable[Mapping[str, Any]]) -> UefiPaths | None:
    """The first loader (libvirt's order) without secure boot whose descriptor names an NVRAM template."""
    descs = list(descriptors)
    for loader in loaders:
        if is_secure(loader, descs):
            continue
        desc = _descriptor_for(loader, descs)
        template = ((desc or {}).get("mapping", {}).get("nvram-template") or {}).get("filename")
        if isinstance(template, str) and template:
            return UefiPaths(loader, Path(template))
    return None


def host_caps(version: int, virttype: str, machine_alias: str, domcaps_xml: str | None, why: str = "",
              descriptors: Iterable[Mapping[str, Any]] = ()) -> HostCaps:
    """HostCaps from what libvirt answered: ``domcaps_xml`` None when it refused (``why``)."""
    qemu = qemu_from_libvirt(version)
    if domcaps_xml is None:
        return HostCaps(qemu, virttype, machine_alias, None, why=why)
    try:
        dc = parse_domcaps(domcaps_xml)
    except ValueError as e:
        return HostCaps(qemu, virttype, machine_alias, None, why=str(e))
    loaders = dc.loaders if dc.efi else ()  # loaders without firmware='efi' offered are of no use
    return HostCaps(qemu, virttype, machine_alias, dc.machine or None, loaders, choose_uefi(loaders, descriptors),
                    dc.devices)


def check(needs: Needs | Manifest, caps: HostCaps) -> list[str]:
    """The needs this host does not meet, each one line naming the need and the host's value."""
    if not isinstance(needs, Needs):
        needs = Needs.of(needs)
    unmet: list[str] = []
    try:
        if parse_qemu_version(needs.min_qemu) > caps.qemu:
            unmet.append(f"min_qemu: needs QEMU {needs.min_qemu}, this host runs {show(caps.qemu)}")
    except ValueError as e:
        unmet.append(f"min_qemu: {e}")
    if caps.machine is None or needs.machine != caps.machine_alias:
        unmet.append(f"machine: needs {needs.machine}, and libvirt offers none here"
                     + (f" ({caps.why})" if caps.why else ""))
    elif needs.firmware is Firmware.UEFI and caps.uefi is None:
        offered = ", ".join(str(p) for p in caps.loaders)
        unmet.append("firmware: uefi needs an OVMF loader, and libvirt offers none here" if not offered else
                     "firmware: uefi needs an OVMF loader without secure boot and with an NVRAM template, "
                     f"and libvirt offers only {offered}")
    if caps.machine is not None:
        missing = [d for d in needs.all_devices if d not in caps.devices]
        if missing:
            unmet.append(f"devices: needs {', '.join(missing)}; this host offers "
                         f"{', '.join(sorted(caps.devices)) or 'none'}")
    return unmet

