"""Remotes: the hvagent hosts a tenant's CLI talks to over TLS, kept in
``$XDG_CONFIG_HOME/hvagent/remotes.yaml`` (default ``~/.config/hvagent/remotes.yaml``).

The file holds tokens: it is mode 0600 in a 0700 directory, replaced atomically (a private temp
file, fsynced, renamed) under an exclusive lock, so two ``hvagent remote`` commands at once never
lose an entry or leave half a file. A remote's CA, and its client certificate and key (for a
host whose API has ``api.tls.client_ca``), are paths of PEM files the user gave (made absolute),
read at each use; nothing but those paths is copied.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent import files
from agent.errors import Conflict, EnvError, HvError, InputError, NotFound
from agent.spec import check_name

ENV_REMOTE = "HVAGENT_REMOTE"
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,4096}$")  # what an Authorization header carries
_M = TypeVar("_M", bound=BaseModel)
_ADD_HINT = "hvagent remote add NAME https://HOST:PORT --ca CA.pem --token-file TOKEN"


def check_url(value: str) -> str:
    """``https://HOST[:PORT]`` (a name, an IPv4 address or ``[IPv6]``) -> ``https://HOST:PORT``."""
    accepted = "accepted: https://HOST:PORT, the daemon's api.listen address served with api.tls"
    try:
        u = urllib.parse.urlsplit(value)
        port = u.port
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}; {accepted}") from None
    if u.scheme != "https":
        raise ValueError(f"{value!r}: not https; {accepted} (a token never crosses a network in clear text)")
    if not u.hostname or u.username is not None or u.password is not None or u.path not in ("", "/") \
            or u.query or u.fragment:
        raise ValueError(f"{value!r}: {accepted}, nothing more (no user, path or query)")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"https://{host}:{port or 443}"


