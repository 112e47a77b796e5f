"""A remote's client certificate (for a host whose API has ``api.tls.client_ca``): ``--cert`` and
``--key`` checked when the remote is added (both or neither, readable, PEM, matching, no
passphrase), kept as absolute paths, presented by every connection's TLS context, and the host's
refusal of a missing or unaccepted certificate as one line with a hint. The handshakes run in
memory (``ssl.MemoryBIO``), or with a small TLS server in a thread on 127.0.0.1 that, as
asyncio's TLS (the daemon's) does, closes without an alert: no daemon."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from agent import remote as remote_mod
from agent.cli import app
from agent.client import Client
from agent.errors import EnvError, HvError, InputError
from agent.remote import Remote, Remotes
from tests.tlsca import TestCA

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestCA, TestCA]:
    """The host's CA and a stranger's."""
    where = tmp_path_factory.mktemp("pki")
    return TestCA(where / "ca", "test CA"), TestCA(where / "other", "other CA")


def remote(ca: Path, cert: Path | None = None, key: Path | None = None) -> Remote:
    return Remote(name="hv1", url="https://127.0.0.1:8470", token="t0ken", ca=ca, cert=cert, key=key)


# -- the model and the file ----------------------------------------------------------------------
def test_cert_and_key_are_absolute_and_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cert and key: both or neither"):
        Remote(name="hv1", url="https://h:1", token="t", cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match=r"key\n.*k\.pem: an absolute path"):
        Remote(name="hv1", url="https://h:1", token="t", cert=tmp_path / "c.pem", key=Path("k.pem"))


def test_old_files_load_and_cert_paths_round_trip(xdg: Path, tmp_path: Path) -> None:
    xdg.parent.mkdir(parents=True)
    xdg.write_text("default: hv1\nremotes:\n  hv1: {url: 'https://127.0.0.1:8470', token: t0ken, ca: /etc/ca.pem}\n")
    old = remote_mod.load()
    assert old.get("hv1") == Remote(name="hv1", url="https://127.0.0.1:8470", token="t0ken", ca=Path("/etc/ca.pem"))
    assert old.remotes[0].cert is None and old.remotes[0].key is None
    withcert = Remote(name="hv2", url="https://h:1", token="t", cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    remote_mod.update(lambda rs: rs.add(withcert))
    assert remote_mod.load() == Remotes(default="hv1", remotes=(*old.remotes, withcert))
    text = xdg.read_text()
    assert f"cert: {tmp_path / 'c.pem'}" in text and f"key: {tmp_path / 'k.pem'}" in text
    assert "cert" not in text.split("hv2:")[0]  # a remote without one writes no empty fields


# -- what `remote add` checks ----------------------------------------------------------------------
def test_a_good_pair_is_made_absolute(pki: tuple[TestCA, TestCA], monkeypatch: pytest.MonkeyPatch) -> None:
    ca, _ = pki
    good = ca.client("good")
    monkeypatch.chdir(good.cert.parent)
    assert remote_mod.check_client_cert(Path(good.cert.name), Path(good.key.name)) == (good.cert, good.key)
    assert remote_mod.check_client_cert(None, None) is None
    both = good.cert.parent / "both.pem"  # the certificate and its key in one file, named twice
    both.write_bytes(good.cert.read_bytes() + good.key.read_bytes())
    assert remote_mod.check_client_cert(both, both) == (both, both)


def test_bad_pairs_are_one_line_naming_the_file(pki: tuple[TestCA, TestCA], tmp_path: Path) -> None:
    ca, _ = pki
    a, b = ca.client("a"), ca.client("b")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    missing = tmp_path / "missing.pem"
    cases: list[tuple[Path | None, Path | None, str]] = [
        (a.cert, None, "--cert: needs --key as well: a client certificate and its private key, both or neither"),
        (None, a.key, "--key: needs --cert as well"),
        (missing, a.key, f"--cert: {missing}: cannot read (No such file or directory)"),
        (a.cert, missing, f"--key: {missing}: cannot read (No such file or directory)"),
        (a.cert, tmp_path, f"--key: {tmp_path}: cannot read (Is a directory)"),
        (a.cert, b.key, f"--key: {b.key}: not the private key of the certificate in {a.cert}"),
        (ca.cert, a.key, f"--key: {a.key}: not the private key of the certificate in {ca.cert}"),
        (a.key, a.key, f"--cert: {a.key}: not a PEM certificate; accepted: the client certificate (PEM)"),
        (junk, a.key, f"--cert: {junk}: not a PEM certificate"),
        (a.cert, junk, f"--key: {junk}: not a PEM private key"),
        (a.cert, a.cert, f"--key: {a.cert}: not a PEM private key"),
        (a.cert, encrypted, f"--key: {encrypted}: an encrypted private key; accepted: an unencrypted PEM"),
    ]
    for cert, key, needle in cases:
        with pytest.raises(InputError) as e:
            remote_mod.check_client_cert(cert, key)
        assert str(e.value).startswith(needle) and "\n" not in str(e.value), (cert, key, str(e.value))


def test_remote_add_with_a_client_certificate(xdg: Path, tmp_path: Path, pki: tuple[TestCA, TestCA]) -> None:
    ca, _ = pki
    good, other = ca.client("alice"), ca.client("other")
    token = tmp_path / "token"
    token.write_text("alice-token\n")
    runner = CliRunner()
    base = ["remote", "add", "hv1", "https://127.0.0.1:8470", "--token-file", str(token), "--ca", str(ca.cert)]
    res = runner.invoke(app, [*base, "--cert", str(good.cert), "--key", str(good.key)])
    assert res.exit_code == 0, res.output
    assert f"CA {ca.cert}, client certificate {good.cert} (the default remote)" in res.output
    assert remote_mod.load().get("hv1") == remote(ca.cert, good.cert, good.key).model_copy(
        update={"token": "alice-token"})
    res = runner.invoke(app, ["remote", "list", "--json"])
    assert json.loads(res.stdout) == [{"name": "hv1", "url": "https://127.0.0.1:8470", "ca": str(ca.cert),
                                       "cert": str(good.cert), "default": True}]
    res = runner.invoke(app, ["remote", "list"], env={"COLUMNS": "400"})
    assert "CLIENT CERT" in res.stdout and str(good.cert) in res.stdout
    before = xdg.read_bytes()
    base[2] = "hv2"
    for extra, needle in [(["--cert", str(good.cert)], "--cert: needs --key as well"),
                          (["--key", str(good.key)], "--key: needs --cert as well"),
                          (["--cert", str(good.cert), "--key", str(other.key)], "not the private key of"),
                          (["--cert", str(good.cert), "--key", str(tmp_path / "none")], "cannot read")]:
        res = runner.invoke(app, [*base, *extra])
        assert isinstance(res.exception, InputError) and needle in str(res.exception), (extra, res.exception)
    assert xdg.read_bytes() == before


# -- every connection presents it -------------------------------------------------------------------
def server_context(ca: TestCA) -> ssl.SSLContext:
    """As agent.tls serves with api.tls.client_ca: a client certificate ``ca`` signed is required."""
    server = ca.server()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert, server.key)
    ctx.load_verify_locations(cafile=ca.cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def exchange(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> ssl.SSLError | None:
    """A handshake and a first request in memory; the client's TLS error, if it got one."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        try:
            if not client_done:
                client.do_handshake()
                client_done = True
                client.write(b"GET /v1/vms")
            else:
                client.read(64)
                return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            return e
        s_in.write(c_out.read())
        try:
            if not server_done:
                server.do_handshake()
                server_done = True
            server.read(64)
            server.write(b"HTTP/1.1 200 OK")
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass  # refused: its alert is on its way to the client
        c_in.write(s_out.read())
    raise AssertionError("no end to the handshake")


