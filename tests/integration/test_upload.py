"""Publishing refuses early: a request without a valid admin token before its body is read, and an
image that cannot be accepted before a byte of it reaches the store. An accepted upload streams
straight into the store's hashing copy, spooled nowhere. A real ``hvagent serve``, real HTTP on
127.0.0.1 (raw sockets where a client must be able to stop mid-body) and the real CLI."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from inotify_simple import INotify
from inotify_simple import flags as inflags

from tests.conftest import hvagent, image
from tests.integration.daemon_fixture import EXE, Daemon, daemon_fixture

pytestmark = [pytest.mark.integration, pytest.mark.daemon]

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def daemon(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon accepting images of up to 1 GiB, whose temporary directory is ours to watch."""
    (state_dir / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(state_dir / "tmp"))
    yield from daemon_fixture(state_dir, extra={"max_virtual_size": GiB})


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HVAGENT_CONFIG": str(d.state_dir / "config.yaml")}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=600)


def spooled(d: Daemon) -> list[Path]:
    """What an upload may have left: files in the daemon's temporary and upload directories."""
    return [p for top in (d.state_dir / "tmp", d.state_dir / "uploads") if top.exists() for p in top.rglob("*")]


def open_spools(d: Daemon) -> list[str]:
    """The daemon's open files in its temporary and upload directories (a spool is unlinked at once)."""
    fds = Path(f"/proc/{d.proc.pid}/fd")
    tops = (str(d.state_dir / "tmp"), str(d.state_dir / "uploads"))
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except FileNotFoundError:
            continue
    return [t for t in targets if t.startswith(tops)]


def upload_form(files: list[tuple[str, tuple[str, bytes]]]) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://hvagent/v1/images", files=files)
    return request.headers["content-type"], request.read()


def post(d: Daemon, token: str | None, content_type: str, length: int) -> socket.socket:
    """A connection that has sent the headers of ``POST /v1/images`` announcing ``length`` bytes."""
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {length}\r\n{auth}\r\n".encode())
    return s


def response(s: socket.socket) -> tuple[int, str, bool]:
    """Status, error line, and whether the server closed the connection after it."""
    r = http.client.HTTPResponse(s)
    r.begin()
    body = yaml.safe_load(r.read())
    closed = r.will_close and s.recv(1) == b""
    return r.status, str(body.get("error", "")) if isinstance(body, dict) else "", closed


# -- 4: authentication before the body ---------------------------------------------------------
@pytest.mark.parametrize(("who", "status", "fragment"), [
    (None, 401, "missing bearer token"),
    ("nobody", 401, "unknown token"),
    ("expired", 401, "token expired"),
    ("alice", 403, "needs an admin token"),
])
def test_upload_without_an_admin_token_is_refused_before_the_body(daemon: Daemon, who: str | None, status: int,
                                                                   fragment: str) -> None:
    token = "not-a-token" if who == "nobody" else daemon.tokens[who] if who else None
    ctype, body = upload_form([("manifest", ("m.yaml", b"name: x\n")), ("image", ("x.qcow2", b"\0" * (8 << 10)))])
    started = time.monotonic()
    s = post(daemon, token, ctype, 512 * MiB)
    with s:
        s.sendall(body[:4096])  # and nothing more: the answer must not wait for the other 512 MiB
        got, error, closed = response(s)
    assert time.monotonic() - started < 5
    assert (got, closed) == (status, True), error
    assert fragment in error and "\n" not in error
    assert spooled(daemon) == []


@pytest.mark.parametrize(("who", "status"), [("nobody", 401), ("ops", 413)])
def test_an_early_refusal_reaches_a_client_that_sent_its_whole_body(daemon: Daemon, who: str, status: int) -> None:
    """The client sends all of its body before it reads (as httpx does), and reads a second later:
    the refusal is still there to read. A server closing the socket with the body unread makes the
    kernel reset the connection, which destroys the unread answer (a CI run saw a 413's headers
    arrive and its body not)."""
    ctype, body = upload_form([("manifest", ("m.yaml", b"name: x\n")), ("image", ("x.qcow2", b"\0" * (2 * MiB)))])
    token = "not-a-token" if who == "nobody" else daemon.tokens[who]
    # 413: the announced length is over the bound before the body; 401: the token
    s = post(daemon, token, ctype, len(body) if who == "nobody" else 2 * GiB)
    with s:
        try:
            s.sendall(body)
        except OSError as e:
            pytest.fail(f"the server reset the connection while the client sent its body: {e}")
        time.sleep(1)
        got, error, closed = response(s)
    assert (got, closed) == (status, True), error
    assert error and "\n" not in error
    assert spooled(daemon) == []


