"""The CLI's way to a running daemon: HTTP over its Unix socket with the local admin token.

``Client.detect`` returns None when no daemon answers (no socket, no token file, or nobody
listening): the CLI then works on its own, under the same host lock the daemon takes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from agent.config import Config
from agent.errors import Conflict, EnvError, Forbidden, HvError, InputError, NotFound, Unauthorized

_BY_STATUS: dict[int, type[HvError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}

# An idle connection is dropped here well before the daemon closes it (agent.api.KEEP_ALIVE): with
# equal timeouts a request sent on a connection about to expire meets the server's close, and the
# CLI reads "connection reset by peer".
KEEPALIVE_EXPIRY = 2.0


class Client:
    def __init__(self, socket_path: Path, token: str, timeout: float = 600.0) -> None:
        self.socket = socket_path
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://hvagent",
                                  headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                  limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY))

    @classmethod
    def detect(cls, cfg: Config) -> Client | None:
        sock = cfg.api.socket
        try:
            if not sock.exists():
                return None
            token = cfg.local_token.read_text().strip()
        except OSError:
            return None
        client = cls(sock, token)
        try:
            client._http.get("/healthz", timeout=2.0).raise_for_status()
        except httpx.HTTPError:
            client.close()
            return None
        return client

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise EnvError(f"hvagent daemon at {self.socket}: {method} {path}: {e}") from e
        if r.status_code >= 400:
            try:
                message = str(r.json()["error"])
            except (ValueError, KeyError, TypeError):
                message = r.text.strip() or r.reason_phrase
            if r.status_code >= 500:
                raise EnvError(f"daemon: {message}")
            raise _BY_STATUS.get(r.status_code, InputError)(message)
        return r.json()

    def wait_vm(self, name: str, timeout: float) -> dict[str, Any]:
        """Poll until the VM leaves provisioning; its final view."""
        deadline = time.monotonic() + timeout
        while True:
            vm: dict[str, Any] = self.request("GET", f"/v1/vms/{name}")
            if vm["state"] != "provisioning" or time.monotonic() > deadline:
                return vm
            time.sleep(1.0)

    def wait_rollout(self, rid: int, on_step: Any = None) -> dict[str, Any]:
        """Poll a rollout until it is no longer running; ``on_step(vm_view)`` sees each finished VM."""
        seen: set[str] = set()
        while True:
            ro: dict[str, Any] = self.request("GET", f"/v1/rollouts/{rid}")
            for s in ro["vms"]:
                if s["state"] in ("done", "rolled-back", "skipped") and s["vm"] not in seen:
                    seen.add(s["vm"])
                    if on_step is not None:
                        on_step(s)
            if ro["state"] != "running":
                return ro
            time.sleep(1.0)