class Remote(BaseModel):
    """One host: where its API listens, the tenant's token for it, the CA its certificate is
    checked against (None: the system's trusted CAs) and the client certificate presented to it
    (None: none; a host with ``api.tls.client_ca`` wants one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="what --remote and HVAGENT_REMOTE name")
    url: str = Field(description="https://HOST:PORT")
    token: str = Field(repr=False, description="the tenant's API token for this host")
    ca: Path | None = Field(None, description="PEM file of the CA that signed the host's certificate")
    cert: Path | None = Field(None, description="PEM file of the client certificate presented to the host")
    key: Path | None = Field(None, description="PEM file of the client certificate's private key (unencrypted)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "remote name")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN_RE.match(v):
            raise ValueError("accepted: one line of 1 to 4096 visible ASCII characters, no spaces")
        return v

    @field_validator("ca", "cert", "key")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"{v}: an absolute path")
        return v

    @model_validator(mode="after")
    def _cert_and_key(self) -> Remote:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key: both or neither (a client certificate and its private key)")
        return self


class Remotes(BaseModel):
    """The file's content: the remotes by name and the default one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str | None = None
    remotes: tuple[Remote, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Remotes:
        names = [r.name for r in self.remotes]
        if len(set(names)) != len(names):
            raise ValueError("remotes: a name appears twice")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default: {self.default!r} is not one of the remotes")
        return self

    def names(self) -> list[str]:
        return [r.name for r in self.remotes]

    def get(self, name: str) -> Remote | None:
        return next((r for r in self.remotes if r.name == name), None)

    def add(self, remote: Remote) -> Remotes:
        """With ``remote`` added; the first remote becomes the default."""
        if self.get(remote.name) is not None:
            raise Conflict(f"remote {remote.name}: exists; `hvagent remote remove {remote.name}` first")
        return Remotes(default=self.default or remote.name, remotes=(*self.remotes, remote))

    def remove(self, name: str) -> Remotes:
        self.known(name, f"remote {name}")
        return Remotes(default=None if self.default == name else self.default,
                       remotes=tuple(r for r in self.remotes if r.name != name))

    def with_default(self, name: str) -> Remotes:
        self.known(name, f"remote {name}")
        return Remotes(default=name, remotes=self.remotes)

    def known(self, name: str, label: str) -> Remote:
        """The remote called ``name``; else one line, starting with ``label``, naming the remotes there are."""
        remote = self.get(name)
        if remote is None:
            there = (f"the remotes are {', '.join(self.names())}" if self.remotes
                     else f"there is none yet; add one: {_ADD_HINT}")
            raise NotFound(f"{label}: no such remote; {there}")
        return remote

    def pick(self, flag: str | None, env: Mapping[str, str] = os.environ) -> Remote:
        """``--remote NAME``, else ``$HVAGENT_REMOTE``, else the default remote."""
        if flag:
            return self.known(flag, f"--remote {flag}")
        if env.get(ENV_REMOTE):
            return self.known(env[ENV_REMOTE], f"{ENV_REMOTE}={env[ENV_REMOTE]}")
        if self.default is not None:
            return self.known(self.default, f"default remote {self.default}")
        if not self.remotes:
            raise InputError(f"no remote: add one first: {_ADD_HINT}")
        raise InputError(f"no default remote; pick one of {', '.join(self.names())} with --remote NAME, "
                         f"{ENV_REMOTE}=NAME or `hvagent remote default NAME`")


# -- the file ----------------------------------------------------------------------------------
def remotes_file(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CONFIG_HOME/hvagent/remotes.yaml``; a relative XDG_CONFIG_HOME is ignored (XDG says so)."""
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "hvagent" / "remotes.yaml"


def load(path: Path | None = None) -> Remotes:
    """The remotes in ``path`` (default ``remotes_file()``); none if the file does not exist."""
    path = path or remotes_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Remotes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    return parse(text, path)


def parse(text: str, path: Path) -> Remotes:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e.__class__.__name__})") from e
    data = data or {}
    entries = (data.get("remotes") or {}) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(entries, dict) or set(data) - {"default", "remotes"}:
        raise InputError(f"{path}: accepted: a mapping with 'default' (a name) and 'remotes' (name: {{url, token, "
                         "ca, cert, key}})")
    remotes: list[Remote] = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise InputError(f"{path}: remotes.{name}: accepted: a mapping of url, token, ca, cert and key")
        remotes.append(_validated(Remote, {**entry, "name": name}, f"{path}: remotes.{name}"))
    return _validated(Remotes, {"default": data.get("default"), "remotes": remotes}, str(path))


def _validated(model: type[_M], data: dict[str, Any], where: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise InputError(f"{where}.{field}: {msg}" if field else f"{where}: {msg}") from e


def dump(remotes: Remotes) -> str:
    body: dict[str, Any] = {
        "default": remotes.default,
        "remotes": {r.name: {"url": r.url, "token": r.token,
                             **{k: str(v) for k, v in (("ca", r.ca), ("cert", r.cert), ("key", r.key)) if v}}
                    for r in remotes.remotes},
    }
    return "# hvagent remotes (`hvagent remote --help`); it holds tokens: keep it 0600\n" + \
        yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def save(remotes: Remotes, path: Path | None = None) -> None:
    """Replace the remotes file atomically (``write_private``)."""
    write_private(path or remotes_file(), dump(remotes))


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically: 0600 from its first byte, in a 0700 directory."""
    _private_dir(path.parent)
    files.replace(path, text, 0o600)


def _private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            directory.chmod(0o700)
    except OSError as e:
        raise InputError(f"{directory}: cannot make a private directory ({e.strerror})") from e


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file's directory, for one read-modify-write."""
    _private_dir(path.parent)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update(change: Callable[[Remotes], Remotes], path: Path | None = None) -> Remotes:
    """Load, change and save the remotes under the lock; the file is untouched if ``change`` raises."""
    path = path or remotes_file()
    with _locked(path):
        remotes = change(load(path))
        save(remotes, path)
        return remotes


# -- TLS: what `remote add` checks and each connection uses ----------------------------------
class _Encrypted(Exception):
    """Raised by the password callback: a key that needs a passphrase is refused, never prompted
    for (``vm proxy`` runs as ssh's ProxyCommand, without a terminal)."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def check_ca(path: Path) -> Path:
    """An absolute path to a readable file of PEM certificates (as given: a renewed file keeps working)."""
    path = path.expanduser().absolute()
    _ca_context(path, "--ca")
    return path


def check_client_cert(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    """``--cert`` and ``--key`` as absolute paths (both or neither): a readable PEM certificate and
    its unencrypted private key, which must match."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--cert", "--key") if key is None else ("--key", "--cert")
        raise InputError(f"{given}: needs {missing} as well: a client certificate and its private key, both or "
                         "neither")
    cert, key = cert.expanduser().absolute(), key.expanduser().absolute()
    _load_client_cert(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key, "--cert", "--key")
    return cert, key


def client_context(remote: Remote) -> ssl.SSLContext:
    """The TLS context of every connection to ``remote`` (its API, the SSH relay, the console):
    the host's certificate checked against the remote's CA and host name, and the remote's client
    certificate, if it has one, presented. Its files are read now: one that went bad since ``remote
    add`` is one line naming the remote and the file."""
    where = f"remote {remote.name}"
    ctx = _ca_context(remote.ca, f"{where}: ca")
    if remote.cert is not None and remote.key is not None:
        _load_client_cert(ctx, remote.cert, remote.key, f"{where}: cert", f"{where}: key")
    return ctx


def _ca_context(ca: Path | None, where: str) -> ssl.SSLContext:
    """A client TLS context trusting ``ca`` (None: the system's CAs), host names checked."""
    if ca is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca))
    except OSError as e:  # ssl.SSLError is an OSError too: test it first
        if isinstance(e, ssl.SSLError):
            raise InputError(f"{where}: {ca}: not PEM certificates ({e.reason or e})",
                             hint="give the CA certificate (PEM) that signed the host's certificate") from e
        raise InputError(f"{where}: {ca}: cannot read ({e.strerror})") from e