def test_the_context_presents_the_client_certificate(pki: tuple[TestCA, TestCA]) -> None:
    ca, other = pki
    good, stranger = ca.client("tenant"), other.client("stranger")
    host = server_context(ca)
    assert exchange(remote_mod.client_context(remote(ca.cert, good.cert, good.key)), host) is None
    refused = exchange(remote_mod.client_context(remote(ca.cert)), host)
    assert refused is not None and refused.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    refused = exchange(remote_mod.client_context(remote(ca.cert, stranger.cert, stranger.key)), host)
    assert refused is not None and refused.reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_a_cert_gone_bad_since_it_was_added_is_one_line(pki: tuple[TestCA, TestCA], tmp_path: Path) -> None:
    ca, _ = pki
    good = ca.client("tenant")
    gone = tmp_path / "gone.pem"
    for path, label in ((gone, "cert"), (gone, "key")):
        r = remote(ca.cert, path if label == "cert" else good.cert, path if label == "key" else good.key)
        with pytest.raises(InputError, match=rf"^remote hv1: {label}: .*gone\.pem: cannot read \(No such file"):
            Client.https(r)
    with pytest.raises(InputError, match=r"^remote hv1: key: .* not the private key of the certificate"):
        remote_mod.client_context(remote(ca.cert, good.cert, ca.client("another").key))


def failing(e: ssl.SSLError, r: Remote) -> Client:
    """A client whose every request ends in ``e`` on the first read, as httpx raises it."""
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError(str(e)) from e

    return Client(httpx.Client(transport=httpx.MockTransport(answer), base_url=r.url), r.url, r)


