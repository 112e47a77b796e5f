"""Guest health and guest commands over SSH, always with the VM's pinned host key."""

from __future__ import annotations

import base64
import io
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import tenacity

from agent.errors import HealthError, HvError

if TYPE_CHECKING:
    import paramiko

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


def _client(ep: Endpoint, agent_key: str, timeout: float) -> paramiko.SSHClient:
    import paramiko

    ktype, b64 = ep.host_key.split()[:2]
    client = paramiko.SSHClient()
    key = paramiko.PKey.from_type_string(ktype, base64.b64decode(b64))
    name = ep.host if ep.port == 22 else f"[{ep.host}]:{ep.port}"
    client.get_host_keys().add(name, ktype, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(agent_key))
    client.connect(ep.host, ep.port, username=ep.user, pkey=pkey, timeout=timeout, banner_timeout=timeout,
                   auth_timeout=timeout, allow_agent=False, look_for_keys=False)
    return client


def run(ep: Endpoint, agent_key: str, command: str, timeout: float = 30.0) -> Result:
    """Run ``command`` in the guest; TimeoutError if it has not finished within ``timeout`` s.

    The output is read before the exit status (a command that prints more than the channel's
    window would otherwise never finish), and the status is awaited with a deadline: paramiko's
    ``recv_exit_status`` waits forever, which would hang a health check on a guest that accepts
    the command and never completes it.
    """
    client = _client(ep, agent_key, min(timeout, 15.0))
    try:
        deadline = time.monotonic() + timeout
        _, out, err = client.exec_command(command, timeout=timeout)  # each read: at most timeout s
        stdout, stderr = out.read(), err.read()
        if not out.channel.status_event.wait(max(deadline - time.monotonic(), 0.0)):
            raise TimeoutError(f"{command!r} did not finish within {timeout:.0f} s")
        return Result(out.channel.exit_status, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
    finally:
        client.close()


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


def check_once(ep: Endpoint, agent_key: str, expected_version_id: str, command: str | None) -> Check:
    """One health probe: pinned host key, our key accepted, VERSION_ID, optional command."""
    import paramiko

    try:
        r = run(ep, agent_key, "cat /etc/os-release", timeout=20)
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
            c = run(ep, agent_key, command, timeout=60)
        except (paramiko.SSHException, OSError, EOFError) as e:
            return Check(False, f"health command: ssh failed: {e}", version_id)
        if c.status != 0:
            return Check(False, f"health command exited {c.status}: {c.stderr.strip()[-200:]}", version_id)
    return Check(True, "healthy", version_id)


def wait_healthy(ep: Endpoint, agent_key: str, expected_version_id: str, command: str | None, timeout: float,
                 *, halted: Callable[[], str | None] | None = None, sleep: Callable[[float], None] = time.sleep,
                 interval: float = 0.5) -> Check:
    """Probe until healthy or ``timeout`` seconds pass; raise HealthError with the last reason.

    Failures that never fix themselves end the wait at once: a guest presenting another host
    key, and a guest that ``halted()`` says QEMU stopped (paused after an emulation or I/O
    error, crashed); it is asked before each probe.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_result(lambda c: not c.ok and not c.final),
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    target = ep

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
        return check_once(target, agent_key, expected_version_id, command)

    last = retrying(probe)
    if last is None or not last.ok:
        reason = last.reason if last else "not probed"
        where = f"{target.host}:{target.port}" if target.host else "guest"
        raise HealthError(f"{where}: not healthy within {timeout:.0f}s: {reason}")
    return last
