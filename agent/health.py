"""Guest health and guest commands over SSH, always with the VM's pinned host key."""

from __future__ import annotations

import base64
import io
import logging
import select
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import tenacity

from agent.errors import HealthError, HvError

if TYPE_CHECKING:
    import paramiko

# What a guest command's result keeps of each stream; beyond it, output is read and dropped.
OUTPUT_LIMIT = 64 * 1024
_CHUNK = 64 * 1024

# paramiko (and its crypto stack, about 20 MiB resident) loads on the first SSH connection, not
# with the daemon: an idle host agent does not pay for it.

# A guest that is still booting makes paramiko log a traceback per attempt; health reports the
# outcome itself (last error kept), so its transport chatter stays out of the operator's terminal.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    host_key: str  # "ssh-ed25519 AAAA... [comment]": the only key the guest may present
    # For a guest on a network or bridge: its address, once known (a DHCP lease); None until then.
    locate: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str
    dropped: int = 0  # bytes of output beyond OUTPUT_LIMIT, read and not kept


Sink = Callable[[bytes], None]


class Head:
    """The first ``limit`` bytes written to it (a command's report starts there); the rest is dropped."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def __call__(self, chunk: bytes) -> None:
        kept = chunk[:max(self.limit - len(self.data), 0)]
        self.data += kept
        self.dropped += len(chunk) - len(kept)


class Tail:
    """The last ``limit`` bytes written to it (a failing command's reason is there); the rest is dropped."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def __call__(self, chunk: bytes) -> None:
        kept = chunk[-self.limit:]
        self.data += kept
        excess = max(len(self.data) - self.limit, 0)
        del self.data[:excess]
        self.dropped += len(chunk) - len(kept) + excess


def _client(ep: Endpoint, agent_key: str, timeout: float) -> paramiko.SSHClient:
    import paramiko

    ktype, b64 = ep.host_key.split()[:2]
    client = paramiko.SSHClient()
    key = paramiko.PKey.from_type_string(ktype, base64.b64decode(b64))
    name = ep.host if ep.port == 22 else f"[{ep.host}]:{ep.port}"
    client.get_host_keys().add(name, ktype, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(agent_key))
    try:
        client.connect(ep.host, ep.port, username=ep.user, pkey=pkey, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout, allow_agent=False, look_for_keys=False)
    except BaseException:
        client.close()  # a failed connect leaves its transport thread running otherwise
        raise
    return client


def run(ep: Endpoint, agent_key: str, command: str, timeout: float = 30.0, *,
        stdout: Sink | None = None, stderr: Sink | None = None) -> Result:
    """Run ``command`` in the guest; TimeoutError if it has not finished within ``timeout`` s of the call.

    Output goes to the sinks ``stdout`` and ``stderr`` as it arrives. Without them the result
    keeps the head of stdout and the tail of stderr, OUTPUT_LIMIT bytes each: the rest is read
    and dropped, so a guest that prints without end costs the host no memory, and its command
    still runs to its exit status (or to the deadline). Both streams are read as they come, as
    unread output of either would fill the channel's window and stall the command; the status
    is awaited with the same deadline (paramiko's ``recv_exit_status`` waits forever).
    """
    if timeout <= 0:
        raise TimeoutError(f"{command!r}: no time left to run it")
    deadline = time.monotonic() + timeout
    late = f"{command!r} did not finish within {timeout:.0f} s"
    head, tail = Head(), Tail()
    client = _client(ep, agent_key, min(timeout, 15.0))
    try:
        transport = client.get_transport()
        if transport is None:
            raise EOFError("ssh: connection closed")
        if (left := deadline - time.monotonic()) <= 0:  # connecting took it all (each phase has its limit)
            raise TimeoutError(late)
        chan = transport.open_session(timeout=left)
        chan.exec_command(command)
        _pump(chan, stdout or head, stderr or tail, deadline, late)
        return Result(chan.exit_status, head.data.decode(errors="replace"), tail.data.decode(errors="replace"),
                      head.dropped + tail.dropped)
    finally:
        client.close()


def _pump(chan: paramiko.Channel, stdout: Sink, stderr: Sink, deadline: float, late: str) -> None:
    """Feed the channel's output to the sinks until the command closed it and reported its status."""
    while True:
        ended = chan.eof_received or chan.closed  # read first: output that came before it is buffered
        busy = False
        if chan.recv_ready():
            stdout(chan.recv(_CHUNK))
            busy = True
        if chan.recv_stderr_ready():
            stderr(chan.recv_stderr(_CHUNK))
            busy = True
        if ended and not busy:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(late)
        if not busy:
            select.select([chan], [], [], left)
    if not chan.status_event.wait(max(deadline - time.monotonic(), 0.0)):
        raise TimeoutError(late)


def os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            parts = shlex.split(value) if value else [""]
            out[key.strip()] = parts[0] if parts else ""
    return out


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str
    version_id: str | None = None
    final: bool = False  # a failure that never fixes itself: stop waiting


def check_once(ep: Endpoint, agent_key: str, expected_version_id: str, command: str | None,
               deadline: float | None = None) -> Check:
    """One health probe: pinned host key, our key accepted, VERSION_ID, optional command.

    Each step has its own time limit, and none runs past ``deadline`` (``time.monotonic``), the
    end of the whole health wait.
    """
    import paramiko

    def limit(seconds: float) -> float:
        return seconds if deadline is None else min(seconds, deadline - time.monotonic())

    try:
        r = run(ep, agent_key, "cat /etc/os-release", timeout=limit(20))
    except paramiko.BadHostKeyException:
        return Check(False, "guest presented a host key other than the pinned one", final=True)
    except paramiko.SSHException as e:
        return Check(False, f"ssh: {e}" if str(e) else "ssh: no answer yet")
    except (TimeoutError, OSError, EOFError) as e:
        return Check(False, f"ssh: {e.__class__.__name__}: {e}")
    version_id = os_release(r.stdout).get("VERSION_ID")
    if version_id != expected_version_id:
        return Check(False, f"guest reports VERSION_ID={version_id!r}, expected {expected_version_id!r}", version_id)
    if command:
        try:
            c = run(ep, agent_key, command, timeout=limit(60))
        except TimeoutError as e:
            return Check(False, f"health command: {e}", version_id)
        except (paramiko.SSHException, OSError, EOFError) as e:
            return Check(False, f"health command: ssh failed: {e}", version_id)
        if c.status != 0:
            return Check(False, f"health command exited {c.status}: {c.stderr.strip()[-200:]}", version_id)
    return Check(True, "healthy", version_id)


def wait_healthy(ep: Endpoint, agent_key: str, expected_version_id: str, command: str | None, timeout: float,
                 *, halted: Callable[[], str | None] | None = None, sleep: Callable[[float], None] = time.sleep,
                 interval: float = 0.5) -> Check:
    """Probe until healthy or ``timeout`` seconds pass; raise HealthError with the last reason
    decided before the deadline (a last probe that the deadline cut short says less than that).

    Failures that never fix themselves end the wait at once: a guest presenting another host
    key, and a guest that ``halted()`` says QEMU stopped (paused after an emulation or I/O
    error, crashed, or shut off: a QEMU that died, a guest that powered off); it is asked
    before each probe.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_result(lambda c: not c.ok and not c.final),
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    target = ep
    deadline = time.monotonic() + timeout

    def probe() -> Check:
        nonlocal target
        if halted is not None:
            try:
                why = halted()
            except HvError:  # libvirt briefly away: SSH decides this round
                why = None
            if why is not None:
                return Check(False, why, final=True)
        if target.locate is not None:
            try:
                address = target.locate()
            except HvError as e:  # libvirt briefly away, say: keep probing until the timeout
                return Check(False, f"guest address: {e.message}")
            if address is None:
                return Check(False, "no address yet (waiting for the guest's DHCP lease)")
            target = replace(target, host=address, locate=None)
        return check_once(target, agent_key, expected_version_id, command, deadline=deadline)

    decided: Check | None = None  # the last failure that came before the deadline

    def timed_probe() -> Check:
        nonlocal decided
        c = probe()
        if not c.ok and time.monotonic() < deadline:
            decided = c
        return c

    last = retrying(timed_probe)
    if last is None or not last.ok:
        # a probe that the deadline cut short ("no time left") says less than the failure before it
        shown = decided if last is not decided and decided is not None else last
        reason = shown.reason if shown else "not probed"
        where = f"{target.host}:{target.port}" if target.host else "guest"
        raise HealthError(f"{where}: not healthy within {timeout:.0f}s: {reason}")
    return last
