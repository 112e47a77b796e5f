"""Libvirt domain XML as typed, frozen objects.

This is the one module that knows libvirt's element names. Every class writes and parses its own
element, always as an ElementTree (never by string formatting), so untrusted values are escaped by
the serializer (invariant 7). The ``hv`` metadata namespace marks a domain as ours (invariant 9).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Self

from agent.errors import InputError

HV_NS = "https://hvagent.dev/xmlns/vm/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("hv", HV_NS)
ET.register_namespace("qemu", QEMU_NS)

# The OVMF pair a UEFI domain gets when libvirt's domain capabilities were not asked (see
# ``Domain.uefi``): Debian's non-secure-boot build.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
USERNET_ID = "hvnet0"
# A fixed slot on the root bus that libvirt's own address assignment leaves free.
USERNET_ADDR = "0x10"
# The nwfilter every interface on a libvirt network or bridge references (GuestFilter).
GUEST_FILTER = "hvagent-guest"
# The virtio-serial port name the QEMU guest agent (qemu-ga) opens in the guest.
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_TARGET_RE = re.compile(r"^vd[a-z]{1,2}$")
_FORMATS = frozenset({"qcow2", "raw"})
_RNG_SOURCES = frozenset({"/dev/urandom", "/dev/random", "/dev/hwrng"})  # what libvirt's random backend takes
_HOSTFWD_RE = re.compile(r"^tcp:127\.0\.0\.1:(\d+)-:(\d+)$")


def _hv(tag: str) -> str:
    return f"{{{HV_NS}}}{tag}"


def _qemu(tag: str) -> str:
    return f"{{{QEMU_NS}}}{tag}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _find(parent: ET.Element, path: str, what: str) -> ET.Element:
    el = parent.find(path)
    if el is None:
        raise InputError(f"domain XML: missing <{what}>")
    return el


def _text(parent: ET.Element, path: str, what: str) -> str:
    return (_find(parent, path, what).text or "").strip()


def _attr(el: ET.Element, name: str, what: str) -> str:
    value = el.get(name)
    if value is None:
        raise InputError(f"domain XML: <{what}> has no {name}=")
    return value


def _check_port(field: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise InputError(f"{field}: {port} is not a TCP port (accepted: 1-65535)")


def _check_mac(mac: str) -> None:
    # The MAC ends up inside a comma-separated QEMU option for user networking: be strict.
    if not _MAC_RE.match(mac):
        raise InputError(f"mac: {mac!r} is not a lower-case MAC address like 52:54:00:12:34:56")


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


@dataclass(frozen=True)
class UefiPaths:
    """A UEFI loader (read-only code) and the template its per-domain NVRAM is copied from."""

    code: Path = OVMF_CODE
    vars: Path = OVMF_VARS


FALLBACK_UEFI = UefiPaths()


class DomainType(StrEnum):
    QEMU = "qemu"
    KVM = "kvm"


class DiskCache(StrEnum):
    NONE = "none"
    WRITEBACK = "writeback"


@dataclass(frozen=True)
class Disk:
    path: Path
    target: str
    fmt: str = "qcow2"
    readonly: bool = False
    serial: str | None = None
    backing: Path | None = None
    cache: DiskCache = DiskCache.NONE

    def __post_init__(self) -> None:
        if not _TARGET_RE.match(self.target):
            raise InputError(f"disk target: {self.target!r} is not a virtio target like vda")
        if self.fmt not in _FORMATS:
            raise InputError(f"disk format: {self.fmt!r} (accepted: {', '.join(sorted(_FORMATS))})")
        if self.backing is not None and self.fmt != "qcow2":
            raise InputError(f"disk {self.target}: only a qcow2 overlay can have a backing file")
        if self.serial is not None and not 1 <= len(self.serial) <= 20:
            raise InputError(f"disk serial: {self.serial!r} must be 1-20 characters")

    def element(self) -> ET.Element:
        disk = ET.Element("disk", {"type": "file", "device": "disk"})
        driver = {"name": "qemu", "type": self.fmt, "cache": str(self.cache)}
        if not self.readonly:
            driver["discard"] = "unmap"
        _sub(disk, "driver", **driver)
        _sub(disk, "source", file=str(self.path))
        if self.backing is not None:
            # Spelled out so that libvirt never probes a format (invariant 7); the empty
            # <backingStore/> ends the chain: the base has no backing file of its own.
            store = _sub(disk, "backingStore", type="file")
            _sub(store, "format", type="qcow2")
            source = _sub(store, "source", file=str(self.backing))
            # The base is shared and read-only (0444, world-readable): libvirt must not chown
            # it to the QEMU user for one domain (invariant 1: it never changes).
            _sub(source, "seclabel", model="dac", relabel="no")
            _sub(store, "backingStore")
        _sub(disk, "target", dev=self.target, bus="virtio")
        if self.serial is not None:
            _sub(disk, "serial", self.serial)
        if self.readonly:
            _sub(disk, "readonly")
        return disk

    @classmethod
    def parse(cls, el: ET.Element) -> Self:
        driver = _find(el, "driver", "disk/driver")
        backing_src = el.find("backingStore/source")
        serial = el.find("serial")
        return cls(
            path=Path(_attr(_find(el, "source", "disk/source"), "file", "disk/source")),
            target=_attr(_find(el, "target", "disk/target"), "dev", "disk/target"),
            fmt=_attr(driver, "type", "disk/driver"),
            readonly=el.find("readonly") is not None,
            serial=serial.text if serial is not None else None,
            backing=Path(_attr(backing_src, "file", "backingStore/source")) if backing_src is not None else None,
            cache=DiskCache(driver.get("cache", DiskCache.NONE)),
        )


@dataclass(frozen=True)
class UserNet:
    """QEMU user networking with one forwarded port on 127.0.0.1.

    restrict=on keeps the guest from opening connections to the host or anywhere else
    (invariant 8); the host-forwarded port still reaches the guest.
    """

    mac: str
    host_port: int
    guest_port: int = 22
    restrict: bool = True

    def __post_init__(self) -> None:
        _check_mac(self.mac)
        _check_port("host_port", self.host_port)
        _check_port("guest_port", self.guest_port)

    def element(self, machine: str) -> ET.Element:
        bus = "pcie.0" if "q35" in machine else "pci.0"
        netdev = ",".join(
            [
                "user",
                f"id={USERNET_ID}",
                f"restrict={'on' if self.restrict else 'off'}",
                f"hostfwd=tcp:127.0.0.1:{self.host_port}-:{self.guest_port}",
            ]
        )
        device = f"virtio-net-pci,netdev={USERNET_ID},mac={self.mac},bus={bus},addr={USERNET_ADDR}"
        cmdline = ET.Element(_qemu("commandline"))
        for value in ("-netdev", netdev, "-device", device):
            _sub(cmdline, _qemu("arg"), value=value)
        return cmdline

    @classmethod
    def parse(cls, el: ET.Element) -> Self | None:
        args = [a.get("value", "") for a in el.findall(_qemu("arg"))]
        opts: dict[str, str] = {}
        for flag, value in itertools.pairwise(args):
            if flag in ("-netdev", "-device"):
                for part in value.split(","):
                    key, _, val = part.partition("=")
                    opts.setdefault(f"{flag}:{key}", val)
        if opts.get("-netdev:id") != USERNET_ID or "-device:mac" not in opts:
            return None
        fwd = _HOSTFWD_RE.match(opts.get("-netdev:hostfwd", ""))
        if fwd is None:
            raise InputError("domain XML: user network without a 127.0.0.1 hostfwd")
        return cls(
            mac=opts["-device:mac"],
            host_port=int(fwd.group(1)),
            guest_port=int(fwd.group(2)),
            restrict=opts.get("-netdev:restrict") == "on",
        )


@dataclass(frozen=True)
class NetworkNic:
    """A regular libvirt interface on a named network or a host bridge (exactly one).

    ``filter`` names the nwfilter the interface references; hvagent's domains always use
    :data:`GUEST_FILTER` (see :class:`GuestFilter`), None is only for parsing foreign XML.
    """

    mac: str
    network: str | None = None
    bridge: str | None = None
    filter: str | None = GUEST_FILTER

    def __post_init__(self) -> None:
        _check_mac(self.mac)
        if (self.network is None) == (self.bridge is None):
            raise InputError("nic: give exactly one of network or bridge")

    def element(self) -> ET.Element:
        kind = "network" if self.network is not None else "bridge"
        iface = ET.Element("interface", {"type": kind})
        _sub(iface, "mac", address=self.mac)
        if self.network is not None:
            _sub(iface, "source", network=self.network)
        else:
            _sub(iface, "source", bridge=str(self.bridge))
        _sub(iface, "model", type="virtio")
        if self.filter is not None:
            _sub(iface, "filterref", filter=self.filter)
        return iface

    @classmethod
    def parse(cls, el: ET.Element) -> Self:
        source = _find(el, "source", "interface/source")
        filterref = el.find("filterref")
        return cls(
            mac=_attr(_find(el, "mac", "interface/mac"), "address", "interface/mac"),
            network=source.get("network"),
            bridge=source.get("bridge"),
            filter=filterref.get("filter") if filterref is not None else None,
        )


@dataclass(frozen=True)
class GuestAgentChannel:
    """The QEMU guest agent's virtio-serial port. libvirt picks the host side's socket (and adds
    the virtio-serial controller); in a running domain's live XML its target carries
    ``state='connected'`` while a program in the guest (qemu-ga) has the port open."""

    def element(self) -> ET.Element:
        channel = ET.Element("channel", {"type": "unix"})
        _sub(channel, "target", type="virtio", name=GUEST_AGENT_PORT)
        return channel

    @staticmethod
    def find(devices: ET.Element) -> ET.Element | None:
        """The agent's ``<channel>`` among ``devices``, or None."""
        for channel in devices.findall("channel"):
            target = channel.find("target")
            if target is not None and target.get("type") == "virtio" and target.get("name") == GUEST_AGENT_PORT:
                return channel
        return None


