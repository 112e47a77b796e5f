"""A tenant's remote CLI against a host whose API wants a client certificate (``api.tls.client_ca``):
the real ``hvagent`` command, with a tenant's own HOME and XDG_CONFIG_HOME, against a real
``hvagent serve`` over TLS on 127.0.0.1 (a throwaway CA). A remote added with ``--cert``/``--key``
presents it on every connection (the API, the SSH relay, the console); one without it, or with a
certificate another CA signed, is refused in one line naming the client certificate; bad
``--cert``/``--key`` input is refused when the remote is added, leaving the remotes file as it was.
No guest boots: a missing VM's 404 from the relay shows that TLS and the token passed.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_ROOT
from tests.integration.daemon_fixture import daemon_fixture, free_port
from tests.integration.tenant_cli import Site, Tenant
from tests.tlsca import Issued, TestCA

pytestmark = [pytest.mark.integration, pytest.mark.daemon]

MISSING = "ccert-none"  # a VM that never exists


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    state_dir = TEST_ROOT / f"ccert-{uuid.uuid4().hex[:8]}"
    state_dir.mkdir(mode=0o711)
    try:
        ca = TestCA(state_dir / "pki", "test CA")
        server = ca.server()
        port = free_port()
        api = {"tcp": None, "listen": [f"127.0.0.1:{port}"],
               "tls": {"cert": str(server.cert), "key": str(server.key), "client_ca": str(ca.cert)}}
        for d in daemon_fixture(state_dir, api=api, extra={"port_min": 22760, "port_max": 22769}):
            d.port = port
            yield Site(d, ca, f"https://127.0.0.1:{port}", state_dir / "tenants")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def alice(site: Site) -> Tenant:
    """alice's machine: her token in a file, her client certificate (signed by the host's CA), and
    her remote ``hv1`` added with it (the default remote)."""
    home = site.root / "alice"
    home.mkdir(parents=True)
    (home / "token").write_text(site.daemon.tokens["alice"] + "\n")
    t = Tenant(home)
    cert = client_cert(site, "alice")
    out = t.ok("remote", "add", "hv1", site.url, *add_args(site, t), "--cert", str(cert.cert), "--key",
               str(cert.key))
    assert f"added remote hv1: {site.url}, CA {site.ca.cert}, client certificate {cert.cert} (the default " \
           "remote)" in out, out
    return t


def client_cert(site: Site, stem: str) -> Issued:
    return site.ca.client(stem, "alice")


def add_args(site: Site, t: Tenant) -> list[str]:
    return ["--token-file", str(t.home / "token"), "--ca", str(site.ca.cert)]


def test_a_remote_with_the_client_certificate_is_served(site: Site, alice: Tenant) -> None:
    assert alice.json("vm", "list") == []
    cert = site.ca.where / "alice.pem"
    assert alice.json("remote", "list") == [{"name": "hv1", "url": site.url, "ca": str(site.ca.cert),
                                             "cert": str(cert), "default": True}]
    assert str(cert) in alice.ok("remote", "list")
    # the relay and the console too: TLS and the token pass, and the host answers for the VM
    for args in (["vm", "proxy", MISSING], ["vm", "console", MISSING], ["vm", "ssh", MISSING, "--", "true"]):
        line = alice.refused(2, *args)
        assert line.endswith(f"vm {MISSING}: no such VM"), (args, line)


def test_without_a_client_certificate_the_host_refuses(site: Site, alice: Tenant) -> None:
    alice.ok("remote", "add", "nocert", site.url, *add_args(site, alice))
    try:
        line = alice.refused(2, "--remote", "nocert", "vm", "list")
        assert f"remote nocert: {site.url}: the host requires a client certificate, and this remote has none" \
            in line, line
        assert "(hint: add it again with one the CA of the host's api.tls.client_ca signed" in line, line
        assert "--cert FILE --key FILE" in line, line
        # the relay, as ssh's ProxyCommand runs it, fails at the handshake with the same line
        for args in (["vm", "proxy", MISSING], ["vm", "console", MISSING]):
            line = alice.refused(2, "--remote", "nocert", *args)
            assert "the host requires a client certificate, and this remote has none" in line, (args, line)
        assert "no such VM" not in line
    finally:
        alice.ok("remote", "remove", "nocert")


def test_a_certificate_another_ca_signed_is_refused(site: Site, alice: Tenant) -> None:
    stranger = TestCA(site.root / "other-pki", "other CA").client("stranger", "alice")
    alice.ok("remote", "add", "stranger", site.url, *add_args(site, alice), "--cert", str(stranger.cert),
             "--key", str(stranger.key))
    try:
        for args in (["vm", "list"], ["vm", "proxy", MISSING]):
            line = alice.refused(2, "--remote", "stranger", *args)
            assert f"remote stranger: {site.url}: the host refused the client certificate {stranger.cert} (" \
                in line, (args, line)
            assert "(hint: it takes a valid certificate the CA of its api.tls.client_ca signed" in line, line
    finally:
        alice.ok("remote", "remove", "stranger")


def test_bad_cert_and_key_input_is_one_line_and_changes_nothing(site: Site, alice: Tenant) -> None:
    good, another = client_cert(site, "alice-2"), client_cert(site, "alice-3")
    missing = site.root / "missing.key"
    before = alice.remotes_file.read_bytes()
    base = ["remote", "add", "bad", site.url, *add_args(site, alice)]
    cases = [
        (["--cert", str(good.cert)], "--cert: needs --key as well: a client certificate and its private key, "
         "both or neither"),
        (["--key", str(good.key)], "--key: needs --cert as well"),
        (["--cert", str(good.cert), "--key", str(missing)], f"--key: {missing}: cannot read (No such file"),
        (["--cert", str(good.cert), "--key", str(site.root)], f"--key: {site.root}: cannot read (Is a directory)"),
        (["--cert", str(good.cert), "--key", str(another.key)],
         f"--key: {another.key}: not the private key of the certificate in {good.cert}"),
        (["--cert", str(good.key), "--key", str(good.key)], f"--cert: {good.key}: not a PEM certificate"),
    ]
    for extra, needle in cases:
        line = alice.refused(2, *base, *extra)
        assert needle in line, (extra, line)
    assert alice.remotes_file.read_bytes() == before


def test_a_cert_file_gone_since_it_was_added_is_one_line(site: Site, alice: Tenant) -> None:
    issued = client_cert(site, "alice-gone")
    alice.ok("remote", "add", "gone", site.url, *add_args(site, alice), "--cert", str(issued.cert),
             "--key", str(issued.key))
    try:
        assert alice.json("--remote", "gone", "vm", "list") == []
        issued.cert.unlink()
        for args in (["vm", "list"], ["vm", "proxy", MISSING]):
            line = alice.refused(2, "--remote", "gone", *args)
            assert line == f"hvagent: error: remote gone: cert: {issued.cert}: cannot read (No such file or " \
                           "directory)", (args, line)
    finally:
        alice.ok("remote", "remove", "gone")


def test_a_closed_port_is_still_not_a_certificate_problem(site: Site, alice: Tenant) -> None:
    issued = client_cert(site, "alice-down")
    closed = free_port()
    alice.ok("remote", "add", "down", f"https://127.0.0.1:{closed}", *add_args(site, alice), "--cert",
             str(issued.cert), "--key", str(issued.key))
    try:
        line = alice.refused(1, "--remote", "down", "vm", "list")
        assert "cannot reach the host" in line and "client certificate" not in line, line
    finally:
        alice.ok("remote", "remove", "down")
