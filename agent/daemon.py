"""``hvagent serve``: the daemon.

Four kinds of work share one process, each on its own thread with its own ``Host`` (SQLite and
libvirt connections are per thread); every mutation holds the host lock, the same lock the CLI
takes, so daemon and CLI never act on one host at once:

- the **API** (uvicorn, FastAPI: ``agent.api``) on a Unix socket and optionally loopback TCP;
- the **engine**: reconcile passes (desired state in SQLite against libvirt), lifecycle events,
  retirement deadlines and rollouts, one batch per hold of the lock;
- the **inbox**: an image pipeline moves FILE.qcow2 and then FILE.yaml into the inbox directory;
  inotify wakes the daemon, which publishes them;
- **health waits** for VMs the API created (one short-lived thread each).

systemd: READY=1 once the API listens, WATCHDOG=1 while the engine is alive, STOPPING=1 on
SIGTERM, after which the engine finishes its current step (a batch is journaled) and exits 0.
Start-up recovery that awaits no guest runs before READY=1; an interrupted swap's (a rollback
awaits its guest's health, which may take longer than systemd waits for a start) runs after it,
on the rollouts thread, before that thread's first batch.
"""

from __future__ import annotations

import contextlib
import faulthandler
import grp
import hashlib
import hmac
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sdnotify
from inotify_simple import INotify
from inotify_simple import flags as inflags

from agent.config import Config, Quota, Role, listen_address
from agent.domxml import GuestFilter
from agent.errors import EnvError, HvError, Unauthorized, one_line
from agent.host import Host
from agent.hostnet import guest_filter
from agent.manifest import Manifest
from agent.provision import VmPaths, make_overlay
from agent.spec import Restart, VmSpec
from agent.state import RolloutState, VmRow, VmState, logfmt
from agent.tls import server_context
from agent.virt import FAILURE_REASONS, DomState, DomStatus, LifecycleEvent, LifecycleWatch, start_event_loop

log = logging.getLogger("hvagent.daemon")

STOP_CAUSES = {"shutdown": "the guest powered off", "destroyed": "powered off outside hvagent",
               "crashed": "its QEMU process died", "failed": "its QEMU process died or failed"}