@dataclass(frozen=True)
class Rng:
    """A virtio-rng device fed by the host's ``source``, so guests have entropy from their first
    second (host keys, TLS) instead of waiting for it under emulation."""

    source: Path = Path("/dev/urandom")

    def __post_init__(self) -> None:
        if str(self.source) not in _RNG_SOURCES:
            raise InputError(f"rng: {self.source} (accepted: {', '.join(sorted(_RNG_SOURCES))})")

    def element(self) -> ET.Element:
        rng = ET.Element("rng", {"model": "virtio"})
        _sub(rng, "backend", str(self.source), model="random")
        return rng

    @classmethod
    def parse(cls, el: ET.Element) -> Self:
        backend = _find(el, "backend", "rng/backend")
        if el.get("model") != "virtio" or backend.get("model") != "random":
            raise InputError("domain XML: <rng> is not a virtio device with a random backend")
        return cls(source=Path((backend.text or "").strip()))


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# nwfilter's protocol elements per address family: (tcp, udp, icmp, any).
_PROTOCOLS = {4: ("tcp", "udp", None, "all"), 6: ("tcp-ipv6", "udp-ipv6", "icmpv6", "all-ipv6")}
# What a guest may still reach on the host's own addresses: the network's DHCP and DNS
# (libvirt's dnsmasq listens there); IPv6 also keeps ICMPv6 for neighbour discovery.
_HOST_SERVICES = {4: (("udp", 53), ("tcp", 53), ("udp", 67)), 6: (("udp", 53), ("tcp", 53), ("udp", 547))}


