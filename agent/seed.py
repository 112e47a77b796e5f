"""Keys and the NoCloud seed (an ISO 9660 volume labelled ``cidata``), in cloud-init's format."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import files
from agent.faults import point as fault


@dataclass(frozen=True)
class KeyPair:
    private: str  # OpenSSH format
    public: str  # "ssh-ed25519 AAAA..."


def new_ed25519(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return KeyPair(private, f"{public} {comment}")


def fingerprint(public_key: str) -> str:
    """``SHA256:...`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def write_keypair(kp: KeyPair, path: Path) -> None:
    """Write PATH (0600) and PATH.pub, each whole or not at all. PATH is linked into place only
    if there is none (FileExistsError otherwise: one of two concurrent writers wins), then PATH.pub
    replaced; ``load_or_create_keypair`` derives a PATH.pub that a crash in between left missing."""
    tmp = files.temp_beside(path, kp.private, 0o600)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fault("keypair.first-written")
    files.replace(_pub(path), kp.public + "\n", 0o644)


def public_of(private: str, comment: str) -> str:
    """The OpenSSH public key line of an OpenSSH private key, with ``comment``."""
    key = serialization.load_ssh_private_key(private.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 key")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode() + f" {comment}"


def load_or_create_keypair(path: Path, comment: str) -> KeyPair:
    """The key pair at PATH, made if there is no private key. PATH.pub is healed from the private
    key where it is missing or another key's (a crash between the two files)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile: use that one
            write_keypair(new_ed25519(comment), path)
    private = path.read_text()
    try:
        public = _pub(path).read_text().strip()
    except FileNotFoundError:
        public = ""
    derived = public_of(private, comment)
    if public.split()[:2] != derived.split()[:2]:
        public = derived
        files.replace(_pub(path), public + "\n", 0o644)
    return KeyPair(private, public)


class _Literal(str):
    pass


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def meta_data(instance_id: str, hostname: str) -> str:
    return yaml.safe_dump({"instance-id": instance_id, "local-hostname": hostname}, default_flow_style=False)


def user_data(authorized_keys: list[str], host_key: KeyPair, hostname: str) -> str:
    doc: dict[str, Any] = {
        "hostname": hostname,
        "ssh_authorized_keys": list(authorized_keys),
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {
            "ed25519_private": _Literal(host_key.private),
            "ed25519_public": host_key.public,
        },
    }
    return "#cloud-config\n" + yaml.dump(doc, Dumper=_Dumper, default_flow_style=False, sort_keys=True, width=1 << 16)


def write_seed(path: Path, meta: str, user: str) -> None:
    """An ISO 9660 volume labelled cidata with Rock Ridge and Joliet names, written atomically."""
    import pycdlib  # loaded when a seed is written, not with the daemon

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for iso_name, name, text in (("/METADATA.;1", "meta-data", meta), ("/USERDATA.;1", "user-data", user)):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
    files.replace(path, iso.write_fp)
    iso.close()
