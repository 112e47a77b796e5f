"""Shared fixtures. Integration fixtures always clean up what they created, even on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.host import Host
from agent.seed import KeyPair, new_ed25519
from agent.state import host_lock

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("HVAGENT_IMAGES", ROOT / "images" / "cache" / "out"))
# QEMU runs as an unprivileged user; pytest's tmp_path (0700 under /tmp) is not reachable for it.
TEST_ROOT = Path("/var/lib/hvagent-test")


def image(name: str) -> Path:
    path = IMAGES / f"{name}.qcow2"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the test images first with `make images`")
    return path


def luks_qcow2(path: Path, size: str = "64M") -> Path:
    """A LUKS-encrypted qcow2 at `path`. qemu-img (7.2) sizes its key derivation by timing a first
    PBKDF2 round in thread CPU time, which the kernel counts in ticks: when that round reads 0 ms
    it stops with "Unable to get accurate CPU usage" (about 1 run in 5 here), so that failure,
    and only that one, is tried again. A 10 ms target keeps each try short."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hunter2",
            "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "--", str(path), size]
    for _ in range(8):
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            return path
        assert "Unable to get accurate CPU usage" in r.stderr, r.stderr
    pytest.fail(f"qemu-img create of a LUKS image, 8 tries: {r.stderr.strip()}")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    path = TEST_ROOT / uuid.uuid4().hex[:8]
    path.mkdir(mode=0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cfg(state_dir: Path) -> config_mod.Config:
    # No canary boot unless a test is about it (rollouts.start(..., canary=True)): it would add a
    # boot to every rollout of every test.
    return config_mod.load(None, state_dir=state_dir, port_min=22300, port_max=22399, health_timeout=90.0,
                           canary=False)


def destroy_all(h: Host) -> None:
    """Remove every VM of this host's state, purging data disks; then close it."""
    with host_lock(h.cfg.state_dir):
        for vm in h.state.vms():
            try:
                h.provisioner.destroy(vm.name, purge=True)
            except Exception as e:  # keep cleaning the others
                print(f"cleanup of {vm.name} failed: {e}")
    h.close()


@pytest.fixture
def host(cfg: config_mod.Config) -> Iterator[Host]:
    h = Host(cfg)
    yield h
    destroy_all(h)


@pytest.fixture
def tenant_key() -> KeyPair:
    return new_ed25519("tenant@test")


def hvagent(state_dir: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, as a user would."""
    exe = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "hvagent"
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "hvagent"
    env = {**os.environ, "HVAGENT_CONFIG": str(state_dir / "config.yaml")}
    if not (state_dir / "config.yaml").exists():
        (state_dir / "config.yaml").write_text(
            f"state_dir: {state_dir}\nport_min: 22400\nport_max: 22499\nhealth_timeout: 90\n")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, check=check, timeout=900)


def store_snapshot(state_dir: Path) -> tuple[list[str], str]:
    """The image store's files and ``images list --json``: equal before and after means nothing changed."""
    store = state_dir / "images"
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*")) if store.exists() else []
    return files, hvagent(state_dir, "images", "list", "--json").stdout


DAEMON_LOG_LINES = 80


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used a daemon gets the daemon's own account of it: every thread's stack
    (its SIGUSR1 dump) and the last lines of its log, in the report. CI keeps only the report."""
    report = yield
    if call.when == "call" and report.failed:
        from tests.integration.daemon_fixture import Daemon  # only integration tests have daemons

        funcargs = getattr(item, "funcargs", {})
        seen: set[int] = set()
        for value in funcargs.values():
            d = value if isinstance(value, Daemon) else getattr(value, "d", None)
            if not isinstance(d, Daemon) or d.proc.pid in seen:
                continue
            seen.add(d.proc.pid)
            if d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGUSR1)
                time.sleep(1)
            with contextlib.suppress(OSError):
                lines = d.log.read_text(errors="replace").splitlines()[-DAEMON_LOG_LINES:]
                report.sections.append((f"daemon pid {d.proc.pid}: {d.log}, last {len(lines)} lines",
                                        "\n".join(lines)))
    return report
