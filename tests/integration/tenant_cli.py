"""A tenant's machine for remote CLI tests: the real ``hvagent`` command with a home of its own
(HOME, XDG_CONFIG_HOME) and none of the host's configuration, against a daemon serving TLS."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.daemon_fixture import EXE, Daemon
from tests.tlsca import TestCA


@dataclass
class Site:
    daemon: Daemon
    ca: TestCA
    url: str
    root: Path  # where tenants' homes and files go


@dataclass
class Tenant:
    home: Path

    def env(self) -> dict[str, str]:
        drop = ("HVAGENT_CONFIG", "HVAGENT_STATE_DIR", "HVAGENT_REMOTE")
        env = {k: v for k, v in os.environ.items() if k not in drop and "proxy" not in k.lower()}
        return env | {"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config")}

    @property
    def remotes_file(self) -> Path:
        return self.home / ".config" / "hvagent" / "remotes.yaml"

    def run(self, *args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=self.env(), input=stdin or "",
                              timeout=timeout)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        r = self.run(*args, stdin=stdin)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, status: int, *args: str) -> str:
        """The one line of a refused command (exit ``status``)."""
        r = self.run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == status and len(lines) == 1 and lines[0].startswith("hvagent: error: "), \
            (args, r.returncode, r.stdout, r.stderr)
        return lines[0]
