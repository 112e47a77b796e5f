"""Keys and the NoCloud seed (an ISO 9660 volume labelled ``cidata``), in cloud-init's format."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


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


def write_keypair(kp: KeyPair, path: Path) -> None:
    """Write PATH (0600) and PATH.pub without a moment of wider permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(kp.private)
    path.with_name(path.name + ".pub").write_text(kp.public + "\n")


def load_or_create_keypair(path: Path, comment: str) -> KeyPair:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_keypair(new_ed25519(comment), path)
    return KeyPair(path.read_text(), path.with_name(path.name + ".pub").read_text().strip())


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
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        iso.write_fp(f)
        f.flush()
        os.fsync(f.fileno())
    iso.close()
    os.replace(tmp, path)
