"""Journal gaps (issue 17 point 6) in the logic between the journal and the rollouts, against a
real state database and scripted swaps: a publish whose rollout trigger a crash cut off, a swap
cut short before its VM went down, a swap that raised before it wrote its journal entry. The
real guests and SIGKILL: tests/integration/test_crash.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import TRIGGER, Catalog
from agent.config import Config
from agent.errors import EnvError
from agent.provision import VmPaths
from agent.rollout import Rollouts
from agent.seed import new_ed25519
from agent.spec import VmSpec
from agent.state import (
    ImageRow,
    ImageState,
    RolloutState,
    State,
    StepState,
    VmRow,
    VmState,
)
from agent.swap import Outcome, Swapper
from tests.unit.hostcaps import CAPS

pytestmark = pytest.mark.unit


@dataclasses.dataclass
class Host:
    cfg: Config
    state: State
    catalog: Catalog


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    cfg = Config(state_dir=tmp_path, canary=False)
    state = State(cfg.db_path)
    for minor in (0, 1):
        state.add_image(ImageRow("tiny", f"1.{minor}", 1, minor, "0" * 64, str(tmp_path / f"tiny-1.{minor}.qcow2"),
                                 1 << 20, ImageState.ACTIVE, {}, 0.0))
    spec = VmSpec.model_validate({"name": "v", "owner": "t", "image": "tiny-1.*",
                                  "ssh_keys": [new_ed25519("t").public]})
    state.add_vm(VmRow("v", "t", "tiny-1.*", "tiny", "1.0", VmState.RUNNING, None, "u-1", "52:54:00:00:00:01",
                       22300, "v-old", spec.model_dump(mode="json"), spec.digest(), 0.0, 0.0))
    yield Host(cfg, state, Catalog(cfg, state, lambda: CAPS))
    state.close()


class Swaps:
    """``swap_batch`` as told: raise (before or after journaling), else move the VMs to the target."""

    def __init__(self, state: State, fail: Exception | None = None, journaled: bool = False) -> None:
        self.state, self.fail, self.journaled = state, fail, journaled
        self.calls: list[list[str]] = []

    def swap_batch(self, names: list[str], target: ImageRow, say: Any = None, track: str | None = None) \
            -> list[Outcome]:
        self.calls.append(names)
        if self.fail is not None:
            if self.journaled:
                for name in names:
                    self.state.begin("swap", name, {"from": "1.0", "to": target.version, "down": False})
            raise self.fail
        for name in names:
            self.state.update_vm(name, version=target.version)
        return [Outcome(name, True, "1.0", target.version, downtime=1.0) for name in names]


def rollouts(h: Host, swaps: Swaps) -> Rollouts:
    swapper: Any = swaps
    return Rollouts(h.cfg, h.state, h.catalog, swapper, canary=None)  # type: ignore[arg-type]


def step_of(h: Host, rid: int) -> tuple[StepState, str | None]:
    [s] = h.state.steps(rid)
    return s.state, s.reason


def test_a_swap_that_raised_before_its_journal_entry_is_tried_again_not_reported_done(host: Host) -> None:
    """Its step stayed ``swapping`` with nothing in the journal: the daemon's next pass found no
    pending step and reported the rollout done, every VM swapped, with the VM on its old version."""
    swaps = Swaps(host.state, fail=EnvError("/store/tiny-1.1.qcow2: base image of tiny-1.1 is missing"))
    r = rollouts(host, swaps)
    ro = r.start("tiny", 1)
    assert ro is not None
    with pytest.raises(EnvError):
        r.step(ro.id)
    state, reason = step_of(host, ro.id)
    assert state is StepState.PENDING and reason is not None and "base image of tiny-1.1 is missing" in reason
    swaps.fail = None  # the host fixed: the next pass swaps it
    assert r.step(ro.id)
    assert not r.step(ro.id)
    row = host.state.rollout(ro.id)
    assert row is not None and row.state is RolloutState.DONE
    assert swaps.calls == [["v"], ["v"]] and step_of(host, ro.id)[0] is StepState.DONE
    vm = host.state.vm("v")
    assert vm is not None and vm.version == "1.1"


def test_a_swap_that_raised_with_its_entry_open_waits_for_its_recovery(host: Host) -> None:
    swaps = Swaps(host.state, fail=EnvError("libvirt: shutdown v: connection lost"), journaled=True)
    r = rollouts(host, swaps)
    ro = r.start("tiny", 1)
    assert ro is not None
    with pytest.raises(EnvError):
        r.step(ro.id)
    assert step_of(host, ro.id)[0] is StepState.SWAPPING  # Swapper.recover settles the VM first
    assert not r.step(ro.id) and swaps.calls == [["v"]]  # neither done nor swapped again meanwhile
    row = host.state.rollout(ro.id)
    assert row is not None and row.state is RolloutState.RUNNING
    [entry] = host.state.pending()
    host.state.done(entry.id)  # what Swapper.recover does once the VM is settled
    r.recover()
    assert step_of(host, ro.id)[0] is StepState.PENDING


@pytest.mark.parametrize(("policy", "planned"), [("auto", True), ("manual", False)])
def test_a_trigger_a_crash_cut_off_from_its_publish_is_recovered_with_its_policy(
        host: Host, policy: str, planned: bool) -> None:
    host.state.begin(TRIGGER, "tiny-1.1", {"policy": policy})  # the image recorded, then SIGKILL
    rollouts(host, Swaps(host.state)).recover()
    assert host.state.pending() == []
    assert [(ro.target, ro.state) for ro in host.state.rollouts()] == ([("1.1", RolloutState.RUNNING)] if planned
                                                                       else [])
    kinds = [e.kind for e in host.state.events()]
    assert ("rollout.waiting" in kinds) is not planned and "rollout.recovered" in kinds


def test_a_trigger_of_an_undone_publish_starts_nothing(host: Host) -> None:
    host.state.begin(TRIGGER, "tiny-1.2", {"policy": "auto"})  # killed before the image was recorded
    rollouts(host, Swaps(host.state)).recover()
    assert host.state.pending() == [] and host.state.rollouts() == []


def test_on_publish_clears_its_own_trigger_only(host: Host) -> None:
    image = host.state.image("tiny", "1.1")
    assert image is not None
    host.state.begin(TRIGGER, "tiny-1.1", {"policy": "manual"})
    rollouts(host, Swaps(host.state)).on_publish(image)
    assert host.state.pending() == []


class Untouchable:
    """A libvirt connection that fails the test on any use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"libvirt used ({name}) for a guest that never went down")