@dataclass(frozen=True)
class GuestFilter:
    """The libvirt nwfilter for guests on a network or bridge: no connection to the host.

    QEMU user networking gets the same promise from ``restrict=on`` (invariant 8). On a bridge,
    a connection the guest opens to any of the host's own addresses (or to loopback) is dropped
    at its tap device, except DHCP and DNS; replies to connections the host opened (hvagent's
    health checks) still pass, as conntrack sees them ESTABLISHED. The guest's source MAC must be
    its own (libvirt's ``no-mac-spoofing``). Traffic to other machines on the network is
    untouched. libvirt applies these rules with iptables on the host-in chain, which needs
    ``net.bridge.bridge-nf-call-iptables=1`` (and ``-ip6tables``). Redefining the filter updates
    the rules of running guests.
    """

    host_addresses: tuple[IPAddress, ...]
    name: str = GUEST_FILTER

    def element(self) -> ET.Element:
        root = ET.Element("filter", {"name": self.name, "chain": "root"})
        # A fixed UUID: libvirt refuses a redefinition under the same name with another one.
        _sub(root, "uuid", str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{HV_NS}#{self.name}")))
        for addr in self.host_addresses:
            if addr.is_loopback:
                continue  # one rule per range below
            tcp, udp, icmp, any_ = _PROTOCOLS[addr.version]
            for l4, port in _HOST_SERVICES[addr.version]:
                self._rule(root, "accept", 100, tcp if l4 == "tcp" else udp, dstipaddr=str(addr),
                           dstportstart=str(port), dstportend=str(port))
            if icmp is not None:
                self._rule(root, "accept", 100, icmp, dstipaddr=str(addr))
            self._rule(root, "drop", 200, any_, dstipaddr=str(addr), state="NEW")
        self._rule(root, "drop", 200, "all", dstipaddr="127.0.0.0", dstipmask="8")
        self._rule(root, "drop", 200, "all-ipv6", dstipaddr="::1")
        _sub(root, "filterref", filter="no-mac-spoofing")
        return root

    @staticmethod
    def _rule(root: ET.Element, action: str, priority: int, proto: str, **match: str) -> None:
        rule = _sub(root, "rule", action=action, direction="out", priority=str(priority))
        _sub(rule, proto, **match)


def filter_xml(f: GuestFilter) -> str:
    root = f.element()
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


_META_FIELDS = ("owner", "track", "image", "version", "instance_id", "host_port", "spec_hash")


@dataclass(frozen=True)
class Metadata:
    """What hvagent records inside the domain; its presence means "managed by hvagent"."""

    owner: str
    track: str
    image: str
    version: str
    instance_id: str
    host_port: int | None
    spec_hash: str

    def element(self) -> ET.Element:
        vm = ET.Element(_hv("vm"))
        for field in _META_FIELDS:
            value = getattr(self, field)
            if value is not None:
                _sub(vm, _hv(field.replace("_", "-")), str(value))
        return vm

    @classmethod
    def parse(cls, vm: ET.Element) -> Self:
        values: dict[str, str | None] = {}
        for field in _META_FIELDS:
            # Any namespace: virDomainGetMetadata hands the element back without its namespace.
            child = vm.find("{*}" + field.replace("_", "-"))
            values[field] = (child.text or "") if child is not None else None
        missing = [f for f, v in values.items() if v is None and f != "host_port"]
        if missing:
            raise InputError(f"hvagent metadata: missing {', '.join(missing)}")
        port = values.pop("host_port")
        return cls(host_port=int(port) if port else None, **{k: str(v) for k, v in values.items()})


@dataclass(frozen=True, kw_only=True)
class Domain:
    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    firmware: Firmware
    machine: str = "q35"
    dtype: DomainType = DomainType.QEMU
    disks: tuple[Disk, ...] = ()
    nic: UserNet | NetworkNic | None = None
    console_log: Path
    nvram: Path | None = None
    metadata: Metadata
    guest_agent: GuestAgentChannel | None = GuestAgentChannel()
    rng: Rng | None = Rng()
    # QEMU's pvpanic device: a guest kernel that panics says so (Linux's pvpanic-mmio driver), QEMU
    # reports it and on_crash=destroy stops the domain, so a panic is seen at once (shut off,
    # crashed) instead of a guest hanging until some timeout gives up on it.
    pvpanic: bool = True
    # The OVMF pair of a UEFI domain. None: not chosen yet; Virt.define takes the one libvirt's
    # domain capabilities offer (agent.compat), and a domain rendered without it gets FALLBACK_UEFI.
    uefi: UefiPaths | None = None

    def __post_init__(self) -> None:
        try:
            canonical = str(uuidlib.UUID(self.uuid))
        except ValueError:
            raise InputError(f"uuid: {self.uuid!r} is not a UUID") from None
        if canonical != self.uuid:
            raise InputError(f"uuid: {self.uuid!r} must be written as {canonical}")
        if self.memory_mib < 16 or self.vcpus < 1:
            raise InputError(f"domain {self.name}: memory_mib >= 16 and vcpus >= 1 required")
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise InputError(f"domain {self.name}: duplicate disk targets {targets}")
        if self.nvram is not None and self.firmware is not Firmware.UEFI:
            raise InputError(f"domain {self.name}: nvram is only for uefi firmware")
        if self.uefi is not None and self.firmware is not Firmware.UEFI:
            raise InputError(f"domain {self.name}: a UEFI loader is only for uefi firmware")

    def element(self) -> ET.Element:
        root = ET.Element("domain", {"type": str(self.dtype)})
        _sub(root, "name", self.name)
        _sub(root, "uuid", self.uuid)
        metadata = _sub(root, "metadata")
        metadata.append(self.metadata.element())
        _sub(root, "memory", str(self.memory_mib), unit="MiB")
        _sub(root, "currentMemory", str(self.memory_mib), unit="MiB")
        _sub(root, "vcpu", str(self.vcpus), placement="static")
        root.append(self._os())
        features = _sub(root, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
        if self.dtype is DomainType.KVM:
            _sub(root, "cpu", mode="host-passthrough", check="none", migratable="on")
        else:
            # TCG: the emulator's "max" model offers every feature TCG implements (x86-64-v2 and
            # up), which modern guests need and qemu64 lacks.
            _sub(root, "cpu", mode="maximum", check="none", migratable="on")
        _sub(root, "clock", offset="utc")
        _sub(root, "on_poweroff", "destroy")
        _sub(root, "on_reboot", "restart")
        _sub(root, "on_crash", "destroy")
        root.append(self._devices())
        if isinstance(self.nic, UserNet):
            root.append(self.nic.element(self.machine))
        return root

    def _os(self) -> ET.Element:
        os_el = ET.Element("os")
        _sub(os_el, "type", "hvm", arch="x86_64", machine=self.machine)
        if self.firmware is Firmware.UEFI:
            # Explicit loader instead of firmware='efi': auto-selection may pick a secure-boot build.
            uefi = self.uefi or FALLBACK_UEFI
            _sub(os_el, "loader", str(uefi.code), readonly="yes", secure="no", type="pflash")
            _sub(os_el, "nvram", str(self.nvram) if self.nvram else None, template=str(uefi.vars))
        _sub(os_el, "boot", dev="hd")
        if self.firmware is Firmware.BIOS:
            _sub(os_el, "bios", useserial="yes")
        return os_el

    def _devices(self) -> ET.Element:
        devices = ET.Element("devices")
        for disk in self.disks:
            devices.append(disk.element())
        if isinstance(self.nic, NetworkNic):
            devices.append(self.nic.element())
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "log", file=str(self.console_log), append="on")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
        if self.guest_agent is not None:
            devices.append(self.guest_agent.element())
        if self.rng is not None:
            devices.append(self.rng.element())
        _sub(devices, "memballoon", model="none")
        if self.pvpanic:
            _sub(devices, "panic", model="isa")  # the ISA pvpanic device at port 0x505
        return devices

    @classmethod
    def parse(cls, root: ET.Element) -> Self:
        if root.tag != "domain":
            raise InputError(f"domain XML: root element is <{root.tag}>, expected <domain>")
        vm = root.find(f"metadata/{_hv('vm')}")
        if vm is None:
            raise InputError("domain XML: no hvagent metadata (not a domain hvagent created)")
        os_type = _find(root, "os/type", "os/type")
        loader = root.find("os/loader")
        nvram = root.find("os/nvram")
        nic: UserNet | NetworkNic | None = None
        iface = root.find("devices/interface")
        if iface is not None:
            nic = NetworkNic.parse(iface)
        for cmdline in root.findall(_qemu("commandline")):
            nic = UserNet.parse(cmdline) or nic
        devices = _find(root, "devices", "devices")
        rng = devices.find("rng")
        uefi = None
        if loader is not None:
            template = nvram.get("template") if nvram is not None else None
            uefi = UefiPaths(Path((loader.text or "").strip()), Path(template) if template else OVMF_VARS)
        return cls(
            name=_text(root, "name", "name"),
            uuid=_text(root, "uuid", "uuid"),
            memory_mib=_mib(_find(root, "memory", "memory")),
            vcpus=int(_text(root, "vcpu", "vcpu")),
            firmware=Firmware.UEFI if loader is not None else Firmware.BIOS,
            machine=_attr(os_type, "machine", "os/type"),
            dtype=DomainType(_attr(root, "type", "domain")),
            disks=tuple(Disk.parse(d) for d in root.findall("devices/disk")),
            nic=nic,
            console_log=Path(_attr(_find(root, "devices/serial/log", "serial/log"), "file", "serial/log")),
            nvram=Path(nvram.text.strip()) if nvram is not None and nvram.text and nvram.text.strip() else None,
            metadata=Metadata.parse(vm),
            guest_agent=GuestAgentChannel() if GuestAgentChannel.find(devices) is not None else None,
            rng=Rng.parse(rng) if rng is not None else None,
            pvpanic=any(p.get("model") == "isa" for p in devices.findall("panic")),
            uefi=None if uefi == FALLBACK_UEFI else uefi,  # what an unchosen pair renders as
        )


_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def _mib(el: ET.Element) -> int:
    """Memory in MiB, whatever unit libvirt chose when it wrote the element back."""
    unit = el.get("unit", "KiB").lower()
    if unit not in _UNITS:
        raise InputError(f"domain XML: memory unit {unit!r} not understood")
    return int((el.text or "0").strip()) * _UNITS[unit] // 1024**2


def to_xml(d: Domain) -> str:
    """The domain as libvirt XML, indented, with every value escaped by ElementTree."""
    root = d.element()
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _parse_tree(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise InputError(f"domain XML: not well-formed ({e})") from None


def from_xml(xml: str) -> Domain:
    """Parse what :func:`to_xml` wrote (also libvirt's own rendering of it)."""
    return Domain.parse(_parse_tree(xml))


def guest_agent_connected(xml: str) -> bool:
    """Whether a running domain's guest agent is there to ask, from its live XML: the domain has
    the agent's channel and the guest has its port open (libvirt follows QEMU's VSERPORT_CHANGE
    events). False for a domain without the channel or a guest that runs no agent."""
    devices = _parse_tree(xml).find("devices")
    channel = GuestAgentChannel.find(devices) if devices is not None else None
    target = channel.find("target") if channel is not None else None
    return target is not None and target.get("state") == "connected"


def read_metadata(xml: str) -> Metadata | None:
    """hvagent's metadata from a whole domain XML or a bare ``<hv:vm>`` element; None if not ours."""
    root = _parse_tree(xml)
    vm = root if root.tag == _hv("vm") else root.find(f"metadata/{_hv('vm')}")
    return Metadata.parse(vm) if vm is not None else None


def metadata_from_element(xml: str) -> Metadata:
    """Parse the bare ``<vm>`` element that virDomainGetMetadata returns for our namespace."""
    root = _parse_tree(xml)
    if root.tag.rpartition("}")[2] != "vm":
        raise InputError(f"hvagent metadata: root element is <{root.tag}>, expected <vm>")
    return Metadata.parse(root)
