"""The tenant CLI's remotes file: kept private (0600 in 0700), replaced atomically under a lock, one
line for each bad input, and ``--remote`` before ``$HVAGENT_REMOTE`` before the default. Also the
remote client's mapping of answers to errors (a fake transport, no network)."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from agent import remote as remote_mod
from agent.cli import app
from agent.client import Client
from agent.errors import Conflict, EnvError, Forbidden, InputError, NotFound, Unauthorized
from agent.remote import Remote, Remotes
from tests.tlsca import TestCA

pytestmark = pytest.mark.unit


def r(name: str, url: str = "https://127.0.0.1:8470", token: str = "t0ken") -> Remote:
    return Remote(name=name, url=url, token=token)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_file_lives_under_xdg_config_home(tmp_path: Path) -> None:
    assert remote_mod.remotes_file({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "hvagent" / "remotes.yaml"
    default = Path.home() / ".config" / "hvagent" / "remotes.yaml"
    assert remote_mod.remotes_file({}) == default
    assert remote_mod.remotes_file({"XDG_CONFIG_HOME": "relative/dir"}) == default  # XDG: relative is ignored


def test_add_list_default_remove(xdg: Path) -> None:
    assert remote_mod.load() == Remotes()  # no file: no remotes
    remote_mod.update(lambda rs: rs.add(r("hv1")))
    remote_mod.update(lambda rs: rs.add(r("hv2", "https://hv2.example:8470")))
    rs = remote_mod.load()
    assert rs.names() == ["hv1", "hv2"] and rs.default == "hv1"  # the first one added is the default
    assert rs.get("hv2") == r("hv2", "https://hv2.example:8470")
    assert remote_mod.update(lambda rs: rs.with_default("hv2")).default == "hv2"
    assert remote_mod.load().default == "hv2"
    rs = remote_mod.update(lambda rs: rs.remove("hv2"))
    assert rs.names() == ["hv1"] and rs.default is None  # removing the default leaves none
    assert remote_mod.load() == rs
    with pytest.raises(Conflict, match="remote hv1: exists"):
        remote_mod.update(lambda rs: rs.add(r("hv1")))
    with pytest.raises(NotFound, match=r"^remote hv9: no such remote; the remotes are hv1$"):
        remote_mod.update(lambda rs: rs.remove("hv9"))


def test_file_0600_in_a_0700_directory(xdg: Path) -> None:
    xdg.parent.mkdir(parents=True, mode=0o755)
    os.chmod(xdg.parent, 0o755)
    old = os.umask(0)
    try:
        remote_mod.update(lambda rs: rs.add(r("hv1")))
    finally:
        os.umask(old)
    assert mode(xdg) == 0o600 and mode(xdg.parent) == 0o700
    assert "t0ken" in xdg.read_text()


def test_write_is_atomic_and_a_refused_change_leaves_the_file(xdg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remote_mod.update(lambda rs: rs.add(r("hv1")))
    before = xdg.read_bytes()
    inode = xdg.stat().st_ino

    def crash(*_: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m, pytest.raises(OSError, match="No space"):
        m.setattr(os, "replace", crash)
        remote_mod.update(lambda rs: rs.add(r("hv2")))
    assert xdg.read_bytes() == before and xdg.stat().st_ino == inode
    assert sorted(p.name for p in xdg.parent.iterdir()) == ["remotes.yaml"]  # no temp file left
    with pytest.raises(Conflict):
        remote_mod.update(lambda rs: rs.add(r("hv1")))
    assert xdg.read_bytes() == before and xdg.stat().st_ino == inode  # not even rewritten
    remote_mod.update(lambda rs: rs.add(r("hv2")))
    assert xdg.stat().st_ino != inode  # replaced by rename, never rewritten in place


def test_concurrent_adds_lose_nothing(xdg: Path) -> None:
    names = [f"hv{i}" for i in range(12)]
    threads = [threading.Thread(target=remote_mod.update, args=(lambda rs, n=n: rs.add(r(n)),)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(remote_mod.load().names()) == sorted(names)


def test_remote_flag_before_env_before_default() -> None:
    rs = Remotes(default="hv1", remotes=(r("hv1"), r("hv2"), r("hv3")))
    assert rs.pick(None, {}).name == "hv1"
    assert rs.pick(None, {"HVAGENT_REMOTE": "hv2"}).name == "hv2"
    assert rs.pick("hv3", {"HVAGENT_REMOTE": "hv2"}).name == "hv3"
    assert rs.pick(None, {"HVAGENT_REMOTE": ""}).name == "hv1"  # set but empty: not set
    with pytest.raises(NotFound, match=r"^--remote hv9: no such remote; the remotes are hv1, hv2, hv3$"):
        rs.pick("hv9", {"HVAGENT_REMOTE": "hv2"})
    with pytest.raises(NotFound, match=r"^HVAGENT_REMOTE=hv8: no such remote; the remotes are hv1, hv2, hv3$"):
        rs.pick(None, {"HVAGENT_REMOTE": "hv8"})
    no_default = Remotes(remotes=(r("hv1"), r("hv2")))
    with pytest.raises(InputError, match="no default remote; pick one of hv1, hv2 with --remote NAME"):
        no_default.pick(None, {})
    with pytest.raises(InputError, match="no remote: add one first: hvagent remote add NAME"):
        Remotes().pick(None, {})
    with pytest.raises(NotFound, match="--remote hv1: no such remote; there is none yet; add one: hvagent remote"):
        Remotes().pick("hv1", {})


@pytest.mark.parametrize(("url", "normal"), [
    ("https://hv1.example:8470", "https://hv1.example:8470"),
    ("https://hv1.example:8470/", "https://hv1.example:8470"),
    ("https://10.0.0.5", "https://10.0.0.5:443"),
    ("https://[::1]:8470", "https://[::1]:8470"),
])
def test_urls_accepted(url: str, normal: str) -> None:
    assert remote_mod.check_url(url) == normal


@pytest.mark.parametrize(("url", "needle"), [
    ("http://hv1.example:8470", "not https"),
    ("hv1.example:8470", "not https"),
    ("https://hv1.example:99999", "Port out of range"),
    ("https://alice@hv1.example:8470", "no user, path or query"),
    ("https://hv1.example:8470/v1", "no user, path or query"),
    ("https://:8470", "no user, path or query"),
])
def test_urls_refused(url: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        remote_mod.check_url(url)


def test_a_bad_file_is_one_line_naming_the_field(xdg: Path) -> None:
    xdg.parent.mkdir(parents=True)
    cases = [
        ("remotes: [", "not valid YAML"),
        ("- a\n- b\n", "accepted: a mapping with 'default'"),
        ("remotes: {hv1: {url: 'http://x:1', token: t}}", "remotes.hv1.url: 'http://x:1': not https"),
        ("remotes: {hv1: {url: 'https://x:1', token: 'two words'}}", "remotes.hv1.token: accepted: one line"),
        ("remotes: {hv1: {url: 'https://x:1', token: t, ca: rel.pem}}", "remotes.hv1.ca: rel.pem: an absolute"),
        ("remotes: {hv1: {url: 'https://x:1', token: t, cert: c, key: /k}}", "remotes.hv1.cert: c: an absolute"),
        ("remotes: {hv1: {url: 'https://x:1', token: t, cert: /c}}", "remotes.hv1: cert and key: both or neither"),
        ("remotes: {hv1: {url: 'https://x:1', token: t, crt: /c}}", "remotes.hv1.crt: Extra inputs"),
        ("default: hv2\nremotes: {hv1: {url: 'https://x:1', token: t}}", "default: 'hv2' is not one of"),
    ]
    for text, needle in cases:
        xdg.write_text(text)
        with pytest.raises(InputError) as e:
            remote_mod.load()
        assert str(e.value).startswith(str(xdg)) and needle in str(e.value), (text, str(e.value))
        assert "\n" not in str(e.value)


def test_ca_file_checked_and_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = TestCA(tmp_path / "pki", "test CA")
    server = ca.server()
    monkeypatch.chdir(tmp_path)
    assert remote_mod.check_ca(Path("pki/test-CA.pem")) == tmp_path / "pki" / "test-CA.pem"
    with pytest.raises(InputError, match=r"--ca: .*server\.key: not PEM certificates"):
        remote_mod.check_ca(server.key)
    with pytest.raises(InputError, match=r"--ca: .*none\.pem: cannot read \(No such file"):
        remote_mod.check_ca(Path("none.pem"))
    with pytest.raises(InputError, match=r"cannot read \(Is a directory\)"):
        remote_mod.check_ca(tmp_path)


def test_token_from_a_file_or_stdin(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("s3cret-token_x\n")
    assert remote_mod.read_token(f) == "s3cret-token_x"
    assert remote_mod.read_token(None, io.StringIO("piped-token\n")) == "piped-token"
    for bad in ("", "two\nlines", "with space"):
        with pytest.raises(InputError, match=r"token \(standard input\): accepted: one line"):
            remote_mod.read_token(None, io.StringIO(bad))
    with pytest.raises(InputError, match=r"--token-file: .*missing: cannot read"):
        remote_mod.read_token(tmp_path / "missing")


# -- the commands, in process --------------------------------------------------------------------
def test_remote_commands(xdg: Path, tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki", "test CA")
    token = tmp_path / "token"
    token.write_text("alice-token\n")
    runner = CliRunner()
    res = runner.invoke(app, ["remote", "add", "hv1", "https://127.0.0.1:8470", "--token-file", str(token),
                              "--ca", str(ca.cert)])
    assert res.exit_code == 0, res.output
    assert "added remote hv1: https://127.0.0.1:8470, CA" in res.output and "(the default remote)" in res.output
    res = runner.invoke(app, ["remote", "add", "hv2", "https://hv2.example:8470"], input="bob-token\n")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["remote", "list", "--json"])
    assert json.loads(res.stdout) == [
        {"name": "hv1", "url": "https://127.0.0.1:8470", "ca": str(ca.cert), "cert": None, "default": True},
        {"name": "hv2", "url": "https://hv2.example:8470", "ca": None, "cert": None, "default": False}]
    assert "token" not in res.stdout  # never shown
    res = runner.invoke(app, ["remote", "list"])
    assert "hv2.example" in res.stdout and "alice-token" not in res.stdout
    assert runner.invoke(app, ["remote", "default", "hv2"]).exit_code == 0
    assert remote_mod.load().default == "hv2"
    res = runner.invoke(app, ["remote", "remove", "hv2"])
    assert "removed remote hv2; there is no default remote now" in res.output
    assert mode(xdg) == 0o600 and mode(xdg.parent) == 0o700
    # refused: nothing written
    before = xdg.read_bytes()
    for args, error, needle in [
        (["remote", "add", "hv3", "http://127.0.0.1:1"], InputError, "URL: 'http://127.0.0.1:1': not https"),
        (["remote", "add", "Bad_Name", "https://127.0.0.1:1"], InputError, "NAME: 'Bad_Name' is not a valid"),
        (["remote", "add", "hv1", "https://127.0.0.1:1"], Conflict, "remote hv1: exists"),
        (["remote", "add", "hv3", "https://127.0.0.1:1", "--ca", str(token)], InputError, "not PEM certificates"),
        (["remote", "default", "hv7"], NotFound, "remote hv7: no such remote; the remotes are hv1"),
        (["--remote", "hv7", "vm", "list"], NotFound, "--remote hv7: no such remote; the remotes are hv1"),
        (["--remote", "hv1", "ps"], InputError, "--remote: only `hvagent vm ...` talks to a remote, not `hvagent ps`"),
    ]:
        res = runner.invoke(app, args, input="tok\n")
        assert isinstance(res.exception, error) and needle in str(res.exception), (args, res.exception)
    assert xdg.read_bytes() == before


def test_vm_create_checks_keys_before_any_call(xdg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_ed25519.pub
    runner = CliRunner()
    res = runner.invoke(app, ["vm", "create", "web-1", "--image", "tiny-1.*"])
    assert isinstance(res.exception, InputError) and "--ssh-key: none given, and" in str(res.exception)
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n-----END OPENSSH PRIVATE KEY-----\n")
    res = runner.invoke(app, ["vm", "create", "web-1", "--image", "tiny-1.*", "--ssh-key", str(private)])
    assert isinstance(res.exception, InputError), res.output
    assert f"--ssh-key: {private}: line 1: not an SSH public key" in str(res.exception)
    assert "(hint: give the public key (.pub)" in str(res.exception)


# -- the remote client's errors --------------------------------------------------------------------
def fake(status: int, body: object, remote: Remote | None = None) -> Client:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t0ken"
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="https://127.0.0.1:8470",
                        headers={"Authorization": "Bearer t0ken"})
    return Client(http, "https://127.0.0.1:8470", remote)


def test_answers_map_to_one_line_errors_naming_the_remote() -> None:
    hv1 = r("hv1")
    cases: list[tuple[int, object, type[Exception], str]] = [
        (401, {"error": "authorization: token expired"}, Unauthorized,
         "remote hv1: authorization: token expired (hint: the token was refused"),
        (403, {"error": "quota: vms: alice may have 2 VM(s) and has 2"}, Forbidden, "remote hv1: quota: vms"),
        (404, {"error": "vm web-1: no such VM"}, NotFound, "remote hv1: vm web-1: no such VM"),
        (409, {"error": "vm web-1: the name is taken"}, Conflict, "remote hv1: vm web-1: the name is taken"),
        (422, {"error": "cpus: Input should be greater than or equal to 1"}, InputError, "remote hv1: cpus:"),
        (503, {"error": "libvirt: down"}, EnvError, "remote hv1: libvirt: down"),
        (200, "<html>a proxy</html>", EnvError, "remote hv1: https://127.0.0.1:8470: GET /v1/vms/web-1: HTTP 200 "
         "without JSON: not hvagent's API"),
    ]
    for status, body, error, needle in cases:
        with pytest.raises(error) as e:
            fake(status, body, hv1).request("GET", "/v1/vms/web-1")
        assert str(e.value).startswith(needle), str(e.value)
    with pytest.raises(NotFound, match=r"^vm web-1: no such VM$"):  # the local daemon's lines are as before
        fake(404, {"error": "vm web-1: no such VM"}).request("GET", "/v1/vms/web-1")


def test_a_remote_with_an_unusable_ca_is_refused_before_any_call(tmp_path: Path) -> None:
    missing = Remote(name="hv1", url="https://127.0.0.1:8470", token="t", ca=tmp_path / "gone.pem")
    with pytest.raises(InputError, match=r"^remote hv1: ca: .*gone\.pem: cannot read \(No such file"):
        Client.https(missing)