def test_upload_streams_into_the_store_and_is_spooled_nowhere(daemon: Daemon) -> None:
    src = image("tiny-1.0")
    data = src.read_bytes()
    ctype, body = upload_form([("manifest", ("tiny-1.0.yaml", src.with_suffix(".yaml").read_bytes())),
                               ("image", ("tiny-1.0.qcow2", data))])
    half = len(body) // 2
    store = daemon.state_dir / "images" / "tiny"
    with post(daemon, daemon.tokens["ops"], ctype, len(body)) as s:
        s.sendall(body[:half])
        # the store's hashing copy grows while half of the body has still to come
        deadline = time.monotonic() + 30
        copies: list[Path] = []
        while time.monotonic() < deadline and not any(p.stat().st_size for p in copies):
            copies = list(store.glob(".tiny-1.0.qcow2.*.tmp")) if store.exists() else []
            time.sleep(0.1)
        assert copies and copies[0].stat().st_size > 0, "nothing reached the store before the body ended"
        assert open_spools(daemon) == []
        s.sendall(body[half:])
        status, error, _ = response(s)
    assert status == 201, error
    images = daemon.call("ops", "GET", "/v1/images").json()
    assert [(i["name"], i["version"], i["sha256"]) for i in images] == [
        ("tiny", "1.0", hashlib.sha256(data).hexdigest())]
    assert spooled(daemon) == []


def test_cli_publish_through_the_daemon_leaves_no_spool(daemon: Daemon) -> None:
    r = cli(daemon, "images", "publish", str(image("tiny-1.0")), "--policy", "manual")
    assert r.returncode == 0, r.stderr
    assert "through the daemon" in r.stdout
    assert spooled(daemon) == []
    assert [i["version"] for i in daemon.call("ops", "GET", "/v1/images").json()] == ["1.0"]


def test_image_part_before_the_manifest_is_refused(daemon: Daemon) -> None:
    src = image("tiny-1.0")
    r = daemon.call("ops", "POST", "/v1/images", files=[("image", ("tiny-1.0.qcow2", src.read_bytes())), (
        "manifest", ("tiny-1.0.yaml", src.with_suffix(".yaml").read_bytes()))])
    assert r.status_code == 400, r.text
    assert "send the part 'manifest' (YAML, at most 1 MiB) first, then 'image'" in r.json()["error"]
    assert daemon.call("ops", "GET", "/v1/images").json() == []
    assert not (daemon.state_dir / "images").exists()


# -- 5: refused before copying -----------------------------------------------------------------
def manifest_for(path: Path, virtual_size: int = GiB) -> Path:
    out = path.with_suffix(".yaml")
    out.write_text(yaml.safe_dump({"name": "x", "family": 1, "version": "1.0", "sha256": "0" * 64, "format": "qcow2",
                                   "virtual_size": virtual_size, "firmware": "bios"}))
    return out


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def watch_store(state_dir: Path) -> INotify:
    """Sees the store directory created, however briefly (a refusal removes what it made)."""
    watch = INotify()
    watch.add_watch(state_dir, inflags.CREATE)
    return watch


def created_in_store(watch: INotify) -> list[str]:
    return [e.name for e in watch.read(timeout=0) if e.name == "images"]


@pytest.fixture
def small_host(state_dir: Path) -> Path:
    (state_dir / "config.yaml").write_text(f"state_dir: {state_dir}\nmax_virtual_size: {GiB}\n")
    return state_dir


@pytest.mark.parametrize(("size", "fragment"), [
    (3 * GiB, "3221225472 bytes (3.0 GiB) is larger than any accepted qcow2 image: max_virtual_size is "
              f"{GiB} bytes (1.0 GiB), so the file is at most {GiB + GiB // 128 + 16 * MiB} bytes"),
    (100 * MiB, "not a qcow2 image (magic 00000000)"),
])
def test_cli_refuses_before_copying(small_host: Path, size: int, fragment: str) -> None:
    path = sparse(small_host / "x.qcow2", size)
    manifest = manifest_for(path)
    watch = watch_store(small_host)
    started = time.monotonic()
    r = hvagent(small_host, "images", "publish", str(path), "--manifest", str(manifest))
    took = time.monotonic() - started
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert took < 5, took
    assert created_in_store(watch) == [] and not (small_host / "images").exists()
    assert r.stderr.strip() == f"hvagent: error: {path}: {fragment}"


def test_cli_refuses_a_manifest_over_max_virtual_size(small_host: Path) -> None:
    path = sparse(small_host / "x.qcow2", MiB)
    r = hvagent(small_host, "images", "publish", str(path), "--manifest", str(manifest_for(path, 2 * GiB)))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == (f"hvagent: error: {path}: the manifest's virtual size {2 * GiB} bytes (2.0 GiB) "
                                f"is too large; max_virtual_size is {GiB} bytes (1.0 GiB)")
    assert not (small_host / "images").exists()


@pytest.mark.parametrize(("size", "fragment"), [
    (3 * GiB, "image upload: larger than"),
    (100 * MiB, "x.qcow2: not a qcow2 image (magic 00000000)"),
])
def test_daemon_refuses_before_copying(daemon: Daemon, size: int, fragment: str) -> None:
    path = sparse(daemon.state_dir / "x.qcow2", size)
    manifest = manifest_for(path)
    watch = watch_store(daemon.state_dir)
    started = time.monotonic()
    r = cli(daemon, "images", "publish", str(path), "--manifest", str(manifest))
    took = time.monotonic() - started
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert took < 5, took
    assert created_in_store(watch) == [] and not (daemon.state_dir / "images").exists()
    line = r.stderr.strip()
    assert fragment in line and len(line.splitlines()) == 1, line
    assert spooled(daemon) == []
    assert daemon.call(None, "GET", "/healthz").status_code == 200
