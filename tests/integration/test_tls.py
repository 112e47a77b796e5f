"""The API over TLS (issue 15, point 1): uvicorn's own TLS on `api.listen`, a client certificate
when `client_ca` is set, failed authentications throttled per peer, and `config check` refusing a
non-loopback address without TLS. A real `hvagent serve` on 127.0.0.1; no guest is booted."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.daemon_fixture import EXE, Daemon, daemon_fixture, free_port
from tests.tlsca import TestCA

pytestmark = [pytest.mark.integration, pytest.mark.daemon]


@pytest.fixture
def ca(state_dir: Path) -> TestCA:
    return TestCA(state_dir / "pki", "test CA")


def tls_daemon(state_dir: Path, ca: TestCA, **tls: Any) -> Iterator[Daemon]:
    server = ca.server()
    port = free_port()
    api = {"tcp": None, "listen": [f"127.0.0.1:{port}"], "auth_failures": 3,
           "tls": {"cert": str(server.cert), "key": str(server.key), **tls}}
    for d in daemon_fixture(state_dir, api=api):
        d.port = port
        yield d


def https(d: Daemon, who: str | None, ca_file: Path, cert: tuple[str, str] | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {d.tokens[who]}"} if who else {}
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return httpx.Client(base_url=f"https://127.0.0.1:{d.port}", headers=headers, timeout=30, verify=ctx)


def test_api_over_tls_only_with_throttled_failures(state_dir: Path, ca: TestCA) -> None:
    for d in tls_daemon(state_dir, ca):
        with https(d, "alice", ca.cert) as c:
            assert c.get("/v1/vms").json() == []
        # plain HTTP to the TLS port gets no answer from the API
        with pytest.raises(httpx.HTTPError), httpx.Client(base_url=f"http://127.0.0.1:{d.port}", timeout=10) as c:
            c.get("/healthz", headers={"Authorization": f"Bearer {d.tokens['alice']}"})
        # a server certificate another CA signed is refused by the client
        other = TestCA(state_dir / "other", "other CA")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), https(d, "alice", other.cert) as c:
            c.get("/v1/vms")
        with https(d, "expired", ca.cert) as c:
            r = c.get("/v1/vms")
            assert r.status_code == 401 and r.json() == {"error": "authorization: token expired"}, r.text
        # two more failures make three this minute (auth_failures: 3): then 429, even with a good token
        with https(d, None, ca.cert) as c:
            for _ in range(2):
                assert c.get("/v1/vms", headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = c.get("/v1/vms", headers={"Authorization": f"Bearer {d.tokens['alice']}"})
            assert r.status_code == 429 and "too many failed" in r.json()["error"], r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60
        assert d.log.read_text().count("event=auth.failed") == 3
        # the Unix socket's local CLI is another peer, served as before
        env = {**os.environ, "HVAGENT_CONFIG": str(d.state_dir / "config.yaml")}
        r2 = subprocess.run([str(EXE), "status"], capture_output=True, text=True, env=env, timeout=60)
        assert r2.returncode == 0, r2.stderr


def test_client_certificate_required_with_client_ca(state_dir: Path, ca: TestCA) -> None:
    good = ca.client("alice-laptop", "alice")
    stranger = TestCA(state_dir / "other", "other CA").client("stranger", "alice")
    for d in tls_daemon(state_dir, ca, client_ca=str(ca.cert)):
        with https(d, "alice", ca.cert, (str(good.cert), str(good.key))) as c:
            assert c.get("/v1/vms").status_code == 200
        for cert in (None, (str(stranger.cert), str(stranger.key))):
            with pytest.raises(httpx.HTTPError), https(d, "alice", ca.cert, cert) as c:
                c.get("/v1/vms")


def test_config_check_refuses_what_tls_needs(state_dir: Path, ca: TestCA) -> None:
    server = ca.server()
    other = ca.server("other")

    def check(api: str) -> subprocess.CompletedProcess[str]:
        config = state_dir / "config.yaml"
        config.write_text(f"state_dir: {state_dir}\napi: {api}\n")
        return subprocess.run([str(EXE), "--config", str(config), "config", "check"], capture_output=True,
                              text=True, timeout=60)

    cases = [
        ('{listen: ["0.0.0.0:8470"]}', "api.listen: 0.0.0.0:8470 is not a loopback address"),
        ('{listen: ["[::]:8470"]}', "api.listen: [::]:8470 is not a loopback address"),
        ('{listen: ["db.example:8470"]}', "api.listen: 'db.example:8470': the host is an IP address"),
        (f'{{listen: ["0.0.0.0:8470"], tls: {{cert: {state_dir}/none.pem, key: {server.key}}}}}',
         "api.tls.cert: " + str(state_dir / "none.pem") + ": cannot read"),
        (f'{{listen: ["0.0.0.0:8470"], tls: {{cert: {server.cert}, key: {other.key}}}}}',
         "not a PEM certificate and its private key"),
        (f'{{listen: ["0.0.0.0:8470"], tls: {{cert: {server.cert}, key: {server.key}, client_ca: {server.key}}}}}',
         "api.tls.client_ca: "),
        (f'{{tcp: "127.0.0.1:8470", tls: {{cert: {server.cert}, key: {server.key}}}}}', "api.tcp: plain HTTP"),
    ]
    for api, needle in cases:
        r = check(api)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (api, r.stderr)
    r = check(f'{{listen: ["0.0.0.0:8470"], tls: {{cert: {server.cert}, key: {server.key}, client_ca: {ca.cert}}}}}')
    assert r.returncode == 0, r.stderr
