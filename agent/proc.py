"""The one subprocess wrapper: no shell, a timeout, resource limits, the exact command logged.

Every external tool (qemu-img, ssh-keygen, ...) runs through :func:`run`. Failures become
one-line errors: "not found" and timeouts are the environment's fault (:class:`EnvError`),
a non-zero exit is a :class:`ProcessError` naming the command, the exit status or the
signal, and the last line stderr said.
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

from agent.errors import EnvError, HvError

log = logging.getLogger("hvagent.proc")

# How much of stderr's last line goes into an error message.
_STDERR_TAIL = 300


class ProcessError(HvError):
    """A command exited non-zero or was killed by a signal."""

    exit_code = 1
    http_status = 500

    def __init__(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        message = f"{shlex.join(self.argv)}: {describe_status(returncode)}"
        tail = last_line(stderr)
        if tail:
            message += f": {tail}"
        super().__init__(message)


def describe_status(returncode: int) -> str:
    """'exited with status 3' or 'killed by SIGKILL' (Popen reports a signal as -signum)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


def last_line(data: bytes) -> str:
    """The last non-empty line of a tool's output, printable and bounded, for a one-line error."""
    text = data.decode("utf-8", errors="replace")
    for line in reversed(text.splitlines()):
        cleaned = "".join(c if c.isprintable() else "?" for c in line).strip()
        if cleaned:
            return cleaned if len(cleaned) <= _STDERR_TAIL else cleaned[:_STDERR_TAIL] + "..."
    return ""


def _limiter(cpu_seconds: int | None, address_space: int | None) -> Callable[[], None] | None:
    """A preexec_fn that applies the limits in the child, after fork and before exec."""
    if cpu_seconds is None and address_space is None:
        return None

    def _lower(which: int, soft: int, hard: int) -> None:
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))

    def apply() -> None:
        if cpu_seconds is not None:
            # SIGXCPU at the soft limit; SIGKILL one second later if the child ignores it.
            _lower(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
        if address_space is not None:
            _lower(resource.RLIMIT_AS, address_space, address_space)

    return apply


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The child leads its own session, so this also reaches helpers it forked.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60,
    cpu_seconds: int | None = None,
    address_space: int | None = None,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (never through a shell) and return its captured stdout and stderr.

    ``timeout`` is wall-clock seconds; ``cpu_seconds`` and ``address_space`` (bytes) become
    RLIMIT_CPU and RLIMIT_AS in the child. stdin is ``input`` or /dev/null.
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("run: empty argv")
    cmd = shlex.join(args)
    log.debug("+ %s", cmd)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_limiter(cpu_seconds, address_space),
            start_new_session=True,
            close_fds=True,
        )
    except FileNotFoundError as e:
        if cwd is not None and e.filename is not None and os.fspath(e.filename) == os.fspath(cwd):
            raise EnvError(f"{cmd}: working directory {os.fspath(cwd)} does not exist") from e
        raise EnvError(f"{args[0]}: not found", hint="install the package that provides it") from e
    except PermissionError as e:
        raise EnvError(f"{args[0]}: cannot execute ({e.strerror})") from e
    with proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            _kill_group(proc)
            proc.wait()
            log.debug("timed out after %g s: %s", timeout, cmd)
            raise EnvError(f"{cmd}: timed out after {timeout:g} s and was killed") from e
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        log.debug("%s: %s", describe_status(proc.returncode), cmd)
        if check:
            raise ProcessError(args, proc.returncode, stdout, stderr)
    return result
