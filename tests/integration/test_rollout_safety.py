"""Safer rollouts through the daemon (issue 17): the canary boot before the first batch, a host
fault that pauses the rollout instead of marking the image bad, and a VM its tenant stopped,
which no rollout starts and which is swapped once it runs again.

One daemon (canary on), two VMs of alice on the latest track of tiny 1.x; the host fault is
real: the first VM's directory made immutable (``chattr +i``), so its new overlay cannot be
created, as on a full or read-only disk.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent.provision import VmPaths
from agent.rollout import STOPPED_SKIP
from agent.seed import new_ed25519
from tests.conftest import image
from tests.integration.daemon_fixture import Daemon, daemon_fixture
from tests.integration.test_daemon import cli, publish

pytestmark = [pytest.mark.integration, pytest.mark.daemon, pytest.mark.timeout(900)]

A, B = "safe-a", "safe-b"


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    yield from daemon_fixture(state_dir, extra={"canary": True, "shutdown_timeout": 5})


def rollouts(d: Daemon) -> list[dict[str, Any]]:
    r = d.call("ops", "GET", "/v1/rollouts", params={"all": True})
    assert r.status_code == 200, r.text
    return list(r.json())


def wait_rollout(d: Daemon, rid: int, states: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    ro: dict[str, Any] = {}
    while time.monotonic() < deadline:
        ro = d.call("ops", "GET", f"/v1/rollouts/{rid}").json()
        if ro["state"] in states:
            return ro
        time.sleep(1)
    raise AssertionError(f"rollout {rid} never reached {states}: {ro}")


def kinds(d: Daemon, vm: str) -> list[str]:
    return [e["kind"] for e in d.events(vm)]


def host_kinds(d: Daemon) -> list[str]:
    r = d.call("ops", "GET", "/v1/events")
    assert r.status_code == 200, r.text
    return [e["kind"] for e in r.json()]


def test_canary_host_fault_and_a_stopped_vm(daemon: Daemon) -> None:
    d = daemon
    publish(d, "tiny-1.0")
    key = new_ed25519("alice").public
    for name in (A, B):
        r = d.call("alice", "POST", "/v1/vms", json={"name": name, "image": "tiny-1.*", "ssh_keys": [key]})
        assert r.status_code == 202, r.text
    for name in (A, B):
        assert d.wait_vm("alice", name, ("running", "failed"))["state"] == "running"
    r = d.call("alice", "POST", f"/v1/vms/{B}/stop")
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    root = VmPaths.of(config_mod.load(d.state_dir / "config.yaml"), A).root
    subprocess.run(["chattr", "+i", str(root)], check=True)
    try:
        # 1.1 published: the canary boots it and passes; A's swap cannot even be prepared (a host
        # fault): the rollout pauses, 1.1 stays active, and A never went down
        before = d.call("ops", "GET", f"/v1/vms/{A}").json()
        r = cli(d, "images", "publish", str(image("tiny-1.1")))  # follows the rollout: a host fault is exit 1
        assert r.returncode == 1 and f"paused: host fault on {A}: could not prepare tiny-1.1" in r.stderr, r.stderr
        [ro] = rollouts(d)
        ro = wait_rollout(d, ro["id"], ("paused", "halted", "done"))
        assert ro["state"] == "paused" and ro["canary"] == "passed", ro
        assert ro["reason"].startswith(f"host fault on {A}: could not prepare tiny-1.1: "), ro
        assert {s["vm"]: s["state"] for s in ro["vms"]} == {A: "pending", B: "pending"}
        images = {i["version"]: i["state"] for i in d.call("ops", "GET", "/v1/images").json()}
        assert images["1.1"] == "active", images
        after = d.call("ops", "GET", f"/v1/vms/{A}").json()
        assert (after["state"], after["version"]) == ("running", "1.0"), after
        assert "swap.shutoff" not in kinds(d, A) and "swap.failed" in kinds(d, A)
        assert "rollout.canary" in host_kinds(d)
        assert after["uuid"] == before["uuid"]
        table = cli(d, "rollout", "status").stdout
        assert "(canary)" in table and "passed" in table, table
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)

    # the host fixed: resume. A moves; B, stopped by its tenant, is skipped and stays off
    r = d.call("ops", "POST", "/v1/rollouts/tiny-1/resume")
    assert r.status_code == 200, r.text
    ro = wait_rollout(d, ro["id"], ("done", "halted", "paused"))
    assert ro["state"] == "done", ro
    steps = {s["vm"]: s for s in ro["vms"]}
    assert steps[A]["state"] == "done" and (steps[B]["state"], steps[B]["reason"]) == ("skipped", STOPPED_SKIP)
    assert d.call("alice", "GET", f"/v1/vms/{A}").json()["version"] == "1.1"
    b = d.call("alice", "GET", f"/v1/vms/{B}").json()
    assert (b["state"], b["version"]) == ("stopped", "1.0"), b
    since_stop = kinds(d, B)[kinds(d, B).index("vm.stopped"):]
    assert "swap.skipped" in since_stop and not {"vm.starting", "swap.start"} & set(since_stop), since_stop
    state = subprocess.run(["virsh", "domstate", B], capture_output=True, text=True).stdout.strip()
    assert state == "shut off", state

    # its tenant starts it: it runs on 1.0, then the daemon's catch-up rollout swaps it to 1.1
    r = d.call("alice", "POST", f"/v1/vms/{B}/start")
    assert r.status_code == 202, r.text
    d.wait_vm("alice", B, ("running",))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and d.call("alice", "GET", f"/v1/vms/{B}").json()["version"] != "1.1":
        time.sleep(2)
    b = d.call("alice", "GET", f"/v1/vms/{B}").json()
    assert (b["state"], b["version"]) == ("running", "1.1"), b
    later = [r for r in rollouts(d) if r["id"] > ro["id"]]
    assert [([s["vm"] for s in r["vms"]], r["state"], r["canary"]) for r in later] == [([B], "done", "passed")], later
    assert "rollout.catch-up" in host_kinds(d)
