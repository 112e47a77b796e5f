"""agent.proc: the one subprocess wrapper, exercised with real child processes."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from agent import proc
from agent.errors import EnvError, HvError

pytestmark = pytest.mark.unit

PY = sys.executable


def test_captures_stdout_and_stderr() -> None:
    r = proc.run([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert r.returncode == 0
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"


def test_no_shell_metacharacters_are_interpreted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    r = proc.run([PY, "-c", "import sys; print(sys.argv[1])", f"; touch {marker}"])
    assert r.stdout == f"; touch {marker}\n".encode()
    assert not marker.exists()


def test_pathlike_argv_input_env_and_cwd(tmp_path: Path) -> None:
    script = tmp_path / "echo.py"
    script.write_text("import os, sys\nsys.stdout.write(sys.stdin.read() + os.environ['HV_X'] + os.getcwd())\n")
    r = proc.run([PY, script], input=b"in:", env={"HV_X": "x:"}, cwd=tmp_path)
    assert r.stdout == f"in:x:{tmp_path}".encode()


def test_stdin_is_not_inherited() -> None:
    r = proc.run([PY, "-c", "import sys; print(repr(sys.stdin.read()))"])
    assert r.stdout == b"''\n"


def test_missing_executable_is_an_env_error() -> None:
    with pytest.raises(EnvError) as ei:
        proc.run(["hv-no-such-tool-xyz", "--version"])
    assert ei.value.message == "hv-no-such-tool-xyz: not found"
    assert ei.value.hint == "install the package that provides it"
    assert ei.value.exit_code == 1


def test_missing_cwd_is_not_reported_as_missing_tool(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="working directory"):
        proc.run([PY, "-c", "pass"], cwd=tmp_path / "nope")


def test_timeout_kills_and_names_the_command() -> None:
    start = time.monotonic()
    with pytest.raises(EnvError) as ei:
        proc.run([PY, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert time.monotonic() - start < 10
    assert "timed out after 0.5 s" in ei.value.message
    assert "time.sleep(30)" in ei.value.message


def test_timeout_also_kills_grandchildren_holding_the_pipes() -> None:
    # The grandchild inherits stdout; without killing the group, reading it would block 30 s.
    code = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    start = time.monotonic()
    with pytest.raises(EnvError, match="timed out"):
        proc.run([PY, "-c", code], timeout=0.5)
    assert time.monotonic() - start < 10


def test_nonzero_exit_message_names_command_status_and_stderr() -> None:
    code = "import sys; sys.stderr.write('first\\nlast words\\n'); sys.exit(3)"
    with pytest.raises(proc.ProcessError) as ei:
        proc.run([PY, "-c", code])
    e = ei.value
    assert isinstance(e, HvError)
    assert e.exit_code == 1
    assert e.returncode == 3
    assert e.message.startswith(f"{PY} -c ")
    assert "sys.exit(3)" in e.message
    assert "exited with status 3" in e.message
    assert e.message.endswith(": last words")
    assert "\n" not in e.message


def test_stderr_tail_is_one_printable_bounded_line() -> None:
    code = "import sys; sys.stderr.write('a\\x1b[31m' + 'x' * 5000 + '\\n\\n'); sys.exit(1)"
    with pytest.raises(proc.ProcessError) as ei:
        proc.run([PY, "-c", code])
    assert "\x1b" not in ei.value.message
    assert "\n" not in ei.value.message
    assert len(ei.value.message) < 1000


def test_check_false_returns_the_failure() -> None:
    r = proc.run([PY, "-c", "raise SystemExit(4)"], check=False)
    assert r.returncode == 4


def test_killed_by_a_signal_is_named() -> None:
    with pytest.raises(proc.ProcessError, match="killed by SIGTERM"):
        proc.run([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])


def test_rlimit_cpu_kills_a_busy_loop() -> None:
    start = time.monotonic()
    with pytest.raises(proc.ProcessError) as ei:
        proc.run([PY, "-c", "while True: pass"], cpu_seconds=1, timeout=30)
    assert time.monotonic() - start < 20
    assert "SIGXCPU" in ei.value.message or "SIGKILL" in ei.value.message


def test_rlimit_as_bounds_memory() -> None:
    code = "b = bytearray(512 << 20)"
    assert proc.run([PY, "-c", code]).returncode == 0
    with pytest.raises(proc.ProcessError, match="MemoryError"):
        proc.run([PY, "-c", code], address_space=256 << 20)


def test_limits_do_not_leak_into_the_parent() -> None:
    import resource

    before = resource.getrlimit(resource.RLIMIT_CPU)
    proc.run([PY, "-c", "pass"], cpu_seconds=5, address_space=1 << 30)
    assert resource.getrlimit(resource.RLIMIT_CPU) == before


def test_exact_command_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="hvagent.proc"):
        proc.run([PY, "-c", "print(1)", "a b"])
    assert any(r.name == "hvagent.proc" and f"{PY} -c 'print(1)' 'a b'" in r.getMessage()
               for r in caplog.records)


def test_describe_status() -> None:
    assert proc.describe_status(0) == "exited with status 0"
    assert proc.describe_status(-9) == "killed by SIGKILL"
    assert proc.describe_status(-200) == "killed by signal 200"


def test_empty_argv_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        proc.run([])