def _load_client_cert(ctx: ssl.SSLContext, cert: Path, key: Path, cert_label: str, key_label: str) -> None:
    """``ctx`` with the client certificate chain ``cert`` and its private key ``key``; each failure
    one line naming the file at fault and what is accepted."""
    for path, label in ((cert, cert_label), (key, key_label)):
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise InputError(f"{label}: {path}: cannot read ({e.strerror})") from e
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise InputError(f"{key_label}: {key}: an encrypted private key; accepted: an unencrypted PEM private key",
                         hint="hvagent cannot ask for a passphrase (ssh runs `vm proxy` without a terminal); "
                              "keep the key unencrypted and readable by you alone (chmod 600)") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise InputError(f"{key_label}: {key}: not the private key of the certificate in {cert}",
                             hint="give the key the client certificate was issued for") from e
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
        except ssl.SSLError:
            raise InputError(f"{cert_label}: {cert}: not a PEM certificate; accepted: the client certificate "
                             "(PEM), then any intermediate CA certificates",
                             hint="one the CA of the host's api.tls.client_ca signed") from e
        raise InputError(f"{key_label}: {key}: not a PEM private key ({e.reason or 'no key in it'}); accepted: "
                         "the client certificate's private key, PEM, unencrypted") from e


_REFUSED_CERT = {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                 "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                 "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED"}
_CERT_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
PROBE_TIMEOUT = 5.0


def ssl_cause(e: BaseException) -> ssl.SSLError | None:
    """The TLS error under ``e`` (httpx wraps httpcore's, which wraps the ssl module's; the relay's
    error wraps websockets', which wraps it)."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def client_cert_refusal(remote: Remote, e: BaseException, where: str, closed: bool = False) -> HvError | None:
    """The one line for a connection the host refused over the client certificate (a missing one,
    or one it does not take), if that is what ``e`` was; else None.

    With TLS 1.3 the host checks the client's certificate after the client's side of the handshake
    is done, so a refusal ends the connection at the client's first read: with the host's alert
    (``tlsv13 alert certificate required``, ``tlsv1 alert unknown ca``) when the server sends one,
    as a bare close when it does not (asyncio's TLS, so uvicorn's and the daemon's, drops it). For
    a connection ``closed`` without an answer or an alert, a TLS 1.2 handshake, in which the host
    checks the certificate before it finishes, tells (``handshake_refused``)."""
    reason = getattr(ssl_cause(e), "reason", None) or ""
    if reason == _CERT_REQUIRED or (reason in _REFUSED_CERT and remote.cert is not None):
        how = f"({reason.lower().replace('_', ' ')})"
    elif closed and handshake_refused(remote):
        how = "(it broke the TLS handshake off)"
    else:
        return None
    add_again = f"`hvagent remote remove {remote.name}`, then `hvagent remote add` with --cert FILE --key FILE"
    if remote.cert is None:
        return InputError(f"{where}: the host requires a client certificate, and this remote has none",
                          hint=f"add it again with one the CA of the host's api.tls.client_ca signed: {add_again}")
    return InputError(f"{where}: the host refused the client certificate {remote.cert} {how}",
                      hint=f"it takes a valid certificate the CA of its api.tls.client_ca signed; {add_again}")


UNREACHED = "is the host up and its daemon serving this address (api.listen)? `hvagent remote list` shows the URL"


def tls_failure(remote: Remote, e: BaseException, where: str, closed: bool = False) -> HvError | None:
    """The one line for a connection that TLS ended, if it did: the host refusing the client
    certificate, the host's certificate not verifying against the remote's CA (bad input: the
    remote's --ca, or a URL naming what the certificate does not), another failed handshake. None
    if TLS is not what ended it. The same line for API calls and for the relay and the console."""
    refused = client_cert_refusal(remote, e, where, closed=closed)
    if refused is not None:
        return refused
    cause = ssl_cause(e)
    if isinstance(cause, ssl.SSLCertVerificationError):
        ca = remote.ca or "the system's trusted CAs"
        return InputError(f"{where}: the server's certificate does not verify against {ca} "
                          f"({cause.verify_message or cause.reason})",
                          hint="check --ca: the remote needs the CA that signed this host's certificate, "
                               "and a URL with the host name or address that certificate names")
    if cause is not None:
        mine = f"this remote's is {remote.cert}" if remote.cert else "this remote has none (--cert, --key)"
        return EnvError(f"{where}: TLS handshake failed ({getattr(cause, 'reason', None) or cause})",
                        hint="is this port the daemon's api.listen with api.tls? a daemon with "
                             f"api.tls.client_ca also wants a client certificate its CA signed; {mine}")
    return None


def handshake_refused(remote: Remote, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the host breaks off a TLS 1.2 handshake with the remote's context (its CA, its client
    certificate or none): what a host that wants a client certificate, and did not get one it
    takes, does before its side of the handshake is finished. No request is sent (no token)."""
    url = urllib.parse.urlsplit(remote.url)
    host = url.hostname or ""
    ctx = client_context(remote)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, url.port or 443), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host):
            return False
    except ssl.SSLCertVerificationError:
        return False
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        return True  # closed mid-handshake, without an alert
    except ssl.SSLError as e:
        return e.reason in {*_REFUSED_CERT, _CERT_REQUIRED, "SSLV3_ALERT_HANDSHAKE_FAILURE"}
    except OSError:
        return False  # not reached at all: not a matter of certificates


def read_token(token_file: Path | None, stdin: TextIO | None = None) -> str:
    """The token from ``token_file``, else from standard input (prompted for, unechoed, on a terminal)."""
    stdin = stdin or sys.stdin
    if token_file is not None:
        try:
            text = token_file.read_text()
        except OSError as e:
            raise InputError(f"--token-file: {token_file}: cannot read ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise InputError(f"--token-file: {token_file}: not text") from e
        where = f"--token-file: {token_file}"
    elif stdin.isatty():
        import getpass

        text = getpass.getpass("token: ")
        where = "token"
    else:
        text = stdin.read(8192)
        where = "token (standard input)"
    token = text.strip()
    if not _TOKEN_RE.match(token):
        raise InputError(f"{where}: accepted: one line of 1 to 4096 visible ASCII characters, no spaces",
                         hint="`hvagent token new` on the host prints one")
    return token
