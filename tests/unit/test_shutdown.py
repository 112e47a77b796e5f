"""How ``Virt.shutdown_all`` brings domains down, against scripted guests on an injected clock: the
guest agent first where one is connected and takes the request, else the ACPI button, forced off
at the deadline; and what each path costs (the real guests: tests/integration/test_cloudinit.py
for the agent, tests/integration/test_images.py for ACPI, tests/integration/test_virt.py for force)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pytest

from agent.errors import EnvError
from agent.virt import DomState, ShutdownPath, Virt

pytestmark = pytest.mark.unit


class Agent(Enum):
    NONE = "none"        # no qemu-ga in the guest: the port is not connected
    TAKES = "takes"      # guest-shutdown accepted
    REFUSES = "refuses"  # connected, but libvirt reports an error (unsynced, the agent's own failure)
    HANGS = "hangs"      # holds its port open and never answers


@dataclass
class Guest:
    agent: Agent = Agent.NONE
    running: bool = True
    off_after_agent: float | None = 3.0  # s from the request until it is off; None: never
    off_after_acpi: float | None = 5.0


class Guests(Virt):
    def __init__(self, **guests: Guest) -> None:
        self.now = 0.0
        super().__init__("qemu:///fake", sleep=self._advance, clock=lambda: self.now)
        self.guests = guests
        self.off_at: dict[str, float] = {}
        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()  # ends the hanging agents' requests

    def _advance(self, seconds: float) -> None:
        self.now += seconds

    def _off_in(self, name: str, seconds: float | None) -> None:
        if seconds is not None:
            self.off_at.setdefault(name, self.now + seconds)

    def _running_with_agent(self, name: str) -> tuple[bool, bool]:
        guest = self.guests[name]
        return guest.running, guest.running and guest.agent is not Agent.NONE

    def _agent_request(self, name: str) -> None:
        guest = self.guests[name]
        self.calls.append(("agent", name))
        if guest.agent is Agent.HANGS:
            self.release.wait(30)
            raise EnvError("libvirt: shutdown through its guest agent: domain is not running")
        if guest.agent is Agent.REFUSES:
            raise EnvError("libvirt: Guest agent is not responding: guest agent returned an error")
        self._off_in(name, guest.off_after_agent)

    def _acpi_shutdown(self, name: str) -> None:
        self.calls.append(("acpi", name))
        self._off_in(name, self.guests[name].off_after_acpi)

    def state(self, name: str) -> DomState:
        if not self.guests[name].running or self.now >= self.off_at.get(name, float("inf")):
            return DomState.SHUTOFF
        return DomState.RUNNING

    def destroy(self, name: str) -> None:
        self.calls.append(("destroy", name))
        self.off_at[name] = self.now


@pytest.fixture
def released() -> Iterator[list[Guests]]:
    made: list[Guests] = []
    yield made
    for g in made:
        g.release.set()


def guests(made: list[Guests], **kw: Any) -> Guests:
    g = Guests(**kw)
    made.append(g)
    return g


def test_a_guest_with_an_agent_goes_down_through_it_and_no_button_is_pressed(released: list[Guests]) -> None:
    v = guests(released, web=Guest(Agent.TAKES))
    assert v.shutdown_all(["web"], timeout=30) == {"web": ShutdownPath.AGENT}
    assert v.calls == [("agent", "web")]
    assert 3.0 <= v.now <= 3.25


def test_a_guest_without_an_agent_gets_the_button_at_once(released: list[Guests]) -> None:
    v = guests(released, tiny=Guest(Agent.NONE))
    t0 = time.monotonic()
    assert v.shutdown_all(["tiny"], timeout=30) == {"tiny": ShutdownPath.ACPI}
    assert v.calls == [("acpi", "tiny")]  # the agent is not even asked: its port is not connected
    assert time.monotonic() - t0 < 1.0


def test_an_agent_that_refuses_falls_back_to_the_button(released: list[Guests]) -> None:
    v = guests(released, web=Guest(Agent.REFUSES))
    assert v.shutdown_all(["web"], timeout=30) == {"web": ShutdownPath.ACPI}
    assert v.calls == [("agent", "web"), ("acpi", "web")]


def test_an_agent_that_never_answers_costs_the_agent_wait_then_the_button(released: list[Guests]) -> None:
    v = guests(released, web=Guest(Agent.HANGS))
    t0 = time.monotonic()
    assert v.shutdown_all(["web"], timeout=30, agent_wait=0.3) == {"web": ShutdownPath.ACPI}
    assert 0.3 <= time.monotonic() - t0 < 2.0  # real time: the request runs in a thread of its own
    assert v.calls == [("agent", "web"), ("acpi", "web")]


def test_a_guest_that_ignores_every_request_is_forced_off_at_the_deadline(released: list[Guests]) -> None:
    v = guests(released, stuck=Guest(Agent.TAKES, off_after_agent=None, off_after_acpi=None))
    assert v.shutdown_all(["stuck"], timeout=10, poll=0.25) == {"stuck": ShutdownPath.FORCED}
    assert v.calls == [("agent", "stuck"), ("destroy", "stuck")]
    assert 10.0 <= v.now <= 10.25
    assert v.shutdown("stuck", timeout=10) is True  # now off: nothing to force


def test_a_domain_not_running_is_left_alone(released: list[Guests]) -> None:
    v = guests(released, off=Guest(Agent.TAKES, running=False))
    assert v.shutdown_all(["off"], timeout=10) == {"off": ShutdownPath.OFF}
    assert v.calls == [] and v.now == 0.0


def test_a_batch_asks_every_agent_at_once_and_reports_each_path(released: list[Guests]) -> None:
    v = guests(released, a=Guest(Agent.TAKES), b=Guest(Agent.NONE), c=Guest(Agent.HANGS),
               d=Guest(Agent.NONE, off_after_acpi=None), e=Guest(running=False))
    t0 = time.monotonic()
    paths = v.shutdown_all(["a", "b", "c", "d", "e"], timeout=20, agent_wait=0.3)
    assert time.monotonic() - t0 < 2.0  # one agent wait for the batch, not one per hanging guest
    assert paths == {"a": ShutdownPath.AGENT, "b": ShutdownPath.ACPI, "c": ShutdownPath.ACPI,
                     "d": ShutdownPath.FORCED, "e": ShutdownPath.OFF}
    assert sorted(v.calls) == sorted([("agent", "a"), ("agent", "c"), ("acpi", "b"), ("acpi", "c"),
                                      ("acpi", "d"), ("destroy", "d")])
    assert 20.0 <= v.now <= 20.25  # d held the batch until the deadline


def test_shutdown_is_true_unless_forced(released: list[Guests]) -> None:
    assert guests(released, web=Guest(Agent.TAKES)).shutdown("web", timeout=30) is True
    assert guests(released, web=Guest(Agent.NONE)).shutdown("web", timeout=30) is True
    assert guests(released, web=Guest(Agent.NONE, off_after_acpi=None)).shutdown("web", timeout=5) is False
