"""A VM's stop (``Provisioner.stop``) against a scripted domain: ``stopping`` while the guest shuts
down without the host lock, ``stopped`` only once the domain is off, and what a failure or a crash
in between leaves (the real guest and the API: tests/integration/test_daemon.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.errors import Conflict, EnvError
from agent.provision import Provisioner
from agent.state import HostLock, State, VmRow, VmState
from agent.virt import DomState

pytestmark = pytest.mark.unit


class Domain:
    """The one domain's state, and a shutdown that powers it off or fails as told."""

    def __init__(self, lock: HostLock, state: State, fail: Exception | None = None, off_anyway: bool = False,
                 meanwhile: VmState | None = None) -> None:
        self.dom = DomState.RUNNING
        self.lock, self.db, self.fail, self.off_anyway, self.meanwhile = lock, state, fail, off_anyway, meanwhile
        self.seen: list[tuple[bool, VmState, bool]] = []  # lock held, VM state, entry parked: during shutdown

    def shutdown(self, name: str, timeout: float) -> bool:
        row = self.db.vm(name)
        assert row is not None
        self.seen.append((self.lock.held, row.state, all(it.parked for it in self.db.pending())))
        if self.meanwhile is not None:  # another operation takes the VM while the lock is free
            self.db.update_vm(name, state=self.meanwhile)
        if self.fail is not None:
            if self.off_anyway:
                self.dom = DomState.SHUTOFF
            raise self.fail
        self.dom = DomState.SHUTOFF
        return True

    def state(self, name: str) -> DomState:
        return self.dom


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[State, HostLock, Config]]:
    cfg = Config(state_dir=tmp_path, shutdown_timeout=5)
    state = State(cfg.db_path)
    state.add_vm(VmRow("v", "alice", "tiny-1.*", "tiny", "1.0", VmState.RUNNING, None, "u-1", "52:54:00:00:00:01",
                       22300, "v-1", {}, "h", 0.0, 0.0))
    yield state, HostLock(tmp_path), cfg
    state.close()


def provisioner(cfg: Config, state: State, dom: Domain) -> Provisioner:
    virt: Any = dom
    return Provisioner(cfg, state, catalog=None, virt=virt, accel=lambda: None)  # type: ignore[arg-type]


def kinds(state: State) -> list[str]:
    return [e.kind for e in state.events(vm="v")]


def test_stopped_once_the_domain_is_off_and_the_lock_is_free_meanwhile(host: tuple[State, HostLock, Config]) -> None:
    state, lock, cfg = host
    dom = Domain(lock, state)
    with lock:
        row = provisioner(cfg, state, dom).stop("v", by="alice", lock=lock)
        assert lock.held
    assert dom.seen == [(False, VmState.STOPPING, True)]
    assert (row.state, row.reason) == (VmState.STOPPED, "stopped by alice")
    assert kinds(state) == ["vm.stopping", "vm.stopped"] and state.pending() == []


def test_a_failed_shutdown_leaves_it_running_with_the_reason(host: tuple[State, HostLock, Config]) -> None:
    state, lock, cfg = host
    dom = Domain(lock, state, fail=EnvError("libvirt: shutdown v: Timed out during operation"))
    with lock, pytest.raises(EnvError, match="Timed out"):
        provisioner(cfg, state, dom).stop("v", by="alice", lock=lock)
    row = state.vm("v")
    assert row is not None and row.state is VmState.RUNNING
    assert row.reason == "stop failed: libvirt: shutdown v: Timed out during operation"
    assert kinds(state) == ["vm.stopping", "vm.stop-failed"] and state.pending() == []


def test_a_failure_after_the_domain_went_off_is_a_stop(host: tuple[State, HostLock, Config]) -> None:
    state, lock, cfg = host
    dom = Domain(lock, state, fail=EnvError("libvirt: lost the connection"), off_anyway=True)
    with lock:
        row = provisioner(cfg, state, dom).stop("v", by="alice", lock=lock)
    assert row.state is VmState.STOPPED
    assert kinds(state) == ["vm.stopping", "vm.stopped"] and state.pending() == []


def test_a_vm_another_operation_took_meanwhile_is_left_to_it(host: tuple[State, HostLock, Config]) -> None:
    state, lock, cfg = host
    dom = Domain(lock, state, meanwhile=VmState.SWAPPING)
    with lock, pytest.raises(Conflict, match="swapping by another operation while it stopped"):
        provisioner(cfg, state, dom).stop("v", by="alice", lock=lock)
    row = state.vm("v")
    assert row is not None and row.state is VmState.SWAPPING
    assert kinds(state) == ["vm.stopping", "vm.stop-failed"] and state.pending() == []


@pytest.mark.parametrize(("dom_state", "after", "event"), [
    (DomState.RUNNING, VmState.RUNNING, "vm.stop-failed"),  # cut short before the guest was off
    (DomState.SHUTOFF, VmState.STOPPED, "vm.stopped"),  # off, but the crash came before it was recorded
])
def test_a_stop_cut_short_by_a_crash_is_settled_by_recovery(host: tuple[State, HostLock, Config],
                                                           dom_state: DomState, after: VmState, event: str) -> None:
    state, lock, cfg = host
    # what a process killed mid-stop leaves: its entry, parked by a process that is gone
    it = state.begin("stop", "v", {"by": "alice", "state": "running"})
    state.update_vm("v", state=VmState.STOPPING)
    state.park([it])
    state.db.execute("UPDATE journal SET holder=? WHERE id=?", ("another-boot:4242:1", it))
    assert [i.id for i in state.orphaned()] == [it]
    dom = Domain(lock, state)
    dom.dom = dom_state
    provisioner(cfg, state, dom).recover()
    row = state.vm("v")
    assert row is not None and row.state is after and kinds(state) == [event] and state.pending() == []


def test_a_stop_of_a_live_process_is_not_recovered_by_another(host: tuple[State, HostLock, Config]) -> None:
    state, lock, cfg = host
    it = state.begin("stop", "v", {"by": "alice", "state": "running"})
    state.update_vm("v", state=VmState.STOPPING)
    state.park([it])  # this process, alive: in flight
    provisioner(cfg, state, Domain(lock, state)).recover()
    row = state.vm("v")
    assert row is not None and row.state is VmState.STOPPING and [i.id for i in state.pending()] == [it]