# VM states in which the VM belongs to the reconcile loop (the others belong to an operation).
SETTLED = (VmState.RUNNING, VmState.STOPPED, VmState.FAILED)


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    quota: Quota

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop = threading.Event()
        self.wake = threading.Event()  # the engine's next pass now
        self.rollout_wake = threading.Event()  # the rollout thread's next batch now
        self.recovered = threading.Event()  # start-up recovery of swaps and rollouts is done
        self._local = threading.local()
        self._hosts: list[Host] = []
        self._hosts_lock = threading.Lock()
        self._events: queue.Queue[LifecycleEvent] = queue.Queue()
        self._waiters = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
        self._principals: dict[str, tuple[Principal, datetime | None]] = {
            t.sha256: (Principal(t.name, t.role, t.quota), t.expires) for t in cfg.api.tokens}
        self.beat = time.monotonic()
        self.engine_busy = False
        self.notifier = sdnotify.SystemdNotifier()
        if self.notifier.socket is not None:  # None when not started by systemd (no NOTIFY_SOCKET)
            self.notifier.socket.setblocking(False)  # a notify never stalls the daemon if nobody reads
        self.watch: LifecycleWatch | None = None
        self._guest_filter: GuestFilter | None = None  # as last defined by the engine

    # -- per-thread hosts ----------------------------------------------------------------------
    def host(self) -> Host:
        h: Host | None = getattr(self._local, "host", None)
        if h is None:
            h = Host(self.cfg, libvirt_attempts=8)  # about 16 s: a libvirtd restart is waited out
            self._local.host = h
            with self._hosts_lock:
                self._hosts.append(h)
        return h

    @contextmanager
    def locked(self) -> Iterator[Host]:
        host = self.host()
        with host.lock:
            yield host

    def poke(self) -> None:
        """Something changed (a publish, a rollout asked for): the engine and the rollouts look now."""
        self.wake.set()
        self.rollout_wake.set()

    # -- authentication ------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal:
        digest = token_hash(token)
        for known, (principal, expires) in self._principals.items():
            if hmac.compare_digest(known, digest):
                if expires is not None and datetime.now(UTC) >= _utc(expires):
                    raise Unauthorized("authorization: token expired")
                return principal
        raise Unauthorized("authorization: unknown token")

    def _write_local_token(self) -> None:
        """A fresh admin token for the local CLI, readable by root only."""
        token = secrets.token_urlsafe(32)
        path = self.cfg.local_token
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
        self._principals[token_hash(token)] = (Principal("local", Role.ADMIN, Quota()), None)

    # -- lifecycle -----------------------------------------------------------------------------
    def serve(self) -> int:
        setup_logging()
        # A fatal signal (SIGSEGV, SIGABRT in a C library) leaves every thread's stack in the log
        # instead of a silently vanished daemon whose clients see "connection reset by peer".
        faulthandler.enable(file=sys.stderr, all_threads=True)
        # `kill -USR1 PID`: every thread's stack to the log, and the daemon goes on (a stuck call's
        # whereabouts, without a debugger on the host)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        start_event_loop()  # before any libvirt connection is opened
        tls = server_context(self.cfg.api.tls) if self.cfg.api.tls is not None else None  # bad files: fail now
        host = self.host()
        with host.lock:
            host.recover_quick()  # the rest (swaps, which may await a guest) after READY=1: _rollouts
        self.cfg.inbox.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_local_token()
        self.watch = LifecycleWatch(self.cfg.libvirt_uri, self._on_lifecycle)
        self.watch.ensure()
        for row in host.state.vms():
            if row.state is VmState.PROVISIONING:  # created, but a restart interrupted its health wait
                self.watch_health(row.name)
        plain, secure = self._bind()
        threads = [threading.Thread(target=self._engine, name="engine", daemon=True),
                   threading.Thread(target=self._rollouts, name="rollouts", daemon=True),
                   threading.Thread(target=self._inbox, name="inbox", daemon=True),
                   threading.Thread(target=self._watchdog, name="watchdog", daemon=True)]
        for t in threads:
            t.start()
        from agent.api import serve_api

        try:
            serve_api(self, plain, secure, tls, on_ready=self._ready)  # returns on SIGTERM/SIGINT
        finally:
            self.notifier.notify("STOPPING=1")
            log.info(logfmt({"msg": "stopping: the engine finishes its current step"}))
            self.stop.set()
            self.poke()
            threads[0].join(timeout=self.cfg.shutdown_timeout + 60)
            threads[1].join(timeout=self.cfg.shutdown_timeout + 2 * self.cfg.health_timeout + 60)
            self._waiters.shutdown(wait=False, cancel_futures=True)
            self.cfg.api.socket.unlink(missing_ok=True)
            if self.watch is not None:
                self.watch.close()
            with self._hosts_lock:  # each thread's connections; those threads are done or daemonic
                for h in self._hosts:
                    with contextlib.suppress(Exception):
                        h.close()
        log.info(logfmt({"msg": "stopped"}))
        return 0

    def _ready(self) -> None:
        self.notifier.notify(f"READY=1\nSTATUS=serving on {self.cfg.api.socket}\nMAINPID={os.getpid()}")
        log.info(logfmt({"msg": "ready", "socket": str(self.cfg.api.socket), "tcp": self.cfg.api.tcp,
                         "listen": " ".join(self.cfg.api.listen) or None,
                         "tls": "on" if self.cfg.api.tls else None}))

    def _bind(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """The API's listening sockets: plain HTTP (the Unix socket, loopback TCP) and TLS (``api.listen``
        when ``api.tls`` is set)."""
        path = self.cfg.api.socket
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(str(path))
            os.chmod(path, 0o660)
            if self.cfg.api.socket_group:
                os.chown(path, -1, grp.getgrnam(self.cfg.api.socket_group).gr_gid)
        except (OSError, KeyError) as e:
            raise EnvError(f"{path}: cannot listen on the API socket ({e})") from e
        plain = [unix]
        if self.cfg.api.tcp:
            plain.append(_tcp_socket(self.cfg.api.tcp, "api.tcp"))
        secure = [_tcp_socket(a, "api.listen") for a in self.cfg.api.listen]
        if self.cfg.api.tls is None:
            plain, secure = plain + secure, []  # loopback only, as the configuration checked
        for s in plain + secure:
            s.listen(128)
        return plain, secure

    def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return
        # The engine awaits no guest in its passes; it may wait for the host lock while a swap shuts
        # its batch down (shutdown_timeout), and a swap cut short (libvirtd went away) is rolled
        # back by the engine itself, which awaits that guest's health (health_timeout).
        limit = self.cfg.reconcile_interval * 3 + self.cfg.shutdown_timeout + self.cfg.health_timeout + 120
        while not self.stop.wait(usec / 2e6):
            if time.monotonic() - self.beat < limit:
                self.notifier.notify("WATCHDOG=1")

    # -- health waits --------------------------------------------------------------------------
    def watch_health(self, name: str) -> None:
        def wait() -> None:
            try:
                self.host().provisioner.wait(name)
            except HvError as e:
                log.info(logfmt({"vm": name, "msg": f"health: {e}"}))
            except Exception:
                log.exception("health wait of %s", name)

        self._waiters.submit(wait)

    # -- engine --------------------------------------------------------------------------------
    def _on_lifecycle(self, ev: LifecycleEvent) -> None:
        self._events.put(ev)
        self.wake.set()

    def _engine(self) -> None:
        while not self.stop.is_set():
            self.beat = time.monotonic()
            try:
                self.tick()
            except HvError as e:
                log.warning(logfmt({"msg": f"engine: {e}"}))
            except Exception:
                log.exception("engine pass failed")
            self.wake.wait(self.cfg.reconcile_interval)
            self.wake.clear()

    def tick(self) -> None:
        """One pass: lifecycle events, recovery of cut-short operations, reconcile, event retention.

        Nothing here waits on a guest: rollouts and retirement moves (which await guests' health)
        run on their own thread, so this pass, and systemd's watchdog with it, keeps its pace.
        """
        host = self.host()
        if self.watch is not None and not self.watch.connected:
            self.watch.ensure()
        self._lifecycle_events(host)
        with host.lock:
            if self.recovered.is_set() and host.state.orphaned():
                # Every operation clears its journal entry, or parks it while it awaits health, before
                # it lets go of the lock; another entry was cut short (libvirtd went away mid-swap,
                # say): finish or undo it now.
                log.warning(logfmt({"msg": "interrupted operations in the journal; recovering"}))
                host.recover()
            self.reconcile(host)
            host.state.prune_events(self.cfg.events_keep_days * 86400, self.cfg.events_keep_max)

    def _rollouts(self) -> None:
        """Rollout batches and retirement moves, one batch per hold of the host lock (which each
        swap lets go of while it awaits its guests' health)."""
        host = self.host()
        self._recover_rollouts(host)
        while not self.stop.is_set():
            try:
                with host.lock:
                    host.rollouts.enforce_retirements(_say)
                    host.rollouts.catch_up()  # VMs a rollout skipped while stopped, running again
                busy = False
                for ro in host.state.rollouts(active_only=True):
                    if ro.state is RolloutState.RUNNING and not self.stop.is_set():
                        with host.lock:
                            busy = host.rollouts.step(ro.id, _say)
                        break
            except HvError as e:
                log.warning(logfmt({"msg": f"rollouts: {e}"}))
                busy = False
            except Exception:
                log.exception("rollout pass failed")
                busy = False
            if not busy:
                self.rollout_wake.wait(self.cfg.reconcile_interval)
                self.rollout_wake.clear()

    def _recover_rollouts(self, host: Host) -> None:
        """Start-up recovery of interrupted swaps, canaries and rollouts, tried until it succeeds. Until
        then the engine leaves the journal to it (the reconcile loop leaves VMs with an open entry
        alone) and no batch starts."""
        while not self.stop.is_set():
            try:
                with host.lock:
                    host.recover_rollouts()  # lets go of the lock while a rollback awaits its guest
                break
            except HvError as e:
                log.warning(logfmt({"msg": f"start-up recovery: {e}; trying again"}))
            except Exception:
                log.exception("start-up recovery failed; trying again")
            self.stop.wait(self.cfg.reconcile_interval)
        self.recovered.set()

    def _lifecycle_events(self, host: Host) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            row = host.state.vm(ev.name)
            if row is None or row.uuid != ev.uuid or row.state is not VmState.RUNNING:
                continue  # not ours, or stopped by an operation of ours
            if row.updated_at >= ev.at:
                continue  # queued while an operation of ours (a swap's shutdown) had the VM; it is done
            if ev.kind == "stopped":
                what = STOP_CAUSES.get(ev.detail, ev.detail)
                host.state.event("vm.stopped", f"{what} (libvirt: stopped/{ev.detail})", vm=ev.name)
            elif ev.kind == "crashed":
                host.state.event("vm.crashed", "the guest crashed (libvirt: crashed)", vm=ev.name)

    def reconcile(self, host: Host) -> dict[str, int]:
        """Repair drift between the VMs hvagent keeps and libvirt's domains; count what was done.

        One libvirt listing per pass; a VM whose journal entry is open belongs to that operation.
        """
        done = {"restarted": 0, "recreated": 0, "stopped": 0}
        rows = host.state.vms()
        if not rows:
            return done
        if any(r.host_port is None for r in rows):
            self._refresh_guest_filter(host)
        statuses = host.virt.statuses()
        busy = {it.target for it in host.state.pending()}
        for row in rows:
            if row.name in busy or row.state not in SETTLED:
                continue
            try:
                self._reconcile_one(host, row, statuses.get(row.name), done)
            except Exception:  # one VM's trouble never ends the pass for the others
                log.exception("reconcile of %s", row.name)
        return done

    def _reconcile_one(self, host: Host, row: VmRow, st: DomStatus | None, done: dict[str, int]) -> None:
        if st is not None and st.uuid != row.uuid:
            if row.reason != "a domain hvagent did not create has taken its name":
                host.state.update_vm(row.name, state=VmState.FAILED,
                                     reason="a domain hvagent did not create has taken its name")
                host.state.event("vm.failed", "a foreign domain has its name; left alone", vm=row.name)
            return
        if st is None:
            self._recreate(host, row.name, start=row.state is not VmState.STOPPED)
            done["recreated"] += 1
            return
        if row.state is VmState.RUNNING and st.state is DomState.SHUTOFF:
            policy = Restart(VmSpec.model_validate(row.spec).restart)
            if policy is Restart.ALWAYS or (policy is Restart.ON_FAILURE and st.reason in FAILURE_REASONS):
                host.virt.start(row.name)
                host.state.event("vm.restarted", f"was shut off ({st.reason}); restart policy {policy}",
                                 vm=row.name)
                done["restarted"] += 1
            else:
                host.state.update_vm(row.name, state=VmState.STOPPED,
                                     reason=f"shut off ({st.reason}); restart policy {policy}")
                host.state.event("vm.stopped", f"stays off ({st.reason}); restart policy {policy}", vm=row.name)
                done["stopped"] += 1

    def _refresh_guest_filter(self, host: Host) -> None:
        """Bridged guests: their nwfilter follows the host's addresses (libvirt re-applies it)."""
        try:
            f = guest_filter()
            if f == self._guest_filter:
                return
            host.virt.define_filter(f)
        except HvError as e:  # the rest of the pass still runs
            log.warning(logfmt({"msg": f"guest filter: {e}"}))
            return
        if self._guest_filter is not None:
            log.info(logfmt({"event": "host.addresses", "msg": "guest filter updated to the host's addresses",
                             "addresses": " ".join(map(str, f.host_addresses))}))
        self._guest_filter = f

    def _recreate(self, host: Host, name: str, start: bool) -> None:
        """A managed domain deleted by hand: define it again from what hvagent keeps, same identity."""
        row = host.provisioner.row(name)
        paths = VmPaths.of(self.cfg, name)
        if not paths.host_key.exists():
            host.state.update_vm(name, state=VmState.FAILED, reason="its domain and its files are gone")
            host.state.event("vm.failed", "domain deleted and its files are gone; destroy it", vm=name)
            return
        image = host.state.image(row.image, row.version)
        if image is None:
            host.state.update_vm(name, state=VmState.FAILED, reason=f"{row.image}-{row.version} is gone")
            return
        notes = []
        if not paths.os_disk(row.version).exists():
            make_overlay(host.catalog.base_for_use(image), paths.os_disk(row.version))
            notes.append("OS disk was gone: new overlay")
        if not paths.seed.exists():
            host.provisioner.write_vm_seed(row, paths)
        host.virt.define(host.provisioner.domain(row, Manifest.model_validate(image.manifest), host.accelerator()))
        if start:
            host.virt.start(name)
        host.state.event("vm.recreated", "; ".join(["domain was deleted outside hvagent: defined again"
                                                    + (" and started" if start else ""), *notes]), vm=name)

    # -- inbox (publish hook) ------------------------------------------------------------------
    def _inbox(self) -> None:
        inbox = self.cfg.inbox
        try:
            ino = INotify()
            ino.add_watch(inbox, inflags.MOVED_TO | inflags.CLOSE_WRITE)
        except OSError as e:
            log.error(logfmt({"msg": f"inbox {inbox}: cannot watch ({e.strerror}); publish hook off"}))
            return
        with ino:
            pending = True  # scan once at start: files may have arrived while the daemon was down
            while not self.stop.is_set():
                if pending:
                    try:
                        self.scan_inbox()
                    except Exception:  # the hook outlives any one failure (say, failed/ unwritable)
                        log.exception("inbox scan")
                try:
                    pending = bool(ino.read(timeout=1000))
                except OSError as e:  # scan again after a pause: a scan finds what an event would have said
                    log.error(logfmt({"msg": f"inbox {inbox}: cannot read its events ({e.strerror}); scanning"}))
                    self.stop.wait(1)
                    pending = True

    def scan_inbox(self) -> None:
        """Publish every FILE.qcow2 whose FILE.yaml has arrived; failures go to failed/ with a reason.

        One file's trouble, even one this code did not foresee, never stops the others."""
        for manifest in sorted(self.cfg.inbox.glob("*.yaml")):
            image = manifest.with_suffix(".qcow2")
            if not image.exists() or manifest.name.startswith("."):
                continue
            try:
                self._publish_from_inbox(image, manifest)
            except Exception:
                log.exception("inbox: %s", one_line(image.name))

    def _publish_from_inbox(self, image: Path, manifest: Path) -> None:
        try:
            with self.locked() as host:
                policy = host.rollouts.policy()  # journaled with the publish: its rollout survives a crash
                row = host.catalog.publish(image, manifest, rollout=policy)
                host.state.event("image.inbox", f"{row.ref} published from the inbox")
                host.rollouts.on_publish(row, policy)
        except Exception as e:
            if not isinstance(e, HvError):
                log.exception("inbox: publishing %s", one_line(image.name))
                e = EnvError(f"{image.name}: internal error ({e.__class__.__name__}); see the daemon's log")
            failed = self.cfg.inbox / "failed"
            failed.mkdir(mode=0o700, exist_ok=True)
            for f in (image, manifest):
                if f.exists():
                    shutil.move(f, failed / f.name)
            (failed / f"{image.stem}.error").write_text(f"{one_line(str(e))}\n")
            self.host().state.event("image.inbox-failed", f"{image.name}: {e}")
            return
        image.unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
        self.poke()


def _tcp_socket(address: str, field: str) -> socket.socket:
    host, port = listen_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EnvError(f"{field}: cannot listen on {address} ({e.strerror})") from e
    return sock


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _say(message: str) -> None:
    log.info(logfmt({"msg": message}))


class _LogfmtFormatter(logging.Formatter):
    def __init__(self, timestamps: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        head = f"level={record.levelname.lower()}"
        if self.timestamps:
            ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            head += f" ts={ts} pid={record.process}"
        if record.name == "hvagent.event" or record.getMessage().startswith(("msg=", "vm=")):
            line = f"{head} {record.getMessage()}"
        else:
            line = f"{head} {logfmt({'logger': record.name, 'msg': record.getMessage()})}"
        if record.exc_info:
            line += " " + logfmt({"exception": self.formatException(record.exc_info).replace("\n", " | ")})
        return line


def setup_logging() -> None:
    """One logfmt line per record on stderr: the journal adds time and unit; anywhere else (the
    role's fallback without systemd, a log file) each line carries its own time and pid."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter(timestamps="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