class Seeds:
    def __init__(self) -> None:
        self.written: list[tuple[str, str]] = []

    def write_vm_seed(self, row: VmRow, paths: VmPaths) -> None:
        self.written.append((row.name, row.instance_id))


@pytest.mark.parametrize("down", [False, None])
def test_a_swap_cut_short_before_its_vm_went_down_leaves_the_guest_alone(host: Host, down: bool | None) -> None:
    """Recovery used to destroy the still healthy guest and boot its old disk again."""
    host.state.update_vm("v", state=VmState.SWAPPING)
    new_overlay = VmPaths.of(host.cfg, "v").os_disk("1.1")
    new_overlay.parent.mkdir(parents=True)
    new_overlay.write_bytes(b"prepared")
    intent: dict[str, Any] = {"from": "1.0", "to": "1.1", "old_instance_id": "v-old", "new_instance_id": "v-new",
                              "state": "running", "track": "tiny-1.*", "down": down}
    host.state.begin("swap", "v", intent)
    seeds = Seeds()
    virt: Any = Untouchable()
    prov: Any = seeds
    none: Any = None
    swapper = Swapper(host.cfg, host.state, host.catalog, virt, prov, accel=lambda: none, lock=none)
    if down is None:  # an entry that says nothing (or that the batch went down) is restored: libvirt is used
        with pytest.raises(AssertionError, match="libvirt used"):
            swapper.recover()
        return
    swapper.recover()
    assert host.state.pending() == [] and not new_overlay.exists()
    assert seeds.written == [("v", "v-old")]  # the seed has the old instance-id again
    vm = host.state.vm("v")
    assert vm is not None and (vm.state, vm.version, vm.instance_id) == (VmState.RUNNING, "1.0", "v-old")
    assert "undone before the VM went down" in host.state.events(vm="v")[-1].message


def test_advance_merges_into_an_open_entry(host: Host) -> None:
    i = host.state.begin("swap", "v", {"from": "1.0", "down": False})
    host.state.advance(i, down=True)
    assert host.state.pending()[0].intent == {"from": "1.0", "down": True}
    host.state.done(i)
    with pytest.raises(ValueError):
        host.state.advance(i, down=True)


def test_a_canary_cut_short_is_booted_again(host: Host) -> None:
    """Its domain and files are removed by Canary.recover; the rollout stayed `canary running`,
    which no later step ever changed: the rollout never went on."""
    r = rollouts(host, Swaps(host.state))
    ro = r.start("tiny", 1)
    assert ro is not None
    host.state.set_canary(ro.id, "running")  # then SIGKILL while the canary booted
    r.recover()
    row = host.state.rollout(ro.id)
    assert row is not None and row.canary == "pending"


def test_a_booting_canary_counts_against_capacity(tmp_path: Path) -> None:
    """The canary's room is checked when its rollout starts; while it boots, its journal entry
    holds that room, so a tenant's create cannot take it (no libvirt is called: the check is before
    anything is created)."""
    from agent.errors import Conflict
    from agent.provision import Provisioner

    cfg = Config(state_dir=tmp_path, capacity_vcpus=2, capacity_memory_mib=1024)
    state = State(cfg.db_path)
    prov = Provisioner(cfg, state, Catalog(cfg, state, lambda: CAPS), None, lambda: None)  # type: ignore[arg-type]
    one = VmSpec.model_validate({"name": "w", "owner": "t", "image": "tiny-1.*", "cpus": 2,
                                 "ssh_keys": [new_ed25519("t").public]})
    prov.check_capacity([one])  # room for it alone
    entry = state.begin("canary", "canary_0a1b2c3d", {"root": str(tmp_path / "canary"), "target": "tiny-1.1",
                                                      "cpus": 1, "memory": 256})
    with pytest.raises(Conflict, match="cpus: would take this host to 3 vCPUs, beyond its capacity of 2"):
        prov.check_capacity([one])
    state.done(entry)
    prov.check_capacity([one])
    state.close()
