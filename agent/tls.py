"""The API's TLS context, from the configuration's ``api.tls``: what uvicorn serves with."""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.config import Tls
from agent.errors import InputError


def server_context(tls: Tls) -> ssl.SSLContext:
    """TLS 1.2 or later with the configured certificate and key; with ``client_ca``, a client
    certificate signed by it is required. Each file that cannot be used is named in one line."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: no client of this API resumes sessions, and with tickets a
    # WebSocket handshake sometimes never reached the app (about 1 relay test run in 7 here: the
    # request sat unread on the server's side of TLS while the client had the tickets; 0 in 16
    # runs without them). A suspected asyncio SSL read path, not proven; see the notes.
    ctx.num_tickets = 0
    _readable(tls.cert, "api.tls.cert")
    _readable(tls.key, "api.tls.key")
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as e:
        raise InputError(f"api.tls: {tls.cert} and {tls.key}: not a PEM certificate and its private key "
                         f"({e.reason or e})") from e
    if tls.client_ca is not None:
        _readable(tls.client_ca, "api.tls.client_ca")
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except ssl.SSLError as e:
            raise InputError(f"api.tls.client_ca: {tls.client_ca}: not PEM CA certificates ({e.reason or e})") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _readable(path: Path, field: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise InputError(f"{field}: {path}: cannot read ({e.strerror})") from e
