"""Key fingerprints as OpenSSH prints them (what a tenant compares when it first connects); key
pairs written whole, and healed when a crash left a private key without its .pub."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.seed import fingerprint, load_or_create_keypair, new_ed25519, public_of, write_keypair

pytestmark = pytest.mark.unit


def test_fingerprint_is_ssh_keygens() -> None:
    pair = new_ed25519("x")
    shown = subprocess.run(["ssh-keygen", "-l", "-f", "/dev/stdin"], input=pair.public, capture_output=True,
                           text=True, check=True).stdout.split()[1]
    assert fingerprint(pair.public) == shown


def test_a_key_pair_cut_short_between_its_files_is_healed_on_load(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the private key and its .pub broke every later provision (the .pub was read)."""
    from agent import seed

    def crash(name: str) -> None:
        raise KeyboardInterrupt(name)  # stands in for SIGKILL at the fault point

    path = tmp_path / "id_ed25519"
    monkeypatch.setattr(seed, "fault", crash)
    with pytest.raises(KeyboardInterrupt, match=r"keypair\.first-written"):
        write_keypair(new_ed25519("hvagent"), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id_ed25519"]  # whole, no temp file
    assert path.stat().st_mode & 0o777 == 0o600
    monkeypatch.undo()
    pair = load_or_create_keypair(path, "hvagent")
    assert pair.private == path.read_text() and pair.public == public_of(pair.private, "hvagent")
    assert (tmp_path / "id_ed25519.pub").read_text() == pair.public + "\n"
    assert load_or_create_keypair(path, "hvagent") == pair  # made once, then read


def test_a_pub_of_another_key_is_replaced_and_a_private_key_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = load_or_create_keypair(path, "c")
    (tmp_path / "k.pub").write_text(new_ed25519("c").public + "\n")
    assert load_or_create_keypair(path, "c") == first
    with pytest.raises(FileExistsError):
        write_keypair(new_ed25519("c"), path)
    assert load_or_create_keypair(path, "c") == first and sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]
