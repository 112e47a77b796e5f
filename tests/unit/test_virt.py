"""agent.virt's pure logic, without libvirtd: the retry policy over a connection that drops, and
the accelerator decision from what the probe guests did (facts injected; the real probe against a
real guest under KVM is tests/integration/test_virt.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.domxml import DomainType, Firmware
from agent.virt import DomState, Virt, choose_accel

pytestmark = pytest.mark.unit


class _FakeConn:
    def __init__(self, fail: libvirt.libvirtError | None) -> None:
        self.fail = fail
        self.closed = False

    def lookupByName(self, name: str) -> Any:
        if self.fail is not None:
            raise self.fail
        err = libvirt.libvirtError("no domain")
        err.err = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain", 2, None, None, None, 0, 0)
        raise err

    def isAlive(self) -> int:
        return 0 if self.fail is not None else 1

    def close(self) -> int:
        self.closed = True
        return 0


def test_reconnects_after_a_dropped_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    dropped = libvirt.libvirtError("Cannot recv data")
    dropped.err = (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "Cannot recv data: EOF", 2,
                   None, None, None, 0, 0)  # fmt: skip
    conns = [_FakeConn(dropped), _FakeConn(None)]
    opened: list[_FakeConn] = []

    def fake_open(uri: str) -> _FakeConn:
        opened.append(conns[len(opened)])
        return opened[-1]

    monkeypatch.setattr(libvirt, "open", fake_open)
    sleeps: list[float] = []
    v = Virt("qemu:///fake", sleep=sleeps.append)
    assert v.state("hvtest-x") == DomState.MISSING
    assert len(opened) == 2 and opened[0].closed and len(sleeps) == 1


@pytest.mark.parametrize(("bios", "uefi", "ovmf", "expected", "probed"), [
    (True, True, True, DomainType.KVM, [Firmware.BIOS, Firmware.UEFI]),  # a host where KVM works
    (True, True, False, DomainType.KVM, [Firmware.BIOS]),  # no OVMF installed: SeaBIOS alone decides
    (False, True, True, DomainType.QEMU, [Firmware.BIOS]),  # no /dev/kvm, or KVM cannot start a guest
    (True, False, True, DomainType.QEMU, [Firmware.BIOS, Firmware.UEFI]),  # SeaBIOS runs, OVMF stops (nested)
    (False, False, False, DomainType.QEMU, [Firmware.BIOS]),
])
def test_auto_picks_kvm_only_when_every_probe_guest_boots(bios: bool, uefi: bool, ovmf: bool,
                                                          expected: DomainType, probed: list[Firmware]) -> None:
    ran: list[Firmware] = []

    def boots(firmware: Firmware) -> bool:
        ran.append(firmware)
        return {Firmware.BIOS: bios, Firmware.UEFI: uefi}[firmware]

    assert choose_accel(boots, ovmf) is expected
    assert ran == probed


class _ScriptedVirt(Virt):
    """A probe guest's states, one per look (the last repeats), on an injected clock."""

    def __init__(self, states: list[DomState]) -> None:
        self.now = 0.0
        super().__init__("qemu:///fake", sleep=self._advance, clock=lambda: self.now)
        self.states = states

    def _advance(self, seconds: float) -> None:
        self.now += seconds

    def state(self, name: str) -> DomState:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


@pytest.mark.parametrize(("console", "states", "booted"), [
    ("SeaBIOS (version 1.16.2-debian-1.16.2-1)\n", [DomState.RUNNING], True),
    ("SeaBIOS (version 1.16.2-debian-1.16.2-1)\n", [DomState.RUNNING, DomState.PAUSED], False),  # crashed right after
    ("", [DomState.RUNNING], False),  # nothing printed within the wait
    (None, [DomState.PAUSED], False),  # KVM emulation failure: QEMU paused it before any output
])
def test_a_probe_boots_only_if_it_prints_its_banner_and_keeps_running(tmp_path: Path, console: str | None,
                                                                    states: list[DomState], booted: bool) -> None:
    log = tmp_path / "probe.log"
    if console is not None:
        log.write_text(console)
    v = _ScriptedVirt(states)
    assert v._probe_booted("probe", log, ("SeaBIOS",), wait=10.0) is booted
    assert v.now <= 11.0  # the injected clock: never a real wait
