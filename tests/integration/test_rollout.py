"""The latest track on real guests: swaps, batches, rollback, retirement, garbage collection, abort.

VMs start on tiny-1.0 (pinned), tiny-1.* (two, with data disks) and tiny-2.*. Every check of
a guest goes over SSH with the VM's pinned host key, so a swap that lost the host key fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from agent import health
from agent.errors import InputError
from agent.host import Host
from agent.provision import VmPaths
from agent.rollout import RetirePolicy
from agent.seed import KeyPair
from agent.spec import parse_spec
from agent.state import ImageState, RolloutState, StepState
from tests.conftest import hvagent, image

pytestmark = pytest.mark.integration


def guest(host: Host, name: str, key: KeyPair, command: str) -> str:
    row = host.provisioner.row(name)
    return health.run(host.provisioner.endpoint(row), key.private, command).stdout


def version_id(host: Host, name: str, key: KeyPair) -> str:
    return health.os_release(guest(host, name, key, "cat /etc/os-release"))["VERSION_ID"]


def publish_and_roll(host: Host, ref: str) -> RolloutState | None:
    row = host.catalog.publish(image(ref))
    ro = host.rollouts.on_publish(row)
    return None if ro is None else host.rollouts.run(ro.id).state


def test_latest_track_rollout_rollback_retire_gc(host: Host, state_dir: Path, tenant_key: KeyPair) -> None:
    for ref in ("tiny-1.0", "tiny-2.0"):
        host.catalog.publish(image(ref))
    vms = [{"name": "t-pin", "image": "tiny-1.0"},
           {"name": "t-lat-a", "image": "tiny-1.*", "data_disk": 1},
           {"name": "t-lat-b", "image": "tiny-1.*", "data_disk": 1},
           {"name": "t-two", "image": "tiny-2.*"}]
    spec = parse_spec({"vms": [{**v, "owner": "alice", "ssh_keys": [tenant_key.public],
                                "health": {"timeout": 45, "command": "test -d /etc"}} for v in vms]})
    for vm in spec.vms:
        host.provisioner.create(vm)
    for vm in spec.vms:
        host.provisioner.wait(vm.name)
    before = {v.name: v for v in host.state.vms()}
    sums = {}
    for name in ("t-lat-a", "t-lat-b"):
        guest(host, name, tenant_key, f"head -c 1048576 /dev/urandom > /data/f && echo {name} >> /data/f && sync")
        sums[name] = guest(host, name, tenant_key, "sha256sum /data/f").split()[0]

    # 1.1: only the two latest-track VMs of family 1 move, one batch at a time.
    assert publish_and_roll(host, "tiny-1.1") is RolloutState.DONE
    [ro] = host.state.rollouts()
    steps = {s.vm: s for s in host.state.steps(ro.id)}
    assert set(steps) == {"t-lat-a", "t-lat-b"} and {s.batch for s in steps.values()} == {0, 1}
    first, second = sorted(steps.values(), key=lambda s: s.batch)
    assert first.finished_at is not None and second.started_at is not None
    assert first.finished_at <= second.started_at  # batch 2 started only after batch 1 was healthy
    for name in ("t-lat-a", "t-lat-b"):
        assert version_id(host, name, tenant_key) == "1.1"  # pinned host key checked by health.run
        assert guest(host, name, tenant_key, "sha256sum /data/f").split()[0] == sums[name]
        row = host.state.vm(name)
        assert row is not None and row.version == "1.1" and row.instance_id != before[name].instance_id
        assert (row.uuid, row.mac, row.host_port) == (before[name].uuid, before[name].mac, before[name].host_port)
        assert not VmPaths.of(host.cfg, name).os_disk("1.0").exists()  # old overlay deleted
        assert steps[name].state is StepState.DONE and (steps[name].downtime or 0) > 0
    assert version_id(host, "t-pin", tenant_key) == "1.0" and version_id(host, "t-two", tenant_key) == "2.0"
    swaps = [e for e in host.state.events() if e.kind == "swap.done"]
    assert len(swaps) == 2 and all(e.duration and "downtime" in e.message for e in swaps)

    # broken 1.2 with the canary: the throwaway VM does not pass health, the version is marked bad
    # and the rollout halts before any tenant's VM goes down.
    ids = {n: (r.instance_id, r.updated_at) for n in ("t-lat-a", "t-lat-b") if (r := host.state.vm(n)) is not None}
    host.catalog.publish(image("tiny-1.2-broken-ssh"))
    ro2 = host.rollouts.start("tiny", 1, canary=True)
    assert ro2 is not None and ro2.canary == "pending"
    assert host.rollouts.run(ro2.id).state is RolloutState.HALTED
    ro2 = host.state.rollouts()[-1]
    assert ro2.canary == "failed" and ro2.reason and ro2.reason.startswith("canary of tiny-1.2: "), ro2
    assert {s.state for s in host.state.steps(ro2.id)} == {StepState.PENDING}
    for name, before_ids in ids.items():
        row = host.state.vm(name)
        assert row is not None and (row.instance_id, row.updated_at) == before_ids  # never touched
        assert version_id(host, name, tenant_key) == "1.1"
    bad = host.state.image("tiny", "1.2")
    assert bad is not None and bad.state is ImageState.BAD
    assert not [e for e in host.state.events() if e.kind in ("swap.start", "swap.shutoff") and "1.2" in e.message]
    assert not [n for n in host.virt.managed() if n.startswith("canary_")]
    assert list((host.cfg.state_dir / "canary").iterdir()) == []

    # panicking 1.3 without the canary: the first VM rolls back and is healthy, the rollout halts,
    # the second is untouched.
    host.catalog.publish(image("tiny-1.3-panic"))
    ro3 = host.rollouts.start("tiny", 1, canary=False)
    assert ro3 is not None and host.rollouts.run(ro3.id).state is RolloutState.HALTED
    ro3 = host.state.rollouts()[-1]
    steps3 = {s.vm: s for s in host.state.steps(ro3.id)}
    rolled = [s for s in steps3.values() if s.state is StepState.ROLLED_BACK]
    untouched = [s for s in steps3.values() if s.state is StepState.PENDING]
    assert len(rolled) == 1 and len(untouched) == 1
    for s in (*rolled, *untouched):
        assert version_id(host, s.vm, tenant_key) == "1.1"
        row = host.state.vm(s.vm)
        assert row is not None and row.version == "1.1" and str(row.state) == "running"
        assert guest(host, s.vm, tenant_key, "sha256sum /data/f").split()[0] == sums[s.vm]
    assert not VmPaths.of(host.cfg, rolled[0].vm).os_disk("1.3").exists()
    bad = host.state.image("tiny", "1.3")
    assert bad is not None and bad.state is ImageState.BAD and ro3.reason and rolled[0].vm in ro3.reason
    assert any(e.kind == "rollback.done" for e in host.state.events(rolled[0].vm))
    assert any(e.kind == "swap.failed" and "(image fault)" in e.message for e in host.state.events(rolled[0].vm))

    # 2.1: family 2 moves, family 1 stays exactly as it is.
    fam1 = {v.name: (v.version, v.instance_id) for v in host.state.vms() if v.image == "tiny" and v.name != "t-two"}
    assert publish_and_roll(host, "tiny-2.1") is RolloutState.DONE
    assert version_id(host, "t-two", tenant_key) == "2.1"
    assert {v.name: (v.version, v.instance_id) for v in host.state.vms() if v.name != "t-two"} == fam1

    # retire 1.0 with a grace period: no new pins, the pinned VM is warned in ps and in events.
    host.rollouts.retire("tiny-1.0", 14 * 86400, RetirePolicy.MOVE)
    [ps_pin] = [v for v in json.loads(hvagent(state_dir, "ps", "--json").stdout) if v["name"] == "t-pin"]
    assert "retired tiny-1.0" in ps_pin["warning"] and ps_pin["version"] == "1.0"
    assert any(e.kind == "vm.warning" for e in host.state.events("t-pin"))
    with pytest.raises(InputError, match="retired"):
        host.provisioner.create(parse_spec({"vms": [{"name": "t-new", "owner": "a", "image": "tiny-1.0",
                                                     "ssh_keys": [tenant_key.public]}]}).vms[0])
    # ... and with no grace: the pinned VM moves to the newest good 1.x (1.1; 1.2 and 1.3 are bad).
    host.rollouts.retire("tiny-1.0", 0, RetirePolicy.MOVE)
    assert version_id(host, "t-pin", tenant_key) == "1.1"
    pin = host.state.vm("t-pin")
    assert pin is not None and pin.track == "tiny-1.1" and pin.version == "1.1"
    assert any(e.kind == "retire.moved" for e in host.state.events("t-pin"))

    # garbage collection: 1.0 and 2.0 are unused; the newest two of family 1 (1.3, 1.2) stay, and
    # 1.1, which the VMs run.
    removed = host.rollouts.gc(keep=2)
    assert "tiny-1.0" in removed and "tiny-1.1" not in removed and "tiny-1.2" not in removed
    assert not (host.cfg.store / "tiny" / "tiny-1.0.qcow2").exists()

    # publishing an older minor than the newest changes nothing.
    now = {v.name: (v.version, v.instance_id) for v in host.state.vms()}
    assert publish_and_roll(host, "tiny-1.0") is None
    assert {v.name: (v.version, v.instance_id) for v in host.state.vms()} == now
    assert host.state.events()[-1].kind == "rollout.none"


def test_abort_mid_rollout_leaves_every_vm_healthy(state_dir: Path, tenant_key: KeyPair) -> None:
    (state_dir / "config.yaml").write_text(f"state_dir: {state_dir}\nport_min: 22400\nport_max: 22499\n"
                                           "health_timeout: 90\nmax_unavailable: '1'\ncanary: false\n")
    assert hvagent(state_dir, "images", "publish", str(image("tiny-1.0"))).returncode == 0
    spec = state_dir / "spec.yaml"
    spec.write_text(json.dumps({"vms": [{"name": n, "owner": "bob", "image": "tiny-1.*",
                                         "ssh_keys": [tenant_key.public]} for n in ("t-ab-1", "t-ab-2", "t-ab-3")]}))
    try:
        r = hvagent(state_dir, "apply", str(spec))
        assert r.returncode == 0, r.stderr
        # policy manual: publishing moves nothing until `rollout start`
        r = hvagent(state_dir, "images", "publish", "--policy", "manual", str(image("tiny-1.1")))
        assert r.returncode == 0, r.stderr
        assert {v["version"] for v in json.loads(hvagent(state_dir, "ps", "--json").stdout)} == {"1.0"}
        assert "rollout.waiting" in hvagent(state_dir, "events", "--json").stdout
        exe = Path(".venv/bin/hvagent").resolve()
        env_cfg = {"HVAGENT_CONFIG": str(state_dir / "config.yaml")}
        publish = subprocess.Popen([str(exe), "rollout", "start", "tiny-1"],
                                   env={**os.environ, **env_cfg}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = json.loads(hvagent(state_dir, "rollout", "status", "--json").stdout or "[]")
            if status and any(v["state"] == "swapping" for v in status[0]["vms"]):
                break
            time.sleep(0.5)
        else:
            publish.kill()
            pytest.fail("no VM started swapping")
        r = hvagent(state_dir, "rollout", "abort", "tiny-1")
        assert r.returncode == 0, r.stderr
        stdout, stderr = publish.communicate(timeout=300)
        assert publish.returncode == 0, stdout + stderr
        [ro] = json.loads(hvagent(state_dir, "rollout", "status", "--json", "--all").stdout)
        assert ro["state"] == "aborted"
        states = sorted(v["state"] for v in ro["vms"])
        assert states == ["done", "pending", "pending"], ro
        ps = {v["name"]: v for v in json.loads(hvagent(state_dir, "ps", "--json").stdout)}
        assert sorted(v["version"] for v in ps.values()) == ["1.0", "1.0", "1.1"]
        for name, v in ps.items():
            assert v["state"] == "running" and v["domain"] == "running"
            out = hvagent(state_dir, "ssh", name, "--", "cat", "/etc/os-release")
            assert out.returncode == 0 and f"VERSION_ID={v['version']}" in out.stdout, out.stderr
    finally:
        for n in ("t-ab-1", "t-ab-2", "t-ab-3"):
            hvagent(state_dir, "destroy", n, "--purge")


@pytest.mark.parametrize("args,needle", [
    (["rollout", "start", "nope-1"], "nope-1 is not in the catalog"),
    (["rollout", "start", "tiny-9"], "tiny-9 is not in the catalog"),
    (["rollout", "start", "tiny"], "family"),
    (["rollout", "start", "tiny-1", "--max-unavailable", "0"], "max-unavailable"),
    (["rollout", "start", "tiny-1", "--max-unavailable", "101%"], "max-unavailable"),
    (["rollout", "pause", "tiny-7"], "tiny-7"),
    (["images", "retire", "tiny-1.9"], "tiny-1.9"),
    (["images", "retire", "tiny-1.0"], "only active version"),
    (["images", "retire", "tiny-1.0", "--grace", "soon"], "grace"),
])
def test_rollout_and_retire_bad_input(state_dir: Path, args: list[str], needle: str) -> None:
    assert hvagent(state_dir, "images", "publish", str(image("tiny-1.0"))).returncode == 0
    before = (hvagent(state_dir, "images", "list", "--json").stdout, hvagent(state_dir, "events", "--json").stdout)
    r = hvagent(state_dir, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    after = (hvagent(state_dir, "images", "list", "--json").stdout, hvagent(state_dir, "events", "--json").stdout)
    assert after == before


def test_pause_then_resume(state_dir: Path, tenant_key: KeyPair) -> None:
    (state_dir / "config.yaml").write_text(f"state_dir: {state_dir}\nport_min: 22400\nport_max: 22499\n"
                                           "health_timeout: 90\nmax_unavailable: '1'\ncanary: false\n")
    assert hvagent(state_dir, "images", "publish", str(image("tiny-1.0"))).returncode == 0
    spec = state_dir / "spec.yaml"
    names = ("t-pr-1", "t-pr-2")
    spec.write_text(json.dumps({"vms": [{"name": n, "owner": "bob", "image": "tiny-1.*",
                                         "ssh_keys": [tenant_key.public]} for n in names]}))
    try:
        assert hvagent(state_dir, "apply", str(spec)).returncode == 0
        env = {**os.environ, "HVAGENT_CONFIG": str(state_dir / "config.yaml")}
        publish = subprocess.Popen([str(Path(".venv/bin/hvagent").resolve()), "images", "publish",
                                    str(image("tiny-1.1"))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = json.loads(hvagent(state_dir, "rollout", "status", "--json").stdout or "[]")
            if status and any(v["state"] == "swapping" for v in status[0]["vms"]):
                break
            time.sleep(0.5)
        else:
            publish.kill()
            pytest.fail("no VM started swapping")
        assert hvagent(state_dir, "rollout", "pause").returncode == 0
        out, err = publish.communicate(timeout=300)
        assert publish.returncode == 0 and "paused" in out, out + err
        [ro] = json.loads(hvagent(state_dir, "rollout", "status", "--json").stdout)
        assert ro["state"] == "paused" and sorted(v["state"] for v in ro["vms"]) == ["done", "pending"]
        r = hvagent(state_dir, "rollout", "resume", "tiny-1")
        assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
        ps = json.loads(hvagent(state_dir, "ps", "--json").stdout)
        assert [(v["version"], v["state"]) for v in ps] == [("1.1", "running"), ("1.1", "running")]
        assert json.loads(hvagent(state_dir, "rollout", "status", "--json").stdout) == []
    finally:
        for n in names:
            hvagent(state_dir, "destroy", n, "--purge")


def test_maintenance_windows_hold_swaps_until_they_open(host: Host, tenant_key: KeyPair) -> None:
    """Issue 17, point 3, with the rollout's clock injected: a VM goes down only inside its window;
    the rollout says which VMs wait and when their windows open; --now overrides."""
    saturday = dt.datetime(2026, 12, 5, tzinfo=dt.UTC).timestamp()
    clock = [saturday - 12 * 3600]  # Friday noon
    host.rollouts.clock = lambda: clock[0]
    host.catalog.publish(image("tiny-1.0"))
    windows = {"w-sat": "Sat 02:00-04:00", "w-sun": "Sun 01:00-02:00"}
    spec = parse_spec({"vms": [{"name": n, "owner": "alice", "image": "tiny-1.*", "ssh_keys": [tenant_key.public],
                                "maintenance": {"window": w, "tz": "UTC"}} for n, w in windows.items()]})
    for vm in spec.vms:
        host.provisioner.create(vm)
    for vm in spec.vms:
        host.provisioner.wait(vm.name)
    host.catalog.publish(image("tiny-1.1"))
    ro = host.rollouts.start("tiny", 1, max_unavailable="2")
    assert ro is not None

    # Friday noon: both windows closed; nothing goes down, and the rollout says when each opens
    ro = host.rollouts.run(ro.id)
    assert ro.state is RolloutState.RUNNING and ro.reason == (
        "waiting for maintenance windows: w-sat opens 2026-12-05 02:00 UTC (Sat 02:00-04:00 UTC), "
        "w-sun opens 2026-12-06 01:00 UTC (Sun 01:00-02:00 UTC)"), ro.reason
    assert {v.name: v.version for v in host.state.vms()} == {"w-sat": "1.0", "w-sun": "1.0"}
    assert {s.vm: s.state for s in host.state.steps(ro.id)} == {"w-sat": StepState.PENDING,
                                                               "w-sun": StepState.PENDING}
    assert not [e for e in host.state.events() if e.kind == "swap.start"]

    # Saturday 02:30: w-sat's window is open, it moves; w-sun still waits
    clock[0] = saturday + 2.5 * 3600
    ro = host.rollouts.run(ro.id)
    assert ro.state is RolloutState.RUNNING and ro.reason == \
        "waiting for maintenance windows: w-sun opens 2026-12-06 01:00 UTC (Sun 01:00-02:00 UTC)", ro.reason
    assert version_id(host, "w-sat", tenant_key) == "1.1"
    assert {v.name: v.version for v in host.state.vms()} == {"w-sat": "1.1", "w-sun": "1.0"}

    # the operator overrides: abort, start again with --now; w-sun moves outside its window
    host.rollouts.abort("tiny-1")
    now = host.rollouts.start("tiny", 1, now=True)
    assert now is not None and [s.vm for s in host.state.steps(now.id)] == ["w-sun"]
    assert host.rollouts.run(now.id).state is RolloutState.DONE
    assert version_id(host, "w-sun", tenant_key) == "1.1"
