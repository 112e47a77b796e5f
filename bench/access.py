"""The API's access paths: scp through the SSH relay against scp to the forwarded port, and a
console keystroke's echo through the WebSocket against libvirt's stream in-process."""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import secrets
import shutil
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from agent import config as config_mod
from agent.host import Host
from agent.seed import new_ed25519
from bench.common import IMAGES, ROOT, WORK, MiB, Result, clean, free_port, log, sha256, terminate

# -- the API's access paths: SSH relay and serial console -------------------------------------
EXE = ROOT / ".venv" / "bin" / "hvagent"
ACCESS_VM = "b-access"  # libvirt domain names are per host: one no test uses


@dataclass
class Site:
    """A real ``hvagent serve`` over TLS on 127.0.0.1 (a throwaway CA), one tenant's VM running, and
    the tenant's ``hvagent remote`` under a HOME of its own."""

    url: str
    tls: ssl.SSLContext
    tokens: dict[str, str]  # "ops" (admin), "bench" (the tenant)
    home: Path
    env: dict[str, str]  # the tenant's: HOME, XDG_CONFIG_HOME, no HVAGENT_* and no proxies
    key: Path  # the tenant's private SSH key
    vm: dict[str, Any]  # the admin's view of the VM: ssh (127.0.0.1:PORT), uuid
    libvirt_uri: str
    daemon: int = 0  # its pid

    def call(self, who: str, method: str, path: str, **kw: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, verify=self.tls, trust_env=False, timeout=120,
                          headers={"Authorization": f"Bearer {self.tokens[who]}"}) as c:
            return c.request(method, path, **kw)


