"""The CLI's way to a daemon: HTTP over the local Unix socket with the local admin token, or
HTTPS to a remote host (``agent.remote``) with a tenant's token. One place maps answers to errors.

``Client.detect`` returns None when no daemon answers (no socket, no token file, or nobody
listening): the CLI then works on its own, under the same host lock the daemon takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from agent.config import Config
from agent.errors import Conflict, EnvError, Forbidden, HvError, InputError, NotFound, Unauthorized
from agent.remote import UNREACHED, Remote, client_context, tls_failure

_BY_STATUS: dict[int, type[HvError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}

# An idle connection is dropped here well before the daemon closes it (agent.api.KEEP_ALIVE): with
# equal timeouts a request sent on a connection about to expire meets the server's close, and the
# CLI reads "connection reset by peer".
KEEPALIVE_EXPIRY = 2.0
CONNECT_TIMEOUT = 10.0


class Client:
    """Use ``Client.unix`` (the local daemon) or ``Client.https`` (a remote)."""

    def __init__(self, http: httpx.Client, where: str, remote: Remote | None = None) -> None:
        self._http = http
        self.where = where  # the socket or the URL, for messages
        self.remote = remote

    @classmethod
    def unix(cls, socket_path: Path, token: str, timeout: float = 600.0) -> Client:
        return cls(httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://hvagent",
                                headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)), str(socket_path))

    @classmethod
    def https(cls, remote: Remote, timeout: float = 600.0) -> Client:
        """A remote's API over TLS, its certificate checked against the remote's CA (and host name),
        the remote's client certificate, if any, presented."""
        verify = client_context(remote)
        return cls(httpx.Client(base_url=remote.url, headers={"Authorization": f"Bearer {remote.token}"},
                                verify=verify, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
                                limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)), remote.url, remote)

    @classmethod
    def detect(cls, cfg: Config) -> Client | None:
        sock = cfg.api.socket
        try:
            if not sock.exists():
                return None
            token = cfg.local_token.read_text().strip()
        except OSError:
            return None
        client = cls.unix(sock, token)
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
            raise self._unreached(method, path, e) from e
        # a remote's answers name the remote: a tenant may use several
        head = "" if self.remote is None else f"remote {self.remote.name}: "
        if r.status_code >= 400:
            try:
                message = str(r.json()["error"])
            except (ValueError, KeyError, TypeError):
                message = r.text.strip() or r.reason_phrase
            if r.status_code >= 500:
                raise EnvError(f"{head or 'daemon: '}{message}")
            hint = None
            if r.status_code == 401 and self.remote is not None:
                hint = f"the token was refused; add the remote again with a valid one (`hvagent remote remove " \
                       f"{self.remote.name}`, then `hvagent remote add`)"
            raise _BY_STATUS.get(r.status_code, InputError)(head + message, hint=hint)
        try:
            return r.json()
        except ValueError as e:
            raise EnvError(f"{head}{self.where}: {method} {path}: HTTP {r.status_code} without JSON: not "
                           "hvagent's API") from e

    def _unreached(self, method: str, path: str, e: httpx.HTTPError) -> HvError:
        """The one line for a request that got no answer: a TLS verification failure, or a host
        refusing the client certificate, is bad input (the remote's CA, cert or key), anything else
        the environment (host down, wrong port, network)."""
        if self.remote is None:
            return EnvError(f"hvagent daemon at {self.where}: {method} {path}: {e}")
        where = f"remote {self.remote.name}: {self.where}"
        refused = tls_failure(self.remote, e, where, closed=isinstance(e, httpx.RemoteProtocolError | httpx.ReadError))
        if refused is not None:
            return refused
        if isinstance(e, httpx.TimeoutException):
            what = "no connection" if isinstance(e, httpx.ConnectTimeout) else "no answer"
            return EnvError(f"{where}: {method} {path}: {what} in time ({e.__class__.__name__})",
                            hint="is the host up and reachable from here?")
        return EnvError(f"{where}: {method} {path}: cannot reach the host ({e or e.__class__.__name__})",
                        hint=UNREACHED)

    def wait_vm(self, name: str, timeout: float,
                on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the VM leaves provisioning; its final view. ``on_poll`` sees each view."""
        deadline = time.monotonic() + timeout
        while True:
            vm: dict[str, Any] = self.request("GET", f"/v1/vms/{name}")
            if on_poll is not None:
                on_poll(vm)
            if vm["state"] not in ("pending", "provisioning") or time.monotonic() > deadline:
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
