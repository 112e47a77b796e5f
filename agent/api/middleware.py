"""ASGI middleware that answers before the body is read: 401/403 for a bad token (``AuthGate``),
413 for a body over the limit (``BodyLimit``). Wraps the whole app, for every caller; the gate
also answers a WebSocket handshake (the SSH relay) before it is accepted."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from agent.api.common import admin, caller
from agent.errors import HvError, Unauthorized
from agent.state import logfmt
from agent.throttle import AuthThrottle

log = logging.getLogger("hvagent.api")

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
ADMIN_ONLY_UPLOADS = frozenset({("POST", "/v1/images")})


class AuthGate:
    """401 and 403 before a byte of the body is read: FastAPI reads (and spools) a request's body
    before it runs the endpoint's dependencies. Those still decide; the gate only answers first for
    a missing, unknown or expired token, and for a tenant's token on an admin-only upload.

    A peer address that presented ``throttle.limit`` unknown or expired tokens within a minute
    gets 429 (with Retry-After) for any call until the oldest of them is a minute old; each such
    failure is logged. Other peers, the local CLI on the Unix socket among them, are served."""

    def __init__(self, app: FastAPI, throttle: AuthThrottle) -> None:
        self.app = app
        self.throttle = throttle
        self.public = frozenset({"/healthz"} | {u for u in (app.openapi_url, app.docs_url, app.redoc_url,
                                                              app.swagger_ui_oauth2_redirect_url) if u})

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in self.public:
            client = scope.get("client")
            peer = str(client[0]) if client and client[0] else "local"
            wait = self.throttle.retry_after(peer)
            if wait is not None:
                await deny(scope, receive, send, JSONResponse(
                    {"error": f"authorization: too many failed attempts from {peer}; try again in {math.ceil(wait)} s"},
                    status_code=429, headers={"Retry-After": str(math.ceil(wait))}))
                return
            conn = HTTPConnection({**scope, "app": self.app})  # as Starlette passes it to the dependencies
            try:
                who = await caller(conn)
                if scope["type"] == "http" and (scope["method"], scope["path"]) in ADMIN_ONLY_UPLOADS:
                    admin(who)
            except HvError as e:
                if isinstance(e, Unauthorized) and conn.headers.get("authorization"):  # a token, and a wrong one
                    n = self.throttle.failed(peer)
                    log.warning(logfmt({"event": "auth.failed", "peer": peer, "path": scope["path"],
                                        "failures": str(n), "msg": e.message}))
                await deny(scope, receive, send, JSONResponse({"error": str(e)}, status_code=e.http_status))
                return
        await self.app(scope, receive, send)


async def deny(scope: MutableMapping[str, Any], receive: Any, send: Any, response: JSONResponse) -> None:
    """Send ``response``; to a WebSocket handshake, before it is accepted, as the HTTP response the
    client reads (the ASGI denial-response extension, which uvicorn has), else as a bare 403."""
    if scope["type"] == "http":
        await response(scope, receive, send)
    elif "websocket.http.response" in scope.get("extensions", {}):
        await receive()  # websocket.connect
        await response(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008})


LINGER_S = 2.0  # how long a refused request's unread body is drained, at most
LINGER_IDLE_S = 0.5  # ... and how long the client may pause within it


class BodyLimit:
    """413 for a body over the limit: Content-Length checked first, streamed bodies counted.

    A response sent before the whole body was read (this 413, the gate's 401, any early refusal)
    closes the connection, and lingers first, as nginx's lingering close does: what the client
    still sends is read and dropped for at most ``LINGER_S`` before the response's last chunk.
    Closing a socket with unread data makes the kernel reset the connection, and a reset can
    destroy the response the client has not read yet (seen: a 413 whose headers arrived and
    whose body did not). Nothing drained is kept."""

    def __init__(self, app: ASGIApp, limit: Callable[[str, str], tuple[int, str]]) -> None:
        self.app = app
        self.limit = limit  # (method, path) -> (bytes, the 413's message)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, too_large = self.limit(scope["method"], scope["path"])
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        pending = length not in (None, b"0") or b"transfer-encoding" in headers
        seen = 0

        async def counted() -> Any:
            nonlocal seen, pending
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, too_large)
            pending = pending and bool(message.get("more_body")) and message["type"] == "http.request"
            return message

        held = False

        async def closing(message: MutableMapping[str, Any]) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and pending:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body") and pending:
                message, held = {**message, "more_body": True}, True
            await send(message)

        if length is not None and (not length.isdigit() or int(length) > limit):
            await JSONResponse({"error": too_large}, status_code=413)(scope, receive, closing)
        else:
            await self.app(scope, counted, closing)
        if held:
            await drain(receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def drain(receive: Any) -> None:
    """Read and drop the rest of a request's body: until it ends, the client pauses for
    ``LINGER_IDLE_S`` or ``LINGER_S`` have passed."""
    with anyio.move_on_after(LINGER_S):
        while True:
            with anyio.move_on_after(LINGER_IDLE_S) as idle:
                message = await receive()
            if idle.cancelled_caught or message["type"] != "http.request" or not message.get("more_body"):
                return
