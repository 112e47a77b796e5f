"""hvagent benchmarks: ratios against baselines measured in the same run (`make bench`).

Each benchmark names its baseline, runs interleaved pairs (or repeated runs), and reports the
median ratio with its min and max. Writes bench/results.json, bench/results.md and
bench/rollout.png (a timeline of one rollout). ``--only relay,console`` runs some of them; the
other rows stay as last measured, with their date. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import health  # noqa: E402
from agent.host import Host  # noqa: E402
from agent.seed import new_ed25519  # noqa: E402
from agent.state import RolloutState, host_lock  # noqa: E402
from bench.access import api_site, bench_console, bench_relay  # noqa: E402
from bench.common import (  # noqa: E402
    IMAGES,
    OUT,
    WORK,
    MiB,
    Result,
    bare_qemu,
    clean,
    log,
    new_host,
    padded_image,
    provision_time,
    spec_of,
)


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


def bare_batch(k: int, image: Path, agent_key: str, agent_pub: str) -> tuple[float, list[float]]:
    """k bare guests started at once (as a batch of k swaps boots k guests): the batch's wall time
    until the last answers SSH, and each guest's own boot-to-SSH time."""
    with contextlib.ExitStack() as stack:
        boots = [stack.enter_context(bare_qemu(image, agent_key, agent_pub)) for _ in range(k)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(k) as pool:
            each = list(pool.map(lambda boot: boot(), boots))
        return time.monotonic() - t0, each


def bench_rollout(vms: int, max_unavailable: int, bare_batches: int) -> tuple[Result, Result, dict[str, Any]]:
    """A rollout of ``vms`` VMs in batches of ``max_unavailable`` against bare QEMU booting the same
    number of guests at once, on the same host with the same VMs running (like with like: a batch
    of k swaps boots k guests on the same cores). The canary is off: it is one more boot of its
    own, reported in the notes."""
    k = max_unavailable
    host = new_host("rollout", max_unavailable=str(k), rollout_policy="manual", capacity_vcpus=4 * (vms + k + 1))
    try:
        host.catalog.publish(IMAGES / "tiny-1.0.qcow2")
        agent = host.provisioner.agent_key
        names = [f"b-ro-{i:02d}" for i in range(vms)]
        with host_lock(host.cfg.state_dir):
            for n in names:
                host.provisioner.create(spec_of(n, "tiny-1.*", agent.public))
        for n in names:
            host.provisioner.wait(n)
        log(f"{vms} VMs healthy on tiny-1.0")
        host.catalog.publish(IMAGES / "tiny-1.1.qcow2")
        walls: list[float] = []
        guests: list[float] = []

        def bare(count: int) -> None:
            for _ in range(count):
                wall, each = bare_batch(k, IMAGES / "tiny-1.1.qcow2", agent.private, agent.public)
                walls.append(wall)
                guests.extend(each)
                log(f"bare batch of {k}: {wall:.1f}s (guests {', '.join(f'{x:.1f}' for x in each)})")

        bare(bare_batches - bare_batches // 2)  # half before the rollout, half after: drift shows in both
        with host_lock(host.cfg.state_dir):
            ro = host.rollouts.start("tiny", 1, canary=False)
            assert ro is not None
            t0 = time.monotonic()
            done = host.rollouts.run(ro.id, say=log)
            wall = time.monotonic() - t0
        assert done.state is RolloutState.DONE, done
        bare(bare_batches // 2)
        batches = -(-vms // k)
        ideal = batches * statistics.median(walls)
        log(f"rollout of {vms} VMs in batches of {k}: {wall:.1f}s vs {batches} x bare batch {ideal:.1f}s")
        steps = host.state.steps(ro.id)
        downtimes = [s.downtime for s in steps if s.downtime]
        timeline: dict[str, Any] = {"t0": min(s.started_at or 0 for s in steps), "batches": batches, "vms": {}}
        for s in steps:
            evs = {e.kind: e.ts for e in host.state.events(s.vm) if e.kind.startswith("swap.")
                   and (s.started_at or 0) - 1 <= e.ts <= (s.finished_at or 1e18) + 1}
            timeline["vms"][s.vm] = {"batch": s.batch, **evs}
        swap = Result(f"swap downtime, batches of {k}",
                      f"each guest's boot-to-SSH when bare qemu boots {k} guests at once (same host, same VMs "
                      "running)", "s", downtimes, guests, "median ratio <= 1.15", 1.15,
                      ratios=[d / statistics.median(guests) for d in downtimes],
                      notes=f"downtime median {statistics.median(downtimes):.1f}s, bare guest median "
                            f"{statistics.median(guests):.1f}s")
        roll = Result(f"rollout, {vms} VMs in batches of {k}", f"{batches} x the median bare batch of {k}",
                      "s", [wall], [ideal], "ratio <= 1.15", 1.15,
                      notes=f"bare batches {', '.join(f'{w:.1f}' for w in walls)}s; canary off").finish()
        return swap, roll, timeline
    finally:
        clean(host)


def bench_cloud(pairs: int) -> Result:
    """The cloud image's swap downtime through its QEMU guest agent against ACPI (the agent stopped
    in the guest first), swapping one VM between two versions of the same disk."""
    host = new_host("cloud", health_timeout=600.0)
    tmp = WORK / "cloud-src"
    tmp.mkdir(exist_ok=True)
    try:
        v0 = host.catalog.publish(IMAGES / "debian-12.0.qcow2")
        manifest = yaml.safe_load((IMAGES / "debian-12.0.yaml").read_text())
        (tmp / "debian-12.1.yaml").write_text(yaml.safe_dump({**manifest, "version": "12.1"}, sort_keys=False))
        v1 = host.catalog.publish(IMAGES / "debian-12.0.qcow2", tmp / "debian-12.1.yaml")
        agent = host.provisioner.agent_key
        with host_lock(host.cfg.state_dir):
            host.provisioner.create(spec_of("b-cloud", "debian-12.0", agent.public, memory=1024, cpus=2,
                                            health={"timeout": 600}))
        host.provisioner.wait("b-cloud")
        ours: list[float] = []
        base: list[float] = []
        paths: list[str] = []
        for i in range(pairs):
            for with_agent in ((True, False) if i % 2 == 0 else (False, True)):
                vm = host.provisioner.row("b-cloud")
                if not with_agent:
                    r = health.run(host.provisioner.endpoint(vm), agent.private,
                                   "sudo systemctl stop qemu-guest-agent && echo stopped")
                    assert r.stdout.strip() == "stopped", r.stderr
                    time.sleep(2)  # libvirt sees the agent's port closed
                with host_lock(host.cfg.state_dir):
                    [o] = host.swapper.swap_batch(["b-cloud"], v1 if vm.version == "12.0" else v0)
                assert o.ok and o.downtime, o
                shutoff = [e.message for e in host.state.events("b-cloud") if e.kind == "swap.shutoff"][-1]
                paths.append(shutoff.rsplit("(", 1)[-1].rstrip(")"))
                (ours if with_agent else base).append(o.downtime)
                log(f"cloud swap {'with' if with_agent else 'without'} the guest agent: downtime {o.downtime:.1f}s "
                    f"({shutoff})")
        return Result("cloud image swap downtime, guest agent", "the same swap with qemu-guest-agent stopped in "
                      "the guest (ACPI)", "s", ours, base, "reported (no target)", None,
                      notes=f"shutdown paths seen: {', '.join(paths)}").finish()
    finally:
        clean(host)
        shutil.rmtree(tmp, ignore_errors=True)


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


def merged(fresh: list[Result], date: str) -> tuple[list[Result], dict[str, Any]]:
    """This run's rows in place of the previous results.json's rows of the same name, the others
    kept with the date they were measured (a run with --only), and the previous extras (timeline)."""
    path = OUT / "results.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for r in fresh:
        r.measured = date
    new = {r.name: r for r in fresh}
    rows = []
    for row in old.get("results", []):
        if row["name"] in new:
            rows.append(new.pop(row["name"]))
        else:
            kept = Result(**{k: v for k, v in row.items() if k in Result.__dataclass_fields__})
            kept.measured = kept.measured or str(old.get("date", ""))
            rows.append(kept)
    extras = {k: v for k, v in old.items() if k not in ("machine", "date", "results")}
    return [*rows, *new.values()], extras


def write(fresh: list[Result], extra: dict[str, Any]) -> None:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results, extras = merged(fresh, date)
    data = {"machine": machine(), "date": date,
            "results": [{**asdict(r), "median_ratio": r.median, "min_ratio": min(r.ratios, default=None),
                         "max_ratio": max(r.ratios, default=None), "verdict": r.verdict} for r in results],
            **extras, **extra}
    (OUT / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# Benchmarks (last run {data['date']})", "", f"Machine: {data['machine']}", "",
             "| benchmark | baseline | runs | ours (median) | baseline (median) | median ratio | min | max | "
             "target | verdict | measured |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.baseline} | {len(r.ratios)} | {statistics.median(r.ours):.2f} {r.unit} | "
                     f"{statistics.median(r.base):.2f} {r.unit} | " if r.base else
                     f"| {r.name} | {r.baseline} | {len(r.ratios)} | {statistics.median(r.ours):.2f} {r.unit} | - | ")
        lines[-1] += (f"{r.median:.3f} | {min(r.ratios):.3f} | {max(r.ratios):.3f} | {r.target} | {r.verdict} | "
                      f"{r.measured} |")
    lines += ["", *[f"- {r.name}: {r.notes}" for r in results if r.notes], ""]
    if data.get("timeline"):
        lines += ["Timeline of the rollout: `bench/rollout.png`.", ""]
    (OUT / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


BENCHES = ("footprint", "provision", "disks", "rollout", "cloud", "publish", "relay", "console")


def benches(value: str) -> set[str]:
    """``--only``'s value: benchmark names, comma-separated."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    unknown = sorted(names - set(BENCHES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{unknown[0] if unknown else value!r}: accepted: one or more of "
                                         f"{','.join(BENCHES)}, comma-separated")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--disk-pairs", type=int, default=3)
    ap.add_argument("--vms", type=int, default=12)
    ap.add_argument("--max-unavailable", type=int, default=3)
    ap.add_argument("--bare-batches", type=int, default=4, help="bare batches of --max-unavailable guests")
    ap.add_argument("--cloud-pairs", type=int, default=2, help="cloud image swaps with and without the agent")
    ap.add_argument("--publish-runs", type=int, default=3)
    ap.add_argument("--reconcile-passes", type=int, default=10)
    ap.add_argument("--relay-pairs", type=int, default=3)
    ap.add_argument("--relay-mib", type=int, default=256, help="size of the file scp copies, MiB")
    ap.add_argument("--console-sessions", type=int, default=5, help="session pairs (WebSocket, in-process)")
    ap.add_argument("--keystrokes", type=int, default=50, help="keystrokes timed per console session")
    ap.add_argument("--only", type=benches, metavar="NAME[,NAME...]", default=set(BENCHES),
                    help=f"run only these ({','.join(BENCHES)}); results.json keeps the other rows as they were")
    a = ap.parse_args()
    chosen: set[str] = a.only
    for ref in ("tiny-1.0", "tiny-1.1"):
        if not (IMAGES / f"{ref}.qcow2").exists():
            sys.exit(f"bench: {IMAGES / ref}.qcow2 missing; run make images")
    results: list[Result] = []
    extra: dict[str, Any] = {}
    if "footprint" in chosen:
        results += bench_footprint(a.reconcile_passes)
    if "provision" in chosen:
        prov, _ = bench_provision(a.pairs)
        results.append(prov)
    if "disks" in chosen:
        results.append(bench_disks(a.disk_pairs))
    if "rollout" in chosen:
        swap, roll, timeline = bench_rollout(a.vms, a.max_unavailable, a.bare_batches)
        results += [swap, roll]
        draw(timeline, OUT / "rollout.png")
        extra["timeline"] = timeline
    if "cloud" in chosen:
        if not (IMAGES / "debian-12.0.qcow2").exists():
            sys.exit(f"bench: {IMAGES}/debian-12.0.qcow2 missing; run make images")
        results.append(bench_cloud(a.cloud_pairs))
    if "publish" in chosen:
        results.append(bench_publish(a.publish_runs))
    if chosen & {"relay", "console"}:
        with api_site("access") as site:
            if "relay" in chosen:
                results += bench_relay(site, a.relay_pairs, a.relay_mib * MiB)
            if "console" in chosen:
                results.append(bench_console(site, a.console_sessions, a.keystrokes))
    write(results, extra)
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
