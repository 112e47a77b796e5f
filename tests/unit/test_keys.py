"""Key fingerprints as OpenSSH prints them (what a tenant compares when it first connects)."""

from __future__ import annotations

import subprocess

import pytest

from agent.seed import fingerprint, new_ed25519

pytestmark = pytest.mark.unit


def test_fingerprint_is_ssh_keygens() -> None:
    pair = new_ed25519("x")
    shown = subprocess.run(["ssh-keygen", "-l", "-f", "/dev/stdin"], input=pair.public, capture_output=True,
                           text=True, check=True).stdout.split()[1]
    assert fingerprint(pair.public) == shown