def test_refusals_over_the_client_certificate_name_it(pki: tuple[TestCA, TestCA]) -> None:
    ca, other = pki
    good, stranger = ca.client("tenant"), other.client("stranger")
    host = server_context(ca)
    none, strange = remote(ca.cert), remote(ca.cert, stranger.cert, stranger.key)
    required = exchange(remote_mod.client_context(none), host)
    unknown = exchange(remote_mod.client_context(strange), host)
    assert required is not None and unknown is not None
    cases: list[tuple[ssl.SSLError, Remote, type[HvError], str]] = [
        (required, none, InputError, "remote hv1: https://127.0.0.1:8470: the host requires a client certificate, "
         "and this remote has none (hint: add it again with one the CA of the host's api.tls.client_ca signed: "
         "`hvagent remote remove hv1`, then `hvagent remote add` with --cert FILE --key FILE)"),
        (unknown, strange, InputError, f"remote hv1: https://127.0.0.1:8470: the host refused the client "
         f"certificate {stranger.cert} (tlsv1 alert unknown ca) (hint: it takes a valid certificate the CA of its "
         "api.tls.client_ca signed"),
        (ssl.SSLError(1, "[SSL] other"), remote(ca.cert, good.cert, good.key), EnvError,
         f"remote hv1: https://127.0.0.1:8470: TLS handshake failed ([SSL] other) (hint: is this port the daemon's "
         f"api.listen with api.tls? a daemon with api.tls.client_ca also wants a client certificate its CA signed; "
         f"this remote's is {good.cert})"),
    ]
    for e, r, error, needle in cases:
        with pytest.raises(error) as raised:
            failing(e, r).request("GET", "/v1/vms")
        assert str(raised.value).startswith(needle), str(raised.value)


# -- a host that closes without an alert, as asyncio's TLS (uvicorn's) does --------------------------
@contextmanager
def tls_server(ctx: ssl.SSLContext, alert: bool = False) -> Iterator[str]:
    """A TLS server in a thread on 127.0.0.1 that ends each connection after its handshake, or at
    a failed one, closing without the alert unless ``alert``; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
        conn.settimeout(5)
        while True:
            try:
                tls.do_handshake()
                conn.sendall(outgoing.read())
                return
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                data = conn.recv(65536)
                if not data:
                    return
                incoming.write(data)
            except ssl.SSLError:
                if alert:
                    conn.sendall(outgoing.read())
                return

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, suppress(OSError):
                handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_tls_1_2_handshake_tells_a_refused_certificate(pki: tuple[TestCA, TestCA]) -> None:
    ca, other = pki
    good, stranger = ca.client("tenant"), other.client("stranger")

    def at(url: str, cert: tuple[Path, Path] | None = None) -> Remote:
        return Remote(name="hv1", url=url, token="t", ca=ca.cert, cert=cert and cert[0], key=cert and cert[1])

    for alert in (False, True):
        with tls_server(server_context(ca), alert) as url:
            assert remote_mod.handshake_refused(at(url))
            assert remote_mod.handshake_refused(at(url, (stranger.cert, stranger.key)))
            assert not remote_mod.handshake_refused(at(url, (good.cert, good.key)))
    open_host = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server = ca.server("open")
    open_host.load_cert_chain(server.cert, server.key)
    with tls_server(open_host) as url:
        assert not remote_mod.handshake_refused(at(url))
    assert not remote_mod.handshake_refused(at(f"https://127.0.0.1:{socket_port_closed()}"))
    with tls_server(server_context(other)) as url:  # the host's certificate does not verify: not ours to say
        assert not remote_mod.handshake_refused(at(url, (good.cert, good.key)))


def socket_port_closed() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_host_closing_without_an_alert_is_named_too(pki: tuple[TestCA, TestCA]) -> None:
    """TLS 1.3: the client's handshake is done before the host checks; the host then closes, silently."""
    ca, other = pki
    stranger = other.client("stranger")
    with tls_server(server_context(ca)) as url:
        none = Remote(name="hv1", url=url, token="t", ca=ca.cert)
        c = Client.https(none)
        with pytest.raises(InputError, match=r"^remote hv1: https://127\.0\.0\.1:\d+: the host requires a client "
                           r"certificate, and this remote has none \(hint: add it again"):
            c.request("GET", "/v1/vms")
        c.close()
        strange = none.model_copy(update={"cert": stranger.cert, "key": stranger.key})
        c = Client.https(strange)
        with pytest.raises(InputError, match=rf"the host refused the client certificate {stranger.cert} \(it broke"):
            c.request("GET", "/v1/vms")
        c.close()