def tenant_env(home: Path) -> dict[str, str]:
    drop = ("HVAGENT_CONFIG", "HVAGENT_STATE_DIR", "HVAGENT_REMOTE")
    env = {k: v for k, v in os.environ.items() if k not in drop and "proxy" not in k.lower()}
    return env | {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def run(argv: list[str], env: dict[str, str], timeout: float = 600) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


@contextmanager
def api_site(tag: str) -> Iterator[Site]:
    """Start the daemon, publish tiny-1.0 through it, create the tenant's VM (256 MiB, a 1 GiB data
    disk at /data) through the API and wait until it runs; stop and remove all of it afterwards."""
    from agent.daemon import token_hash
    from tests.tlsca import TestCA

    WORK.mkdir(mode=0o711, exist_ok=True)
    state = WORK / tag
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o711)
    ca = TestCA(state / "pki", "bench CA")
    server = ca.server()
    port = free_port()
    tokens = {who: secrets.token_urlsafe(24) for who in ("ops", "bench")}
    cfg_path = state / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "state_dir": str(state), "accelerator": "qemu", "port_min": 23300, "port_max": 23309,
        "health_timeout": 300, "shutdown_timeout": 10,
        "api": {"socket": str(state / "api.sock"), "listen": [f"127.0.0.1:{port}"],
                "tls": {"cert": str(server.cert), "key": str(server.key)},
                "tokens": [{"name": "ops", "role": "admin", "sha256": token_hash(tokens["ops"])},
                           {"name": "bench", "role": "tenant", "sha256": token_hash(tokens["bench"]),
                            "quota": {"vms": 1, "cpus": 1, "memory": 256, "disk_gib": 1}}]}}))
    home = state / "tenant"
    home.mkdir()
    site = Site(f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(ca.cert)), tokens, home,
                tenant_env(home), home / "id_ed25519", {}, config_mod.load(cfg_path).libvirt_uri)
    log_path = state / "serve.log"
    with log_path.open("wb") as f:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        proc = subprocess.Popen([str(EXE), "serve"], stdout=f, stderr=subprocess.STDOUT,
                                env={**env, "HVAGENT_CONFIG": str(cfg_path)})
    site.daemon = proc.pid
    created = False
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hvagent serve did not answer on {site.url}:\n{log_path.read_text()[-2000:]}")
            try:
                if site.call("ops", "GET", "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        run([str(EXE), "images", "publish", str(IMAGES / "tiny-1.0.qcow2")], {**os.environ,
            "HVAGENT_CONFIG": str(cfg_path)})
        (home / "token").write_text(tokens["bench"] + "\n")
        run([str(EXE), "remote", "add", "bench", site.url, "--token-file", str(home / "token"), "--ca",
             str(ca.cert)], site.env)
        key = new_ed25519("bench@tenant")
        site.key.write_text(key.private)
        site.key.chmod(0o600)
        r = site.call("bench", "POST", "/v1/vms", json={"name": ACCESS_VM, "image": "tiny-1.0", "memory": 256,
                                                         "data_disk": 1, "ssh_keys": [key.public]})
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/vms: {r.status_code} {r.text}")
        created = True
        deadline = time.monotonic() + 360
        while (vm := site.call("ops", "GET", f"/v1/vms/{ACCESS_VM}").json())["state"] != "running":
            if vm["state"] == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"vm {ACCESS_VM}: {vm['state']} ({vm['reason']})")
            time.sleep(1)
        site.vm.update(vm)
        log(f"daemon on {site.url}, {ACCESS_VM} running, its SSH forwarded at {vm['ssh']}")
        yield site
    finally:
        try:
            if created:
                t0 = time.monotonic()
                r = site.call("bench", "DELETE", f"/v1/vms/{ACCESS_VM}", params={"purge": "true"})
                log(f"DELETE /v1/vms/{ACCESS_VM}?purge=true: {r.status_code} in {time.monotonic() - t0:.1f} s")
        except httpx.HTTPError as e:
            log(f"DELETE /v1/vms/{ACCESS_VM}: {e} (the state's VMs are destroyed below); the daemon's log:\n"
                f"{log_path.read_text()[-3000:]}")
        finally:
            terminate(proc, 120)
            clean(Host(config_mod.load(cfg_path)))  # whatever the DELETE left; removes the state dir


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU time so far of process ``pid``, or of this one's children waited for."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_relay(site: Site, pairs: int, size: int) -> list[Result]:
    """scp (SFTP) of ``size`` random bytes up and down: through ``hvagent vm ssh-config``'s block
    (ProxyCommand ``hvagent vm proxy``: the API's WebSocket relay) and straight to the forwarded port."""
    port = site.vm["ssh"].rsplit(":", 1)[1]
    hostkey = site.call("bench", "GET", f"/v1/vms/{ACCESS_VM}/hostkey").json()["key"]
    known = site.home / "known_hosts.direct"
    known.write_text(f"[127.0.0.1]:{port} {hostkey}\n")
    config = site.home / "ssh_config"
    config.write_text(run([str(EXE), "--remote", "bench", "vm", "ssh-config", ACCESS_VM], site.env))
    common = ["-i", str(site.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    scp = {"relay": ["scp", "-q", "-F", str(config), *common],
           "direct": ["scp", "-q", "-F", "/dev/null", *common, "-P", port, "-o", "StrictHostKeyChecking=yes",
                      "-o", f"UserKnownHostsFile={known}"]}
    remote = {"relay": f"{ACCESS_VM}:/data/x", "direct": "root@127.0.0.1:/data/x"}
    ssh_direct = ["ssh", "-F", "/dev/null", *common, "-p", port, "-o", "StrictHostKeyChecking=yes",
                  "-o", f"UserKnownHostsFile={known}", "root@127.0.0.1"]
    mounts = run([*ssh_direct, "cat /proc/mounts"], site.env, timeout=120)
    if " /data " not in mounts:
        raise RuntimeError(f"vm {ACCESS_VM}: no /data in the guest:\n{mounts}")
    blob, back = site.home / "blob", site.home / "blob.back"
    with blob.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    digest = sha256(blob)

    qemu = int(Path(f"/run/libvirt/qemu/{ACCESS_VM}.pid").read_text())
    # CPU seconds per copy: scp with its ssh (and the relay's `hvagent vm proxy`), the daemon, the guest's QEMU
    cpu: dict[str, list[tuple[float, ...]]] = {}

    def timed(argv: list[str], key: str) -> float:
        before = (cpu_seconds(), cpu_seconds(site.daemon), cpu_seconds(qemu))
        t0 = time.monotonic()
        run(argv, site.env, timeout=1800)
        took = time.monotonic() - t0
        after = (cpu_seconds(), cpu_seconds(site.daemon), cpu_seconds(qemu))
        cpu.setdefault(key, []).append(tuple(a - b for a, b in zip(after, before, strict=True)))
        return took

    up: dict[str, list[float]] = {"relay": [], "direct": []}
    down: dict[str, list[float]] = {"relay": [], "direct": []}
    for i in range(pairs):
        for which in ("relay", "direct") if i % 2 == 0 else ("direct", "relay"):
            up[which].append(timed([*scp[which], str(blob), remote[which]], f"upload {which}"))
            if i == 0:  # once per path: the guest holds what was sent
                guest = run([*ssh_direct, "sha256sum /data/x"], site.env, timeout=300).split()[0]
                if guest != digest:
                    raise RuntimeError(f"scp {which}: the guest's /data/x has sha256 {guest}, sent {digest}")
            down[which].append(timed([*scp[which], remote[which], str(back)], f"download {which}"))
            if sha256(back) != digest:
                raise RuntimeError(f"scp {which}: the file copied back differs from the one sent")
            back.unlink()
        log(f"scp pair {i + 1} ({size // MiB} MiB): up relay {size / up['relay'][-1] / MiB:.1f} MiB/s, direct "
            f"{size / up['direct'][-1] / MiB:.1f} MiB/s; down relay {size / down['relay'][-1] / MiB:.1f} MiB/s, "
            f"direct {size / down['direct'][-1] / MiB:.1f} MiB/s")
    blob.unlink()

    def cpu_note(key: str) -> str:
        client, daemon, guest = (statistics.median(c[n] for c in cpu[key]) for n in range(3))
        return f"{key}: scp/ssh{'/proxy' if 'relay' in key else ''} {client:.1f}, " + \
            (f"daemon {daemon:.1f}, " if "relay" in key else "") + f"QEMU {guest:.1f}"

    results = []
    for label, times in (("upload", up), ("download", down)):
        r = Result(f"scp {label} through the SSH relay, {size // MiB} MiB",
                   "scp straight to the VM's forwarded port (time ratio; throughput is its inverse)", "s",
                   times["relay"], times["direct"], "throughput >= 0.8 of the baseline, i.e. time ratio <= 1.25",
                   1.25).finish()
        r.notes = (f"median {size / statistics.median(r.ours) / MiB:.1f} MiB/s through the relay, "
                   f"{size / statistics.median(r.base) / MiB:.1f} MiB/s direct: throughput ratio "
                   f"{1 / r.median:.2f} (`hvagent vm ssh-config` block, ProxyCommand `hvagent vm proxy`, "
                   "TLS WebSocket; SFTP to dropbear + sftp-server; sha256 checked); median CPU seconds per copy, "
                   f"{cpu_note(f'{label} relay')}; {cpu_note(f'{label} direct')}")
        results.append(r)
    return results


Console = tuple[Callable[[bytes], None], Callable[[float], bytes]]  # send; recv with a timeout (TimeoutError)


def retry_busy(open_: Callable[[], Any]) -> Any:
    """``open_()``, retried for a while: the session just closed may still hold the console."""
    from agent.errors import Conflict

    deadline = time.monotonic() + 30
    while True:
        try:
            return open_()
        except Conflict:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextmanager
def websocket_console(site: Site) -> Iterator[Console]:
    from agent.relay_client import connect_relay

    url = site.url.replace("https://", "wss://", 1) + f"/v1/vms/{ACCESS_VM}/console"
    with retry_busy(lambda: connect_relay(url, site.tokens["bench"], site.tls, "console")) as ws:

        def recv(timeout: float) -> bytes:
            message = ws.recv(timeout=timeout)
            return message if isinstance(message, bytes) else message.encode()

        yield ws.send, recv


@contextmanager
def libvirt_console(site: Site) -> Iterator[Console]:
    from agent.virt import ConsoleStream

    stream = retry_busy(lambda: ConsoleStream(site.libvirt_uri, site.vm["uuid"], ACCESS_VM))
    got: queue.Queue[bytes] = queue.Queue()

    def read() -> None:  # recv blocks: a thread, as the daemon has, so that waits can time out
        while data := stream.recv():
            got.put(data)
        got.put(b"")

    def recv(timeout: float) -> bytes:
        try:
            return got.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    reader = threading.Thread(target=read, name="bench-console", daemon=True)
    reader.start()
    try:
        yield stream.send, recv
    finally:
        stream.close()
        reader.join(timeout=5)


def echo_times(console: Console, count: int, clear_every: int = 20) -> list[float]:
    """Seconds from typing one letter at getty's ``login:`` prompt until its echo arrives, ``count``
    times; the line is cleared (Ctrl-U) every ``clear_every`` letters and at the end, untimed."""
    send, recv = console

    def until(needle: bytes, timeout: float) -> None:
        deadline, seen = time.monotonic() + timeout, b""
        while needle not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"console: no {needle!r} within {timeout:.0f} s; last: {seen[-200:]!r}")
            data = recv(left)
            if not data:
                raise EOFError("console: the session ended")
            seen += data

    def settle() -> None:  # read until the guest has been quiet for 0.3 s
        with contextlib.suppress(TimeoutError):
            while recv(0.3):
                pass

    send(b"\x15\r")  # a fresh prompt, whatever the line held
    until(b"login: ", 30)
    settle()
    times = []
    for k in range(count):
        if k and k % clear_every == 0:
            send(b"\x15")
            settle()
        letter = bytes([ord("a") + k % 26])
        t0 = time.perf_counter()
        send(letter)
        until(letter, 10)
        times.append(time.perf_counter() - t0)
    send(b"\x15")
    settle()
    return times


def bench_console(site: Site, sessions: int, keystrokes: int) -> Result:
    ours: list[float] = []
    base: list[float] = []
    every: dict[str, list[float]] = {"ws": [], "libvirt": []}
    for i in range(sessions):
        for which in ("ws", "libvirt") if i % 2 == 0 else ("libvirt", "ws"):
            with websocket_console(site) if which == "ws" else libvirt_console(site) as console:
                times = [t * 1000 for t in echo_times(console, keystrokes)]
            every[which] += times
            (ours if which == "ws" else base).append(statistics.median(times))
        log(f"console session pair {i + 1}: echo median {ours[-1]:.2f} ms through the WebSocket, "
            f"{base[-1]:.2f} ms on libvirt's stream in-process")

    def p90(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=10)[-1]

    ws_median, lv_median = statistics.median(every["ws"]), statistics.median(every["libvirt"])
    return Result(
        "console keystroke echo through the API's WebSocket", "libvirt's console stream (virDomainOpenConsole) "
        f"opened in-process; median per session of {keystrokes} keystrokes", "ms", ours, base,
        "median ratio <= 3 and median under 50 ms", 3.0,
        notes=f"all {len(every['ws'])} keystrokes of each: WebSocket median {ws_median:.2f} ms (p90 "
              f"{p90(every['ws']):.2f}), in-process median {lv_median:.2f} ms (p90 {p90(every['libvirt']):.2f}): "
              f"the API adds {ws_median - lv_median:.2f} ms; under 50 ms: {'met' if ws_median < 50 else 'missed'}. "
              "One letter typed at getty's login prompt on ttyS0 (busybox getty echoes it itself) until its "
              "echo arrives; wss:// (TLS) on 127.0.0.1, a session opened per measurement").finish()

