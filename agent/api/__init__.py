"""The HTTP API (FastAPI): admins drive images, rollouts and every VM; tenants only their own VMs.

One router per resource (``host``, ``images``, ``rollouts``, ``vms``, ``disks``; ``relay``: SSH to a
guest over a WebSocket; ``console``: its serial console over a WebSocket); this module builds the
app from them and serves it with uvicorn.
Every error is ``{"error": "one line"}`` with a 4xx (5xx only when the host itself is at fault).
No request carries a host path, XML, a device, a QEMU argument or a libvirt URI.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from agent import __version__, qcow2
from agent.api import console, disks, host, images, relay, rollouts, vms
from agent.api.common import validation_line
from agent.api.middleware import AuthGate, BodyLimit
from agent.errors import HvError
from agent.manifest import MAX_MANIFEST_BYTES
from agent.throttle import AuthThrottle

if TYPE_CHECKING:
    from agent.daemon import Daemon

__all__ = ["KEEP_ALIVE", "create_app", "serve_api"]

log = logging.getLogger("hvagent.api")

# Seconds an idle connection stays open; longer than any client here keeps one (agent.client,
# httpx's default of 5 s), so a client never sends a request into the server's close.
KEEP_ALIVE = 30


def create_app(d: Daemon) -> FastAPI:
    app = FastAPI(title="hvagent", version=__version__,
                  description="Hypervisor host agent: VMs from versioned qcow2 guest OS images on libvirt.")
    app.state.daemon = d  # what the routers' dependencies (common.daemon, common.principal) read
    app.state.metrics = host.metrics_registry(d)
    for router in (host.router, images.router, rollouts.router, vms.router, disks.router, relay.router,
                   console.router):
        app.include_router(router)

    @app.exception_handler(HvError)
    async def _hv_error(_: Request, e: HvError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.http_status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_line(e.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"error": "internal error; see the daemon's log"}, status_code=500)

    return app


# -- serving -----------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """One uvicorn server of a group (plain HTTP, TLS) in one event loop: a signal to one stops all,
    and ``on_ready`` runs once every server of the group listens."""

    def __init__(self, config: uvicorn.Config, group: list[_Server], on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._group = group
        self._on_ready = on_ready
        group.append(self)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit and all(s.started for s in self._group):
            self._on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for server in self._group:
            uvicorn.Server.handle_exit(server, sig, frame)


def serve_api(d: Daemon, plain: list[socket.socket], secure: list[socket.socket], tls: ssl.SSLContext | None,
              on_ready: Callable[[], None]) -> None:
    """Serve the API: plain HTTP on ``plain`` (the Unix socket, loopback), and uvicorn's own TLS with
    ``tls`` on ``secure`` (``api.listen``); until SIGTERM or SIGINT."""
    app = create_app(d)
    mvs = d.cfg.max_virtual_size
    # the largest image file, its manifest, and the form's boundaries and part headers
    image_limit = qcow2.max_file_size(mvs) + MAX_MANIFEST_BYTES + (64 << 10)
    image_too_large = (f"image upload: larger than {image_limit} bytes, the most an image of max_virtual_size "
                       f"{mvs} bytes ({qcow2.human(mvs)}) takes with its metadata and manifest")
    body_too_large = f"request body: larger than {d.cfg.api.max_body} bytes"

    def limit(method: str, path: str) -> tuple[int, str]:
        if (method, path) == ("POST", "/v1/images"):
            return image_limit, image_too_large
        return d.cfg.api.max_body, body_too_large

    gated = BodyLimit(AuthGate(app, AuthThrottle(d.cfg.api.auth_failures)), limit)
    group: list[_Server] = []
    ready: list[bool] = []

    def ready_once() -> None:
        if not ready:
            ready.append(True)
            on_ready()

    # The SSH relay's WebSocket: websockets' Sans-I/O protocol, named so that a missing package fails
    # at start; no compression (SSH is encrypted); messages of at most 1 MiB (the relay sends 64 KiB).
    def config(context: ssl.SSLContext | None = None) -> uvicorn.Config:
        return uvicorn.Config(gated, log_config=None, access_log=False, lifespan="off", timeout_keep_alive=KEEP_ALIVE,
                              timeout_graceful_shutdown=30, ws="websockets-sansio", ws_per_message_deflate=False,
                              ws_max_size=1 << 20,
                              ssl_context_factory=None if context is None else lambda _config, _default: context)

    servers = [(_Server(config(), group, ready_once), plain)]
    if secure:
        assert tls is not None
        servers.append((_Server(config(tls), group, ready_once), secure))
    # uvicorn re-raises the signal it caught once it has shut down; let that land on a no-op so the
    # daemon can finish its engine step and exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve(sockets=socks) for server, socks in servers))

    asyncio.run(serve_all())
