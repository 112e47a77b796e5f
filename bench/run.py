"""hvagent benchmarks: ratios against baselines measured in the same run (`make bench`).

Each benchmark names its baseline, runs interleaved pairs (or repeated runs), and reports the
median ratio with its min and max. Writes bench/results.json, bench/results.md and
bench/rollout.png (a timeline of one rollout). Never part of `make test`.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass, field
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
from agent.state import RolloutState, host_lock  # noqa: E402

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
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def provision_time(host: Host, name: str, track: str, key: str) -> float:
    t0 = time.monotonic()
    with host_lock(host.cfg.state_dir):
        host.provisioner.create(spec_of(name, track, key))
    host.provisioner.wait(name)
    took = time.monotonic() - t0
    with host_lock(host.cfg.state_dir):
        host.provisioner.destroy(name, purge=True)
    return took


# -- benchmarks -------------------------------------------------------------------------------
def bench_provision(pairs: int) -> tuple[Result, list[float]]:
    host = new_host("provision")
    try:
        host.catalog.publish(IMAGES / "tiny-1.0.qcow2")
        host.accelerator()
        key = host.provisioner.agent_key
        ours: list[float] = []
        base: list[float] = []
        for i in range(pairs):
            order = ("bare", "ours") if i % 2 == 0 else ("ours", "bare")
            for which in order:
                if which == "bare":
                    with bare_qemu(IMAGES / "tiny-1.0.qcow2", key.private, key.public) as boot:
                        base.append(boot())
                else:
                    ours.append(provision_time(host, f"b-prov-{i}", "tiny-1.0", key.public))
            log(f"provision pair {i + 1}: hvagent {ours[-1]:.1f}s, bare qemu {base[-1]:.1f}s")
        return Result("provisioning overhead", "bare qemu-system-x86_64 on a copy of the image, same TCG, seed and "
                      "port forward, until SSH answers with VERSION_ID", "s", ours, base, "median ratio <= 1.10",
                      1.10).finish(), base
    finally:
        clean(host)


def bench_disks(pairs: int) -> Result:
    host = new_host("disks")
    tmp = WORK / "disks-src"
    tmp.mkdir(exist_ok=True)
    try:
        small = padded_image(IMAGES / "tiny-1.0.qcow2", tmp, "small", 40 * MiB)
        big = padded_image(IMAGES / "tiny-1.0.qcow2", tmp, "big", 4096 * MiB)
        for img in (small, big):
            host.catalog.publish(img)
        key = host.provisioner.agent_key.public
        ours: list[float] = []
        base: list[float] = []
        for i in range(pairs):
            order = ("small", "big") if i % 2 == 0 else ("big", "small")
            for which in order:
                t = provision_time(host, f"b-disk-{which}-{i}", f"{which}-1.0", key)
                (ours if which == "big" else base).append(t)
            log(f"disk pair {i + 1}: 4 GiB image {ours[-1]:.1f}s, 40 MiB image {base[-1]:.1f}s")
        copy = []
        for _ in range(2):
            t0 = time.monotonic()
            shutil.copyfile(big, tmp / "full-copy.qcow2")
            os.sync()
            copy.append(time.monotonic() - t0)
            (tmp / "full-copy.qcow2").unlink()
        return Result("disks cost O(1)", "provisioning from a base holding 40 MiB (vs one holding 4 GiB)", "s",
                      ours, base, "median ratio <= 1.05", 1.05,
                      notes=f"full-copy baseline (cp + sync of the 4 GiB image, as virt-clone would): median "
                            f"{statistics.median(copy):.1f}s before the guest even starts").finish()
    finally:
        clean(host)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_rollout(vms: int, max_unavailable: int, singles: int, bare: list[float]) \
        -> tuple[Result, Result, dict[str, Any]]:
    host = new_host("rollout", max_unavailable=str(max_unavailable), rollout_policy="manual",
                    capacity_vcpus=4 * (vms + 1))
    try:
        host.catalog.publish(IMAGES / "tiny-1.0.qcow2")
        key = host.provisioner.agent_key.public
        names = [f"b-ro-{i:02d}" for i in range(vms)]
        with host_lock(host.cfg.state_dir):
            for n in names:
                host.provisioner.create(spec_of(n, "tiny-1.*", key))
            host.provisioner.create(spec_of("b-single", "tiny-1.0", key))
        for n in [*names, "b-single"]:
            host.provisioner.wait(n)
        log(f"{vms + 1} VMs healthy on tiny-1.0")
        v11 = host.catalog.publish(IMAGES / "tiny-1.1.qcow2")
        v10 = host.state.image("tiny", "1.0")
        assert v10 is not None
        single: list[float] = []
        downtimes: list[float] = []
        with host_lock(host.cfg.state_dir):
            for i in range(singles):
                target = v11 if i % 2 == 0 else v10
                t0 = time.monotonic()
                [o] = host.swapper.swap_batch(["b-single"], target)
                single.append(time.monotonic() - t0)
                assert o.ok and o.downtime, o
                downtimes.append(o.downtime)
                log(f"single swap {i + 1}: {single[-1]:.1f}s, downtime {o.downtime:.1f}s")
            ro = host.rollouts.start("tiny", 1)
            assert ro is not None
            t0 = time.monotonic()
            done = host.rollouts.run(ro.id, say=log)
            wall = time.monotonic() - t0
        assert done.state is RolloutState.DONE, done
        batches = -(-vms // max_unavailable)
        ideal = batches * statistics.median(single)
        log(f"rollout of {vms} VMs, max_unavailable {max_unavailable}: {wall:.1f}s vs {ideal:.1f}s")
        steps = host.state.steps(ro.id)
        downtimes += [s.downtime for s in steps if s.downtime]
        timeline: dict[str, Any] = {"t0": min(s.started_at or 0 for s in steps), "batches": batches, "vms": {}}
        for s in steps:
            evs = {e.kind: e.ts for e in host.state.events(s.vm) if e.kind.startswith("swap.")
                   and (s.started_at or 0) - 1 <= e.ts <= (s.finished_at or 1e18) + 1}
            timeline["vms"][s.vm] = {"batch": s.batch, **evs}
        swap = Result("swap downtime", "bare boot-to-SSH of the new image (bare qemu, from the provisioning "
                      "benchmark)", "s", downtimes, [], "median ratio <= 1.25", 1.25,
                      ratios=[d / statistics.median(bare) for d in downtimes])
        roll = Result("rollout", f"{batches} x the median single swap ({vms} VMs, max_unavailable {max_unavailable})",
                      "s", [wall], [ideal], "ratio <= 1.2", 1.2).finish()
        return swap, roll, timeline
    finally:
        clean(host)


def bench_publish(runs: int) -> Result:
    host = new_host("publish", max_virtual_size=8 << 30)
    tmp = WORK / "publish-src"
    tmp.mkdir(exist_ok=True)
    try:
        img = padded_image(IMAGES / "tiny-1.0.qcow2", tmp, "pub", 2048 * MiB)
        size = img.stat().st_size
        ours: list[float] = []
        base: list[float] = []
        for i in range(runs):
            t0 = time.monotonic()
            subprocess.run(["sha256sum", str(img)], check=True, capture_output=True)
            shutil.copyfile(img, tmp / "copy.qcow2")
            os.sync()
            base.append(time.monotonic() - t0)
            (tmp / "copy.qcow2").unlink()
            t0 = time.monotonic()
            with host_lock(host.cfg.state_dir):
                row = host.catalog.publish(img)
            os.sync()
            ours.append(time.monotonic() - t0)
            host.state.delete_image(row.name, row.version)
            Path(row.path).unlink()
            log(f"publish run {i + 1}: hvagent {size / ours[-1] / MiB:.0f} MiB/s, "
                f"sha256sum+cp {size / base[-1] / MiB:.0f} MiB/s")
        return Result("publish throughput", "sha256sum + cp of the same 2 GiB file (time ratio; throughput is "
                      "its inverse)", "s", ours, base, "throughput >= 0.8 of the baseline, i.e. time ratio <= 1.25",
                      1.25).finish()
    finally:
        clean(host)
        shutil.rmtree(tmp, ignore_errors=True)


class Counting:
    """A libvirt object that counts the calls made through it; objects it returns count too.

    ``name``/``UUIDString`` of a virDomain read fields the object already holds (no RPC), so they
    are not counted.
    """

    LOCAL = frozenset({"name", "UUIDString", "UUID", "connect"})

    def __init__(self, target: Any, counter: list[int]) -> None:
        self._target = target
        self._counter = counter

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not callable(value) or attr in self.LOCAL:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self._counter[0] += 1
            return self._wrap(value(*args, **kwargs))

        return call

    def _wrap(self, value: Any) -> Any:
        import libvirt

        if isinstance(value, libvirt.virDomain):
            return Counting(value, self._counter)
        if isinstance(value, list):
            return [self._wrap(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._wrap(v) for v in value)
        return value


def define_stopped(host: Host, count: int, key: str, prefix: str) -> None:
    with host_lock(host.cfg.state_dir):
        for i in range(count):
            host.provisioner.create(spec_of(f"{prefix}-{i:03d}", "tiny-1.*", key, memory=64), start=False)


def reconcile_passes(host: Host, passes: int) -> tuple[list[float], list[float], int]:
    """Median-able times of Daemon.reconcile and of one raw listing, and libvirt calls per pass."""
    import libvirt

    from agent.daemon import Daemon

    daemon = Daemon(host.cfg)
    host.virt.statuses()  # connect
    raw_conn = host.virt._conn
    counter = [0]
    host.virt._conn = Counting(raw_conn, counter)
    ours: list[float] = []
    base: list[float] = []
    calls = 0
    try:
        for _ in range(passes):
            t0 = time.perf_counter()
            raw_conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
            base.append(time.perf_counter() - t0)
            counter[0] = 0
            t0 = time.perf_counter()
            done = daemon.reconcile(host)
            ours.append(time.perf_counter() - t0)
            calls = counter[0]
            assert not any(done.values()), done  # nothing to repair: a pure pass
    finally:
        host.virt._conn = raw_conn
    return ours, base, calls


def rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def daemon_rss(host: Host, settle: float) -> float:
    """Resident memory of `hvagent serve` on this host's state after `settle` s of reconcile passes."""
    cfg_path = host.cfg.state_dir / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump({"state_dir": str(host.cfg.state_dir), "accelerator": "qemu",
                                        "reconcile_interval": 1.0,
                                        "api": {"socket": str(host.cfg.state_dir / "api.sock")}}))
    exe = ROOT / ".venv" / "bin" / "hvagent"
    proc = subprocess.Popen([str(exe), "serve"], env={**os.environ, "HVAGENT_CONFIG": str(cfg_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        token_file = host.cfg.state_dir / "api.token"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not token_file.exists():
            time.sleep(0.2)
        time.sleep(1)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(host.cfg.state_dir / "api.sock")),
                          base_url="http://hvagent",
                          headers={"Authorization": f"Bearer {token_file.read_text().strip()}"}) as c:
            for _ in range(5):
                c.get("/v1/vms").raise_for_status()
                c.get("/metrics").raise_for_status()
        time.sleep(settle)
        return rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def bench_footprint(passes: int) -> tuple[Result, Result]:
    key = new_ed25519("bench").public
    host = new_host("footprint", capacity_vcpus=1000, capacity_memory_mib=1 << 20, port_min=23000, port_max=23299)
    try:
        host.catalog.publish(IMAGES / "tiny-1.0.qcow2")
        idle0 = daemon_rss(host, 10)
        log(f"daemon RSS with 0 VMs: {idle0:.1f} MiB")
        define_stopped(host, 20, key, "fp")
        small, _, calls_small = reconcile_passes(host, passes)
        define_stopped(host, 180, key, "fq")
        big, raw, calls_big = reconcile_passes(host, passes)
        log(f"reconcile over 200 domains: median {statistics.median(big) * 1000:.1f} ms, {calls_big} libvirt "
            f"call(s) per pass (20 domains: {calls_small} call(s), {statistics.median(small) * 1000:.1f} ms)")
        reconcile = Result(
            "reconcile pass, 200 defined managed domains", "one raw getAllDomainStats listing of the same domains",
            "s", big, raw, "median <= 300 ms; libvirt calls do not grow with domains", None,
            notes=f"median {statistics.median(big) * 1000:.1f} ms (target 300 ms: "
                  f"{'met' if statistics.median(big) <= 0.3 else 'missed'}); libvirt calls per pass: "
                  f"{calls_big} with 200 domains, {calls_small} with 20").finish()
        with host_lock(host.cfg.state_dir):
            for vm in host.state.vms()[50:]:
                host.provisioner.destroy(vm.name, purge=True)
        idle50 = daemon_rss(host, 15)
        log(f"daemon RSS with 50 VMs: {idle50:.1f} MiB")
        rss = Result("daemon idle RSS, 50 managed VMs", "the same daemon with 0 VMs", "MiB", [idle50], [idle0],
                     "RSS <= 80 MiB", None,
                     notes=f"{idle50:.1f} MiB with 50 VMs, {idle0:.1f} MiB with none (target 80 MiB: "
                           f"{'met' if idle50 <= 80 else f'missed by {idle50 - 80:.1f} MiB'})").finish()
        return reconcile, rss
    finally:
        clean(host)


def draw(timeline: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vms = sorted(timeline["vms"].items(), key=lambda kv: (kv[1]["batch"], kv[0]))
    t0 = min(v.get("swap.start", timeline["t0"]) for _, v in vms)
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(vms) + 1.5))
    colors = {"shutdown": "#d62728", "boot": "#1f77b4"}
    for row, (_name, ev) in enumerate(vms):
        start, off = ev.get("swap.start"), ev.get("swap.shutoff")
        booting, done = ev.get("swap.booting"), ev.get("swap.done")
        if start and off:
            ax.barh(row, off - start, left=start - t0, color=colors["shutdown"])
        if booting and done:
            ax.barh(row, done - booting, left=booting - t0, color=colors["boot"])
    batch_starts = sorted({min(v.get("swap.start", 1e18) for _, v in vms if v["batch"] == b)
                           for b in range(timeline["batches"])})
    for t in batch_starts:
        ax.axvline(t - t0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(vms)), [n for n, _ in vms])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the rollout started")
    ax.set_title("rollout timeline: red = ACPI shutdown, blue = boot until healthy; dashed = batch start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    return f"{os.cpu_count()} x {cpu}, {mem} GiB, TCG (no usable KVM)"


def write(results: list[Result], extra: dict[str, Any]) -> None:
    data = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "results": [{**asdict(r), "median_ratio": r.median, "min_ratio": min(r.ratios, default=None),
                         "max_ratio": max(r.ratios, default=None), "verdict": r.verdict} for r in results], **extra}
    (OUT / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# Benchmarks ({data['date']})", "", f"Machine: {data['machine']}", "",
             "| benchmark | baseline | runs | ours (median) | baseline (median) | median ratio | min | max | "
             "target | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.baseline} | {len(r.ratios)} | {statistics.median(r.ours):.2f} {r.unit} | "
                     f"{statistics.median(r.base):.2f} {r.unit} | " if r.base else
                     f"| {r.name} | {r.baseline} | {len(r.ratios)} | {statistics.median(r.ours):.2f} {r.unit} | - | ")
        lines[-1] += f"{r.median:.3f} | {min(r.ratios):.3f} | {max(r.ratios):.3f} | {r.target} | {r.verdict} |"
    lines += ["", *[f"- {r.name}: {r.notes}" for r in results if r.notes], "",
              "Timeline of the rollout: `bench/rollout.png`.", ""]
    (OUT / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--disk-pairs", type=int, default=3)
    ap.add_argument("--vms", type=int, default=12)
    ap.add_argument("--max-unavailable", type=int, default=3)
    ap.add_argument("--singles", type=int, default=3)
    ap.add_argument("--publish-runs", type=int, default=3)
    ap.add_argument("--reconcile-passes", type=int, default=10)
    ap.add_argument("--only", choices=["footprint"], help="run only these benchmarks; keep the other results")
    a = ap.parse_args()
    for ref in ("tiny-1.0", "tiny-1.1"):
        if not (IMAGES / f"{ref}.qcow2").exists():
            sys.exit(f"bench: {IMAGES / ref}.qcow2 missing; run make images")
    if a.only == "footprint":
        old = json.loads((OUT / "results.json").read_text())
        kept = [Result(**{k: v for k, v in r.items() if k in Result.__dataclass_fields__})
                for r in old["results"] if not r["name"].startswith(("reconcile", "daemon"))]
        write([*kept, *bench_footprint(a.reconcile_passes)], {"timeline": old.get("timeline")})
        shutil.rmtree(WORK, ignore_errors=True)
        return 0
    results: list[Result] = []
    results += bench_footprint(a.reconcile_passes)
    prov, bare = bench_provision(a.pairs)
    results.append(prov)
    results.append(bench_disks(a.disk_pairs))
    swap, roll, timeline = bench_rollout(a.vms, a.max_unavailable, a.singles, bare)
    results += [swap, roll]
    results.append(bench_publish(a.publish_runs))
    draw(timeline, OUT / "rollout.png")
    write(results, {"timeline": timeline})
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
