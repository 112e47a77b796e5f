"""What the benchmarks share: a result row, hosts in a throwaway state directory, bare QEMU."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import config as config_mod  # noqa: E402
from agent.health import Endpoint, wait_healthy  # noqa: E402
from agent.host import Host  # noqa: E402
from agent.seed import meta_data, new_ed25519, user_data, write_seed  # noqa: E402
from agent.spec import VmSpec, parse_spec  # noqa: E402
from agent.state import host_lock  # noqa: E402

IMAGES = ROOT / "images" / "cache" / "out"
WORK = Path("/var/lib/hvagent-bench")
OUT = ROOT / "bench"
MiB = 1 << 20


@dataclass
class Result:
    name: str
    baseline: str
    unit: str
    ours: list[float]
    base: list[float]
    target: str
    limit: float | None
    notes: str = ""
    ratios: list[float] = field(default_factory=list)
    measured: str = ""  # when: rows a run skipped (--only) keep theirs in results.json

    def finish(self) -> Result:
        if not self.ratios:
            self.ratios = [o / b for o, b in zip(self.ours, self.base, strict=False) if b]
        return self

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "reported"
        return "met" if self.median <= self.limit else f"missed by {(self.median / self.limit - 1) * 100:.0f}%"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


# -- setup ------------------------------------------------------------------------------------
def new_host(tag: str, **overrides: object) -> Host:
    WORK.mkdir(mode=0o711, exist_ok=True)
    os.chmod(WORK, 0o711)
    state = WORK / tag
    shutil.rmtree(state, ignore_errors=True)
    settings: dict[str, object] = {"port_min": 22900, "port_max": 22999, "health_timeout": 180.0, **overrides}
    cfg = config_mod.load(None, state_dir=state, **settings)
    return Host(cfg)


def clean(host: Host) -> None:
    with host_lock(host.cfg.state_dir):
        for vm in host.state.vms():
            host.provisioner.destroy(vm.name, purge=True)
    host.close()
    shutil.rmtree(host.cfg.state_dir, ignore_errors=True)


def spec_of(name: str, track: str, key: str, **extra: object) -> VmSpec:
    return parse_spec({"vms": [{"name": name, "owner": "bench", "image": track, "ssh_keys": [key],
                                "health": {"timeout": 300}, **extra}]}).vms[0]


def padded_image(src: Path, dst_dir: Path, name: str, allocated: int) -> Path:
    """A publishable copy of ``src`` (same guest) whose qcow2 holds ``allocated`` bytes of data."""
    raw = dst_dir / f"{name}.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(raw)], check=True)
    base_size = raw.stat().st_size
    block = os.urandom(MiB)
    with open(raw, "r+b") as f:
        f.seek(base_size)
        for _ in range(max(0, (allocated - base_size) // MiB)):
            f.write(block)
    out = dst_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    m = yaml.safe_load(src.with_suffix(".yaml").read_text())
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(out)],
                                     capture_output=True, text=True, check=True).stdout)
    m.update(name=name, sha256=sha256(out), virtual_size=info["virtual-size"])
    out.with_suffix(".yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    return out


# -- bare QEMU baseline ----------------------------------------------------------------------
@contextmanager
def bare_qemu(image: Path, agent_key: str, agent_pub: str) -> Iterator[Callable[[], float]]:
    """qemu-system-x86_64 by hand on a copy of the image: same TCG, seed and forward. Yields a timer."""
    d = WORK / f"bare-{uuid.uuid4().hex[:6]}"
    d.mkdir(mode=0o700)
    disk = d / "disk.qcow2"
    shutil.copyfile(image, disk)
    host_key = new_ed25519("bare host key")
    seed = d / "seed.iso"
    write_seed(seed, meta_data(f"bare-{d.name}", "bare"), user_data([agent_pub], host_key, "bare"))
    port = free_port()
    manifest = yaml.safe_load(image.with_suffix(".yaml").read_text())
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256", "-smp", "1", "-display", "none",
            "-no-user-config", "-nodefaults", "-serial", f"file:{d / 'console.log'}",
            "-drive", f"file={disk},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0"]
    if manifest["firmware"] == "uefi":
        shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", d / "vars.fd")
        argv += ["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                 "-drive", f"if=pflash,format=raw,file={d / 'vars.fd'}"]
    proc: subprocess.Popen[bytes] | None = None

    def boot() -> float:
        nonlocal proc
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(Endpoint("127.0.0.1", port, "root", host_key.public), agent_key,
                     str(manifest["guest_version_id"]), None, 180, interval=0.5)
        return time.monotonic() - t0

    try:
        yield boot
    finally:
        if proc is not None:
            terminate(proc, 10)
        shutil.rmtree(d, ignore_errors=True)


def terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def provision_time(host: Host, name: str, track: str, key: str) -> float:
    t0 = time.monotonic()
    with host_lock(host.cfg.state_dir):
        host.provisioner.create(spec_of(name, track, key))
    host.provisioner.wait(name)
    took = time.monotonic() - t0
    with host_lock(host.cfg.state_dir):
        host.provisioner.destroy(name, purge=True)
    return took

