"""All libvirt access: one connection, one retry policy, and only domains hvagent created.

Every call goes through :meth:`Virt._call`. A connection-class failure (libvirtd restarted, socket
gone) drops the connection and retries with a bounded tenacity policy; when libvirtd stays
unreachable the caller gets an EnvError with a hint. Any other libvirt failure becomes an EnvError
naming the operation, so no caller ever imports libvirt. Mutating operations refuse domains
without hvagent's metadata (invariant 9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import tenacity

from agent import compat
from agent.compat import HostCaps
from agent.domxml import (
    GUEST_FILTER,
    HV_NS,
    Domain,
    DomainType,
    Firmware,
    GuestFilter,
    Metadata,
    NetworkNic,
    UefiPaths,
    filter_xml,
    guest_agent_connected,
    metadata_from_element,
    to_xml,
)
from agent.errors import Conflict, EnvError, HvError, NotFound
from agent.hostnet import guest_filter

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URI = "qemu:///system"
START_HINT = "start it: libvirtd -d (or systemctl start libvirtd)"
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
# What each firmware prints on the serial console once it got that far: SeaBIOS its banner,
# OVMF its boot manager's first line (after SEC, PEI and DXE: 32-bit code without paging, x87,
# long mode, hundreds of drivers).
PROBE_MARKERS = {Firmware.BIOS: ("SeaBIOS", "Booting"), Firmware.UEFI: ("BdsDxe:",)}

# Error codes/messages that mean "the connection is broken", not "this request failed".
_CONN_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC})
_CONN_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_CONN_MESSAGES = ("Cannot recv data", "client socket is closed", "Cannot write data")


class DomState(StrEnum):
    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # an ACPI shutdown is in progress
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    MISSING = "missing"


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomState.PMSUSPENDED,
}

# Why a domain is shut off (state.reason of a shutoff domain).
_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",    # the guest powered off
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",  # someone pulled the plug (virsh destroy)
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",      # QEMU died, or the guest panicked (pvpanic)
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",        # QEMU did not start
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
}
FAILURE_REASONS = frozenset({"crashed", "failed", "daemon"})


class ShutdownPath(StrEnum):
    """How a domain was brought down, in the words events use."""

    AGENT = "guest agent"  # the guest's qemu-ga took the request (guest-shutdown)
    ACPI = "ACPI"          # the power button: a guest without an agent, or one that did not take it
    FORCED = "forced"      # still running at the deadline: destroyed
    OFF = "already off"    # not running when asked


# How long a connected guest agent has to take a shutdown request before the ACPI button is
# pressed. A guest that runs no agent costs nothing (its port is not connected: the agent is not
# asked); one whose agent holds its port open without answering costs this much. libvirt's own
# first exchange with an agent (guest-sync) gives up after 5 s; a busy guest under TCG took over
# 2 s to answer.
AGENT_WAIT = 5.0


@dataclass(frozen=True)
class DomStatus:
    uuid: str
    state: DomState
    reason: str  # for a shutoff domain, one of _REASONS' values; else ""


_quieted = False


def _quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""
    global _quieted
    if not _quieted:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quieted = True


def _code(err: libvirt.libvirtError) -> int:
    return int(err.get_error_code() or 0)


def _message(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err)


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


class _ConnectionLost(Exception):
    """Internal: a connection-class libvirt error, retried by the tenacity policy."""

    def __init__(self, err: libvirt.libvirtError) -> None:
        super().__init__(_message(err))
        self.err = err


class Virt:
    """hvagent's view of one libvirt connection. Lazy: nothing connects until the first call."""

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        attempts: int = 5,
        max_delay: float = 30.0,
        qemu_run_dir: Path = QEMU_RUN_DIR,
    ) -> None:
        self.uri = uri
        self._sleep = sleep
        self._clock = clock
        self._attempts = attempts
        self._max_delay = max_delay
        self._run_dir = qemu_run_dir
        self._conn: Any = None

    def fork(self) -> Virt:
        """The same settings on a connection of its own (for another thread)."""
        return Virt(self.uri, sleep=self._sleep, clock=self._clock, attempts=self._attempts,
                    max_delay=self._max_delay, qemu_run_dir=self._run_dir)

    # -- connection and retry policy ------------------------------------------------------------

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _connection(self) -> Any:
        if self._conn is None:
            _quiet_libvirt()
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise _ConnectionLost(e) from e
        return self._conn

    def _is_connection_error(self, err: libvirt.libvirtError) -> bool:
        code = _code(err)
        if code in _CONN_CODES:
            return True
        if code == libvirt.VIR_ERR_SYSTEM_ERROR and err.get_error_domain() in _CONN_DOMAINS:
            return True
        if code == libvirt.VIR_ERR_INTERNAL_ERROR and any(m in _message(err) for m in _CONN_MESSAGES):
            return True
        try:
            return self._conn is not None and self._conn.isAlive() == 0
        except libvirt.libvirtError:
            return True

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)``, reconnecting on connection faults; other libvirt errors become EnvError."""

        def attempt() -> T:
            conn = self._connection()
            try:
                return fn(conn)
            except libvirt.libvirtError as e:
                if self._is_connection_error(e):
                    raise _ConnectionLost(e) from e
                raise

        def drop(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("libvirt at %s: %s; reconnecting (attempt %d)", self.uri, exc, state.attempt_number)
            self.close()

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts) | tenacity.stop_after_delay(self._max_delay),
            wait=tenacity.wait_exponential(multiplier=0.25, min=0.25, max=4),
            retry=tenacity.retry_if_exception_type(_ConnectionLost),
            sleep=self._sleep,
            before_sleep=drop,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _ConnectionLost as e:
            self.close()
            raise EnvError(f"libvirt at {self.uri}: cannot connect ({e})", hint=START_HINT) from None
        except libvirt.libvirtError as e:
            raise EnvError(f"libvirt: {what}: {_message(e)}") from None

    # -- lookups --------------------------------------------------------------------------------

    @staticmethod
    def _lookup(conn: Any, name: str) -> Any:
        """The domain, or None when there is none by that name."""
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    @staticmethod
    def _metadata(dom: Any) -> Metadata | None:
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HV_NS, 0)
        except libvirt.libvirtError as e:
            if _code(e) in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise
        return metadata_from_element(str(xml))

    def _managed_dom(self, conn: Any, name: str) -> Any:
        dom = self._lookup(conn, name)
        if dom is None:
            raise NotFound(f"domain {name}: no such domain")
        if self._metadata(dom) is None:
            raise Conflict(f"domain {name}: not created by hvagent; refusing to touch it")
        return dom

    # -- operations -----------------------------------------------------------------------------

    def define(self, dom: Domain) -> None:
        """Define (or redefine) a managed domain. A same-named domain we did not create is refused.

        A domain on a network or bridge gets the guest filter first, with the host's addresses now.
        A UEFI domain without a chosen loader gets the one libvirt's domain capabilities offer.
        """
        if dom.firmware is Firmware.UEFI and dom.uefi is None:
            dom = dataclasses.replace(dom, uefi=self.host_caps(dom.dtype).uefi)
        xml = to_xml(dom)
        if isinstance(dom.nic, NetworkNic) and dom.nic.filter == GUEST_FILTER:
            self.define_filter(guest_filter())

        def run(conn: Any) -> None:
            existing = self._lookup(conn, dom.name)
            if existing is not None and self._metadata(existing) is None:
                raise Conflict(f"domain {dom.name}: exists and was not created by hvagent")
            conn.defineXML(xml)

        self._call(f"define {dom.name}", run)

    def define_filter(self, f: GuestFilter) -> None:
        """Define (or update) hvagent's guest nwfilter; libvirt re-applies a changed one to running guests."""
        xml = filter_xml(f)
        self._call(f"define nwfilter {f.name}", lambda conn: conn.nwfilterDefineXML(xml))

    def start(self, name: str) -> None:
        def run(conn: Any) -> None:
            dom = self._managed_dom(conn, name)
            if not dom.isActive():
                dom.create()

        self._call(f"start {name}", run)

    def destroy(self, name: str) -> None:
        """Power off at once. A domain that is not running is left as it is."""

        def run(conn: Any) -> None:
            dom = self._managed_dom(conn, name)
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
                    raise

        self._call(f"destroy {name}", run)

    def request_shutdown(self, name: str, agent_wait: float = AGENT_WAIT) -> ShutdownPath:
        """Ask the guest to power off; do not wait for it to be off. See ``request_shutdown_all``."""
        return self.request_shutdown_all([name], agent_wait)[name]

    def request_shutdown_all(self, names: list[str], agent_wait: float = AGENT_WAIT) -> dict[str, ShutdownPath]:
        """Ask each guest to power off, first through its guest agent where one is connected (the
        guest has the agent's port open) and takes the request within ``agent_wait`` s, else with
        the ACPI power button. How each was asked, by name; OFF for a domain not running."""
        facts = {name: self._running_with_agent(name) for name in names}
        took = self._agent_shutdown([n for n, (up, agent) in facts.items() if up and agent], agent_wait)
        paths: dict[str, ShutdownPath] = {}
        for name in names:
            if not facts[name][0]:
                paths[name] = ShutdownPath.OFF
            elif name in took:
                paths[name] = ShutdownPath.AGENT
            else:
                self._acpi_shutdown(name)
                paths[name] = ShutdownPath.ACPI
        return paths

    def _running_with_agent(self, name: str) -> tuple[bool, bool]:
        """Whether the managed domain runs, and whether its guest has the agent's port open."""

        def run(conn: Any) -> tuple[bool, bool]:
            dom = self._managed_dom(conn, name)
            try:
                if not dom.isActive():
                    return False, False
                return True, guest_agent_connected(str(dom.XMLDesc(0)))
            except libvirt.libvirtError as e:
                if _code(e) in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):  # stopped meanwhile
                    return False, False
                raise

        return self._call(f"state of {name}", run)

    def _agent_shutdown(self, names: list[str], wait: float) -> set[str]:
        """The names whose guest agent took a shutdown request within ``wait`` s (real time).

        Each request runs in a thread of its own: libvirt answers once the agent is gone (the
        guest is on its way down), and a guest can hold its agent's port open and never answer.
        Such a request is left running; it ends when its domain stops (libvirt then drops the
        agent), by ACPI or by force at the deadline."""
        if not names:
            return set()
        took: set[str] = set()
        finished = 0
        done = threading.Condition()

        def one(name: str) -> None:
            nonlocal finished
            ok = False
            t0 = time.monotonic()
            try:
                self._agent_request(name)
                ok = True
                log.info("domain %s: the guest agent took the shutdown request in %.1f s", name, time.monotonic() - t0)
            except HvError as e:
                log.info("domain %s: the guest agent did not take the shutdown request (%s)", name, e.message)
            except Exception:
                log.exception("domain %s: guest agent shutdown request", name)
            with done:
                finished += 1
                if ok:
                    took.add(name)
                done.notify_all()

        for name in names:
            threading.Thread(target=one, args=(name,), name=f"agent-shutdown-{name}", daemon=True).start()
        with done:
            done.wait_for(lambda: finished == len(names), timeout=wait)
            if finished < len(names):
                log.warning("guest agent of %s: no answer to the shutdown request within %.0f s; ACPI instead",
                            ", ".join(sorted(set(names) - took)), wait)
            return set(took)

    def _agent_request(self, name: str) -> None:
        """guest-shutdown through libvirt, on a connection of its own (it may block for long)."""
        virt = self.fork()
        try:
            virt._call(f"shutdown {name} through its guest agent", lambda conn: virt._managed_dom(conn, name)
                       .shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT))
        finally:
            virt.close()

    def _acpi_shutdown(self, name: str) -> None:
        """Press the ACPI power button."""

        def run(conn: Any) -> None:
            dom = self._managed_dom(conn, name)
            try:
                if dom.isActive():
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise

        self._call(f"shutdown {name}", run)

    def shutdown(self, name: str, timeout: float, poll: float = 0.25) -> bool:
        """Shut down (guest agent, else ACPI); destroy if still running after ``timeout`` s. True
        unless it had to be forced off."""
        return self.shutdown_all([name], timeout, poll)[name] is not ShutdownPath.FORCED

    def shutdown_all(self, names: list[str], timeout: float, poll: float = 0.25,
                     agent_wait: float = AGENT_WAIT) -> dict[str, ShutdownPath]:
        """Shut several domains down at once (``request_shutdown_all``); those still running
        ``timeout`` s after the requests began are destroyed. How each went down, by name."""
        deadline = self._clock() + timeout
        paths = self.request_shutdown_all(names, agent_wait)
        waiting = [n for n in names if paths[n] is not ShutdownPath.OFF]
        while True:
            waiting = [n for n in waiting if self.state(n) not in (DomState.SHUTOFF, DomState.MISSING)]
            if not waiting or self._clock() >= deadline:
                break
            self._sleep(poll)
        for name in waiting:
            log.warning("domain %s still running %.0f s after its shutdown request (%s); destroying it",
                        name, timeout, paths[name])
            self.destroy(name)
            paths[name] = ShutdownPath.FORCED
        return paths

    def undefine(self, name: str) -> None:
        """Remove a managed domain's definition and NVRAM, destroying it first if it runs.

        A domain that does not exist is already undefined: no error (journal recovery repeats this).
        """

        def run(conn: Any) -> None:
            dom = self._lookup(conn, name)
            if dom is None:
                return
            if self._metadata(dom) is None:
                raise Conflict(f"domain {name}: not created by hvagent; refusing to undefine it")
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)

        self._call(f"undefine {name}", run)

    def state(self, name: str) -> DomState:
        def run(conn: Any) -> DomState:
            dom = self._lookup(conn, name)
            if dom is None:
                return DomState.MISSING
            try:
                code = dom.state()[0]
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                    return DomState.MISSING
                raise
            return _STATES.get(code, DomState.NOSTATE)

        return self._call(f"state of {name}", run)

    def halted(self, name: str) -> str | None:
        """Why this domain's guest cannot come up by itself, or None: QEMU paused it (an error it
        cannot go on from, such as "KVM internal error ... emulation failure" or a full disk)
        or it crashed; or its QEMU is gone: the domain shut off (QEMU died, and on_crash=destroy
        leaves no crashed domain; the guest powered off) or was undefined. Asked while a guest
        that was started is awaited; hvagent itself never pauses a domain."""

        def run(conn: Any) -> tuple[DomState, str]:
            dom = self._lookup(conn, name)
            if dom is None:
                return DomState.MISSING, ""
            try:
                code, reason = dom.state()
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                    return DomState.MISSING, ""
                raise
            st = _STATES.get(code, DomState.NOSTATE)
            return st, _REASONS.get(reason, "unknown") if st is DomState.SHUTOFF else ""

        st, why = self._call(f"state of {name}", run)
        if st in (DomState.PAUSED, DomState.CRASHED):
            return f"domain {name} is {st}: QEMU stopped the guest (libvirt's qemu/{name}.log says why)"
        if st is DomState.SHUTOFF:
            return f"the guest's QEMU stopped: shut off ({why})"
        if st is DomState.MISSING:
            return f"the guest's QEMU stopped: its domain {name} is gone"
        return None

    def exists(self, name: str) -> bool:
        return self._call(f"look up {name}", lambda conn: self._lookup(conn, name) is not None)

    def managed(self) -> dict[str, Metadata]:
        """Every domain hvagent created, by name, from one listAllDomains call; others are ignored."""

        def run(conn: Any) -> dict[str, Metadata]:
            found: dict[str, Metadata] = {}
            for dom in conn.listAllDomains(0):
                meta = self._metadata(dom)
                if meta is not None:
                    found[str(dom.name())] = meta
            return found

        return self._call("list domains", run)

    def is_managed(self, name: str) -> bool:
        """True when a domain by that name exists and carries hvagent's metadata."""

        def run(conn: Any) -> bool:
            dom = self._lookup(conn, name)
            return dom is not None and self._metadata(dom) is not None

        return self._call(f"look up {name}", run)

    def managed_states(self) -> dict[str, DomState]:
        """The state of every managed domain, by name, from one listing."""

        def run(conn: Any) -> dict[str, DomState]:
            found: dict[str, DomState] = {}
            for dom in conn.listAllDomains(0):
                if self._metadata(dom) is not None:
                    found[str(dom.name())] = _STATES.get(dom.state()[0], DomState.NOSTATE)
            return found

        return self._call("list domains", run)

    def statuses(self) -> dict[str, DomStatus]:
        """Every domain's UUID, state and reason, by name, from one getAllDomainStats call.

        name() and UUIDString() are local to the returned objects, so a reconcile pass over N
        domains costs one libvirt call, not N. The caller matches UUIDs to tell its own domains.
        """

        def run(conn: Any) -> dict[str, DomStatus]:
            found: dict[str, DomStatus] = {}
            for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0):
                found[str(dom.name())] = DomStatus(
                    str(dom.UUIDString()), _STATES.get(stats.get("state.state", -1), DomState.NOSTATE),
                    _REASONS.get(int(stats.get("state.reason", 0)), "unknown")
                    if stats.get("state.state") == libvirt.VIR_DOMAIN_SHUTOFF else "")
            return found

        return self._call("list domains", run)

    def reboot(self, name: str) -> None:
        """Ask the guest to reboot (ACPI); a guest that is not running is refused."""

        def run(conn: Any) -> None:
            dom = self._managed_dom(conn, name)
            if not dom.isActive():
                raise Conflict(f"vm {name}: is not running")
            dom.reboot(0)

        self._call(f"reboot {name}", run)

    def guest_address(self, name: str) -> str | None:
        """The first IPv4 address of a managed domain's NIC: the libvirt network's DHCP leases,
        else (a host bridge, whose DHCP is not libvirt's) the host's ARP table."""

        def run(conn: Any) -> str | None:
            dom = self._managed_dom(conn, name)
            if not dom.isActive():
                return None
            for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                           libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
                try:
                    ifaces = dom.interfaceAddresses(source, 0)
                except libvirt.libvirtError:
                    continue
                for iface in ifaces.values():
                    for addr in iface.get("addrs") or []:
                        if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                            return str(addr["addr"])
            return None

        return self._call(f"address of {name}", run)

    def xml(self, name: str, inactive: bool = False) -> str:
        """The live XML (or the persistent definition with ``inactive``) of a managed domain."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return self._call(f"XML of {name}", lambda conn: str(self._managed_dom(conn, name).XMLDesc(flags)))

    def qemu_pid(self, name: str) -> int | None:
        """The QEMU process of a running domain, from libvirt's pid file; None when not running."""
        if not name or "/" in name or name.startswith("."):
            return None
        try:
            return int((self._run_dir / f"{name}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def host_facts(self) -> dict[str, str | int | bool]:
        def run(conn: Any) -> dict[str, str | int | bool]:
            model, memory_mib, cpus, mhz, *_ = conn.getInfo()
            return {
                "uri": self.uri,
                "hostname": str(conn.getHostname()),
                "hypervisor": str(conn.getType()),
                "libvirt_version": _version(int(conn.getLibVersion())),
                "qemu_version": _version(int(conn.getVersion())),
                "arch": str(model),
                "memory_mib": int(memory_mib),
                "cpus": int(cpus),
                "cpu_mhz": int(mhz),
                "kvm_device": Path("/dev/kvm").exists(),
            }

        return self._call("host facts", run)

    def host_caps(self, dtype: DomainType, machine: str = "q35") -> HostCaps:
        """The QEMU version libvirt runs and its domain capabilities for ``machine`` under ``dtype``
        (agent.compat); a machine or domain type libvirt refuses gives capabilities without one."""

        def run(conn: Any) -> tuple[int, str | None, str]:
            version = int(conn.getVersion())
            try:
                return version, str(conn.getDomainCapabilities(None, "x86_64", machine, str(dtype), 0)), ""
            except libvirt.libvirtError as e:
                if self._is_connection_error(e):
                    raise
                return version, None, _message(e)

        version, xml, why = self._call("domain capabilities", run)
        return compat.host_caps(version, str(dtype), machine, xml, why, compat.read_descriptors())

    # -- acceleration probe ---------------------------------------------------------------------

    def probe_accel(self, workdir: Path, name: str = "hvagent-probe-accel", wait: float = 10.0) -> DomainType:
        """KVM only if real KVM guests boot here; otherwise QEMU (TCG).

        /dev/kvm existing proves nothing: nested setups open it and then cannot run guests. Some
        (a nested PVM host) even run SeaBIOS and then fail every real guest in its bootloader:
        KVM cannot emulate SYSLINUX's iret or OVMF's fninit in protected mode without paging
        ("KVM internal error ... emulation failure", QEMU pauses the guest). So both firmwares
        boot, each as a transient type='kvm' domain without disks, output on the serial log:
        SeaBIOS must print its banner and OVMF (when installed) reach its boot manager, and each
        must keep running. Probes are always destroyed; they are also tied to our connection
        (AUTODESTROY) should hvagent die meanwhile.
        """
        uefi = self.host_caps(DomainType.QEMU).uefi  # the loaders are the same under either
        return choose_accel(lambda firmware: self._probe_one(workdir, name, firmware, wait, uefi), uefi is not None)

    def _probe_one(self, workdir: Path, name: str, firmware: Firmware, wait: float,
                   uefi: UefiPaths | None = None) -> bool:
        workdir.mkdir(parents=True, exist_ok=True)
        console = workdir / f"{name}.log"
        console.unlink(missing_ok=True)
        nvram = workdir / f"{name}_VARS.fd" if firmware is Firmware.UEFI else None
        probe = Domain(
            name=name,
            uuid=str(uuidlib.uuid4()),
            memory_mib=64 if firmware is Firmware.BIOS else 128,
            vcpus=1,
            firmware=firmware,
            dtype=DomainType.KVM,
            console_log=console,
            nvram=nvram,
            uefi=uefi if firmware is Firmware.UEFI else None,
            metadata=Metadata(
                owner="hvagent",
                track="probe",
                image="none",
                version="0",
                instance_id=name,
                host_port=None,
                spec_hash="probe",
            ),
        )
        xml = to_xml(probe)

        def create(conn: Any) -> bool:
            if self._lookup(conn, name) is not None:
                raise Conflict(f"domain {name}: exists; the accelerator probe needs that name")
            try:
                conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
            except libvirt.libvirtError as e:
                log.info("KVM probe (%s) did not start: %s", firmware, _message(e))
                return False
            return True

        try:
            if not self._call("start KVM probe", create):
                return False
            return self._probe_booted(name, console, PROBE_MARKERS[firmware], wait)
        finally:
            self._call("destroy KVM probe", lambda conn: self._destroy_probe(conn, name))
            if nvram is not None:
                nvram.unlink(missing_ok=True)

    def _probe_booted(self, name: str, console: Path, markers: tuple[str, ...], wait: float) -> bool:
        deadline = self._clock() + wait
        seen = False
        while True:
            if self.state(name) is not DomState.RUNNING:
                log.info("KVM probe stopped running (%s)", self.state(name))
                return False
            try:
                with console.open("rb") as f:  # the probe's firmware prints a banner: its first 64 KiB
                    text = f.read(1 << 16).decode(errors="replace")
            except FileNotFoundError:
                text = ""
            seen = any(marker in text for marker in markers)
            if seen or self._clock() >= deadline:
                break
            self._sleep(0.25)
        if not seen:
            log.info("KVM probe printed none of %s within %.0f s", markers, wait)
            return False
        # Printed something: it must still be running (a broken KVM may crash right after).
        self._sleep(0.5)
        return self.state(name) is DomState.RUNNING

    @staticmethod
    def _destroy_probe(conn: Any, name: str) -> None:
        dom = Virt._lookup(conn, name)
        if dom is None:
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if _code(e) not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise


def choose_accel(boots: Callable[[Firmware], bool], uefi: bool) -> DomainType:
    """KVM only if a probe guest of each firmware this host has (SeaBIOS; OVMF when ``uefi``) boots
    under KVM; the first that does not decides for QEMU (TCG) and no further probe runs."""
    for firmware in (Firmware.BIOS, Firmware.UEFI):
        if firmware is Firmware.UEFI and not uefi:
            log.info("KVM probe: libvirt offers no UEFI loader; SeaBIOS alone decides")
            continue
        if not boots(firmware):
            return DomainType.QEMU
    return DomainType.KVM


# -- lifecycle events ----------------------------------------------------------------------------

_STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "snapshot",
}
_event_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread. Call before any connection is opened."""
    global _event_loop_started
    if _event_loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
    _event_loop_started = True


@dataclass(frozen=True)
class LifecycleEvent:
    name: str
    uuid: str
    kind: str    # started | stopped | crashed | other
    detail: str  # for stopped: shutdown | destroyed | crashed | failed | ...
    at: float = field(default_factory=time.time)  # when libvirt told us (wall clock, as State's)


class LifecycleWatch:
    """Domain lifecycle events on a connection of their own; ``ensure`` reconnects after libvirtd returns."""

    def __init__(self, uri: str, on_event: Callable[[LifecycleEvent], None]) -> None:
        self.uri = uri
        self._on_event = on_event
        self._conn: Any = None
        self._lost = threading.Event()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._lost.is_set()

    def ensure(self) -> bool:
        """Connect and register if not connected; True when events are flowing."""
        if self.connected:
            return True
        self.close()
        try:
            _quiet_libvirt()
            conn = libvirt.openReadOnly(self.uri)
            try:
                conn.registerCloseCallback(lambda *_: self._lost.set(), None)
                conn.setKeepAlive(5, 3)
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._callback, None)
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):  # the registration's error is the one to report
                    conn.close()
                raise
        except libvirt.libvirtError as e:
            log.warning("libvirt events at %s: %s; retrying on the next pass", self.uri, _message(e))
            return False
        self._lost.clear()
        self._conn = conn
        return True

    def _callback(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            kind, what = "stopped", _STOPPED_DETAILS.get(detail, "unknown")
        elif event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
            kind, what = "crashed", "guest"
        elif event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            kind, what = "started", ""
        else:
            return
        self._on_event(LifecycleEvent(str(dom.name()), str(dom.UUIDString()), kind, what))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


class ConsoleStream:
    """A guest's serial console as a byte stream (libvirt's ``virDomainOpenConsole``), on a libvirt
    connection of its own that ``close`` closes. ``recv`` blocks until the guest writes; ``send``
    may be called from another thread meanwhile.

    libvirt allows one console session per domain: opening a second one is refused (``Conflict``)
    unless ``force``, which ends the first (its ``recv`` then returns ``b""``)."""

    CHUNK = 64 << 10

    def __init__(self, uri: str, uuid: str, name: str, *, force: bool = False) -> None:
        self.name = name
        self.broken = False
        _quiet_libvirt()
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise EnvError(f"libvirt at {uri}: {_message(e)}") from e
        try:
            dom = self._conn.lookupByUUIDString(uuid)
            self._stream = self._conn.newStream(0)
            flags = libvirt.VIR_DOMAIN_CONSOLE_SAFE | (libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0)
            dom.openConsole(None, self._stream, flags)
        except libvirt.libvirtError as e:
            self._conn.close()
            if _code(e) in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise Conflict(f"vm {name}: is not running; its console is there while it runs") from e
            if "session exists" in _message(e):
                raise Conflict(f"vm {name}: another console session is open; force takes it over "
                               "(hvagent vm console --force)") from e
            raise EnvError(f"vm {name}: console: {_message(e)}") from e

    def recv(self) -> bytes:
        """What the guest wrote next; ``b""`` once the session is over: the guest stopped, or the
        stream broke off (``broken``: another session forced its way in, or libvirt ended it)."""
        try:
            data = self._stream.recv(self.CHUNK)
        except libvirt.libvirtError:
            self.broken = True
            return b""
        return data if isinstance(data, bytes) else b""

    def send(self, data: bytes) -> None:
        """Type ``data`` into the console; EnvError once the session is over."""
        view = memoryview(data)
        while view:
            try:
                sent = self._stream.send(bytes(view))
            except libvirt.libvirtError as e:
                raise EnvError(f"vm {self.name}: console: {_message(e)}") from e
            view = view[max(sent, 0):]

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
