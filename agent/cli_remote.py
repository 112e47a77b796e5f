"""``hvagent remote`` and ``hvagent vm``: a tenant's CLI, on any machine, driving its own VMs on a
remote host's API over TLS. Nothing here reads a host's configuration or state.

The remote is ``--remote NAME`` (a global option), else ``$HVAGENT_REMOTE``, else the default
remote (``agent.remote``). Every ``--json`` prints the API's answer as it is (see /openapi.json).
"""

from __future__ import annotations

import os
import shlex
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from agent import remote as remote_mod
from agent.errors import Conflict, HealthError, HvError, InputError, one_line
from agent.output import emit_json, err, out, say, table_of, timestamp
from agent.spec import check_name, check_public_key

if TYPE_CHECKING:
    from agent.client import Client

remote_app = typer.Typer(no_args_is_help=True, help="Remote hosts for `hvagent vm`: URL, token, CA and client "
                         "certificate of each.")
vm_app = typer.Typer(no_args_is_help=True, help="Your VMs on a remote host (--remote NAME, $HVAGENT_REMOTE, or "
                     "the default remote), through its API over TLS.")

DEFAULT_KEY = Path("~/.ssh/id_ed25519.pub")
JsonOpt = Annotated[bool, typer.Option("--json", help="the API's answer, as JSON")]
NameArg = Annotated[str, typer.Argument(help="VM name")]


# -- remotes -----------------------------------------------------------------------------------
@remote_app.command("add")
def remote_add(
    name: Annotated[str, typer.Argument(help="a name for the host, e.g. hv1")],
    url: Annotated[str, typer.Argument(help="https://HOST:PORT: the host's api.listen, served with TLS")],
    token_file: Annotated[Path | None, typer.Option("--token-file", help="file holding your API token; "
                                                    "default: standard input")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="PEM file of the CA that signed the host's certificate; "
                                            "default: the system's trusted CAs")] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="PEM file of your client certificate, for a host "
                                              "whose API has api.tls.client_ca (with --key)")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="PEM file of that certificate's private key, "
                                             "unencrypted (with --cert)")] = None,
) -> None:
    """Add a remote (the first one added is the default). The token is read from --token-file or stdin."""
    for field, value, check in (("NAME", name, lambda v: check_name(v, "remote name")),
                                ("URL", url, remote_mod.check_url)):
        try:
            check(value)
        except ValueError as e:
            raise InputError(f"{field}: {e}") from e
    remote_mod.load().add(remote_mod.Remote(name=name, url=url, token="-"))  # a taken name: refused before the
    # token is typed in (and again under the file's lock)
    ca_path = None if ca is None else remote_mod.check_ca(ca)
    cert_key = remote_mod.check_client_cert(cert, key)
    cert_path, key_path = cert_key or (None, None)
    remote = remote_mod.Remote(name=name, url=url, token=remote_mod.read_token(token_file), ca=ca_path,
                               cert=cert_path, key=key_path)
    remotes = remote_mod.update(lambda r: r.add(remote))
    say(f"added remote {name}: {remote.url}" + (f", CA {ca_path}" if ca_path else ", the system's CAs")
        + (f", client certificate {cert_path}" if cert_path else "")
        + (" (the default remote)" if remotes.default == name else ""))


@remote_app.command("list")
def remote_list(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """The remotes: name, URL, CA file, client certificate file and which is the default (tokens are never shown)."""
    remotes = remote_mod.load()
    items: list[dict[str, Any]] = [{"name": r.name, "url": r.url, "ca": None if r.ca is None else str(r.ca),
                                    "cert": None if r.cert is None else str(r.cert),
                                    "default": r.name == remotes.default} for r in remotes.remotes]
    if as_json:
        emit_json(items)
        return
    if not items:
        err.print(f"no remotes in {remote_mod.remotes_file()}; add one: hvagent remote add NAME https://HOST:PORT "
                  "--ca CA.pem", markup=False, highlight=False)
        return
    table = table_of("NAME", "URL", "CA", "CLIENT CERT", "DEFAULT")
    for i in items:
        table.add_row(i["name"], i["url"], i["ca"] or "(system CAs)", i["cert"] or "-", "*" if i["default"] else "")
    out.print(table)


@remote_app.command("remove")
def remote_remove(name: Annotated[str, typer.Argument(help="remote name")]) -> None:
    """Forget a remote and its token (nothing changes on the host)."""
    before = remote_mod.load().default
    remote_mod.update(lambda r: r.remove(name))
    say(f"removed remote {name}" + ("; there is no default remote now (hvagent remote default NAME)"
                                    if before == name else ""))


@remote_app.command("default")
def remote_default(name: Annotated[str, typer.Argument(help="remote name")]) -> None:
    """Make NAME the remote used when neither --remote nor $HVAGENT_REMOTE names one."""
    remote_mod.update(lambda r: r.with_default(name))
    say(f"default remote: {name}")


# -- the remote's client -----------------------------------------------------------------------
@contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    from agent.client import Client  # httpx loads only where it is used

    chosen = ctx.find_root().params.get("remote")  # the global --remote (agent.cli's callback)
    c = Client.https(remote_mod.load().pick(chosen))
    try:
        yield c
    finally:
        c.close()


@contextmanager
def _busy(text: str) -> Iterator[Any]:
    """A spinner on a terminal's stderr while the host works; nothing when output is not a terminal."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(text, total=None)
        yield lambda description: bar.update(task, description=description)


def _follow(c: Client, name: str, timeout: float) -> None:
    """Wait until the VM leaves provisioning: running is done, anything else an error (exit 1)."""
    with _busy(f"{name}: provisioning") as show:
        vm = c.wait_vm(name, timeout, lambda v: show(f"{name}: {v['state']}"))
    if vm["state"] == "running":
        say(f"{name}: running ({vm['image']}-{vm['version']}, track {vm['track']})")
    elif vm["state"] in ("pending", "provisioning"):
        raise HealthError(f"vm {name}: still {vm['state']} after {timeout:.0f} s",
                          hint=f"`hvagent vm show {name}` follows it; `hvagent vm events {name}` says why")
    else:
        raise HealthError(f"vm {name}: {vm['state']}: {vm['reason'] or 'no reason given'}",
                          hint=f"`hvagent vm events {name}` shows what happened")


def _keys(files: list[Path] | None) -> list[str]:
    """The public keys in the files (one per line; blank lines and # comments skipped), each checked
    here first, so a private key given by mistake never leaves this machine."""
    if not files:
        default = DEFAULT_KEY.expanduser()
        if not default.is_file():
            raise InputError(f"--ssh-key: none given, and {default} does not exist",
                             hint="name your public key file: --ssh-key ~/.ssh/KEY.pub")
        files = [default]
    keys: list[str] = []
    for f in files:
        try:
            lines = f.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--ssh-key: {f}: cannot read ({getattr(e, 'strerror', None) or 'not text'})") from e
        found = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()
                 and not line.lstrip().startswith("#")]
        if not found:
            raise InputError(f"--ssh-key: {f}: no public key in it")
        for n, line in found:
            try:
                keys.append(check_public_key(line))
            except ValueError as e:
                raise InputError(f"--ssh-key: {f}: line {n}: {e}", hint="give the public key (.pub), never the "
                                 "private one") from e
    return keys


# -- VMs ---------------------------------------------------------------------------------------
@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    name: NameArg,
    image: Annotated[str, typer.Option("--image", help="track: tiny-1.* (newest of family 1) or tiny-1.18 (pinned)")],
    cpus: Annotated[int | None, typer.Option("--cpus", help="vCPUs; default 1")] = None,
    memory: Annotated[int | None, typer.Option("--memory", metavar="MIB", help="MiB; default 256")] = None,
    data_disk: Annotated[int | None, typer.Option("--data-disk", metavar="GIB", help="GiB; default none. A disk "
                                                  "you kept from a VM of this name is attached again")] = None,
    ssh_key: Annotated[list[Path] | None, typer.Option("--ssh-key", metavar="FILE", help="public key file, "
                                                       "repeatable; default ~/.ssh/id_ed25519.pub")] = None,
    wait: Annotated[bool, typer.Option(help="wait until it runs (its SSH answers with its host key)")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 600.0,
) -> None:
    """Create a VM from an image track; waits until it is running unless --no-wait."""
    body: dict[str, Any] = {"name": name, "image": image, "ssh_keys": _keys(ssh_key)}
    body |= {k: v for k, v in (("cpus", cpus), ("memory", memory), ("data_disk", data_disk)) if v is not None}
    with _client(ctx) as c:
        vm = c.request("POST", "/v1/vms", json=body)
        if not wait:
            say(f"{name}: {vm['state']} ({vm['image']}-{vm['version']}); `hvagent vm show {name}` follows it")
            return
        _follow(c, name, timeout)


@vm_app.command("list")
def vm_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Your VMs on the remote: name, version, track, state, size."""
    with _client(ctx) as c:
        vms: list[dict[str, Any]] = c.request("GET", "/v1/vms")
    if as_json:
        emit_json(vms)
        return
    table = table_of("NAME", "VERSION", "TRACK", "STATE", "CPUS", "MEMORY", "DATA DISK", "NOTE")
    for v in vms:
        table.add_row(v["name"], f"{v['image']}-{v['version']}", v["track"], v["state"], str(v["cpus"]),
                      f"{v['memory']} MiB", f"{v['data_disk']} GiB" if v["data_disk"] else "-", v["reason"] or "")
    out.print(table)


@vm_app.command("show")
def vm_show(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False) -> None:
    """One VM, every field."""
    with _client(ctx) as c:
        vm: dict[str, Any] = c.request("GET", f"/v1/vms/{name}")
    if as_json:
        emit_json(vm)
        return
    table = table_of("FIELD", "VALUE")
    for k, v in vm.items():
        shown = timestamp(v) if k.endswith("_at") and isinstance(v, int | float) else "-" if v is None else str(v)
        table.add_row(k, shown)
    out.print(table)


@vm_app.command("start")
def vm_start(
    ctx: typer.Context,
    name: NameArg,
    wait: Annotated[bool, typer.Option(help="wait until it runs")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 600.0,
) -> None:
    """Start a stopped (or failed) VM; waits until it is running unless --no-wait."""
    with _client(ctx) as c:
        vm = c.request("POST", f"/v1/vms/{name}/start")
        if wait and vm["state"] != "running":
            _follow(c, name, timeout)
        else:
            say(f"{name}: {vm['state']}")


@vm_app.command("stop")
def vm_stop(ctx: typer.Context, name: NameArg) -> None:
    """Shut a VM down (ACPI, forced off after the host's shutdown timeout); it stays off until started."""
    with _client(ctx) as c, _busy(f"{name}: stopping"):
        vm = c.request("POST", f"/v1/vms/{name}/stop")
    say(f"{name}: {vm['state']}")


@vm_app.command("reboot")
def vm_reboot(ctx: typer.Context, name: NameArg) -> None:
    """Reboot a running VM."""
    with _client(ctx) as c:
        c.request("POST", f"/v1/vms/{name}/reboot")
    say(f"{name}: rebooting")


@vm_app.command("delete")
def vm_delete(
    ctx: typer.Context,
    name: NameArg,
    purge: Annotated[bool, typer.Option("--purge", help="also delete its data disk")] = False,
) -> None:
    """Delete a VM; its data disk is kept for you (for a new VM of this name) unless --purge."""
    with _client(ctx) as c, _busy(f"{name}: deleting"):
        c.request("DELETE", f"/v1/vms/{name}", params={"purge": purge})
    say(f"deleted {name}" + (" (data disk purged)" if purge else " (a data disk, if it had one, is kept)"))


@vm_app.command("events")
def vm_events(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False) -> None:
    """What happened to a VM, oldest first, with timestamps and durations."""
    with _client(ctx) as c:
        evs: list[dict[str, Any]] = c.request("GET", "/v1/events", params={"vm": name})
    if as_json:
        emit_json(evs)
        return
    table = table_of("TIME", "EVENT", "MESSAGE", "DURATION")
    for e in evs:
        table.add_row(timestamp(e["ts"]), e["kind"], one_line(e["message"]),
                      f"{e['duration']:.1f}s" if e["duration"] else "")
    out.print(table)


@vm_app.command("hostkey")
def vm_hostkey(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False) -> None:
    """The guest's SSH host key (on stdout) and its fingerprint (on stderr), for a strict known_hosts line."""
    with _client(ctx) as c:
        hk: dict[str, str] = c.request("GET", f"/v1/vms/{name}/hostkey")
    if as_json:
        emit_json(hk)
        return
    say(hk["key"])
    err.print(f"{name}: {hk['fingerprint']}", markup=False, highlight=False)


# -- SSH through the host's API ----------------------------------------------------------------
def _ws_url(remote: remote_mod.Remote, name: str, what: str) -> str:
    """The WebSocket URL of VM ``name``'s ``what`` (ssh, console) on ``remote``."""
    return "wss://" + remote.url.removeprefix("https://") + f"/v1/vms/{name}/{what}"


@contextmanager
def _tls_failures(remote: remote_mod.Remote) -> Iterator[None]:
    """A relay or console that TLS ended (the client certificate, the host's certificate, the
    handshake): the same line as an API call's."""
    try:
        yield
    except HvError as e:
        failed = remote_mod.tls_failure(remote, e, f"remote {remote.name}: {remote.url}", closed=_closed_unanswered(e))
        if failed is None:
            raise
        raise failed from e


def _closed_unanswered(e: BaseException) -> bool:
    """Whether the host closed the relay's connection before its HTTP answer (what a refused client
    certificate looks like without the host's alert)."""
    from websockets.exceptions import ConnectionClosed, InvalidMessage

    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionClosed | InvalidMessage | ConnectionResetError | ssl.SSLEOFError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@vm_app.command("proxy")
def vm_proxy(ctx: typer.Context, name: NameArg) -> None:
    """Relay stdin and stdout to the guest's SSH port through the host's API: ssh's ProxyCommand."""
    from agent.relay_client import proxy

    remote = remote_mod.load().pick(ctx.find_root().params.get("remote"))
    check_name(name, "VM name")
    ssl_context = remote_mod.client_context(remote)
    with _tls_failures(remote):
        proxy(_ws_url(remote, name, "ssh"), remote.token, ssl_context, sys.stdin.buffer, sys.stdout.buffer)


def _ssh_options(ctx: typer.Context, name: str, running: bool = False) -> list[tuple[str, str]]:
    """ssh's options for NAME on the chosen remote: the relay as ProxyCommand, and the guest's host
    key (fetched from the API now) in hvagent's own known_hosts, checked strictly. ``running``:
    refuse a VM that is not running in one line (rather than ssh's after the relay's)."""
    chosen = ctx.find_root().params.get("remote")
    remote = remote_mod.load().pick(chosen)
    with _client(ctx) as c:
        if running:
            state = c.request("GET", f"/v1/vms/{name}")["state"]
            if state != "running":
                raise Conflict(f"vm {name}: is {state}; ssh reaches a running VM only",
                               hint=f"hvagent vm start {name}")
        hk: dict[str, str] = c.request("GET", f"/v1/vms/{name}/hostkey")
    alias = f"hvagent.{remote.name}.{name}"
    known = remote_mod.remotes_file().parent / "known_hosts"
    lines = [line for line in (known.read_text().splitlines() if known.exists() else [])
             if line.split(" ", 1)[0] != alias]
    remote_mod.write_private(known, "".join(f"{line}\n" for line in [*lines, f"{alias} {hk['key']}"]))
    exe = shlex.quote(str(Path(sys.argv[0]).resolve()))
    return [("ProxyCommand", f"{exe} --remote {shlex.quote(remote.name)} vm proxy {name}"),
            ("HostKeyAlias", alias), ("UserKnownHostsFile", str(known)), ("StrictHostKeyChecking", "yes"),
            ("User", hk["user"])]


@vm_app.command("ssh-config")
def vm_ssh_config(ctx: typer.Context, name: NameArg) -> None:
    """An ssh_config block for NAME (`ssh -F`, `scp -F`, `rsync -e 'ssh -F ...'`): the relay and the pinned key."""
    check_name(name, "VM name")
    options = _ssh_options(ctx, name)
    say("\n".join([f"Host {name}", f"  HostName {name}", *(f"  {k} {v}" for k, v in options)]))


@vm_app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_ssh(
    ctx: typer.Context,
    name: NameArg,
    identity: Annotated[Path | None, typer.Option("--identity", "-i", help="private key file for ssh")] = None,
    command: Annotated[list[str] | None, typer.Argument(help="command to run (after --)")] = None,
) -> None:
    """A shell in the guest, or a command, with the system's ssh through the host's API (host key checked)."""
    check_name(name, "VM name")
    argv = ["ssh"]
    for k, v in _ssh_options(ctx, name, running=True):
        argv += ["-o", f"{k}={v}"]
    if identity is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(identity)]
    os.execvp("ssh", [*argv, name, *(command or [])])


@vm_app.command("console")
def vm_console(
    ctx: typer.Context,
    name: NameArg,
    force: Annotated[bool, typer.Option("--force", help="take the console over from a session open elsewhere "
                                        "(that one ends)")] = False,
) -> None:
    """The guest's serial console on this terminal (raw mode: every key goes to the guest); Ctrl-] leaves."""
    from agent.relay_client import console

    remote = remote_mod.load().pick(ctx.find_root().params.get("remote"))
    check_name(name, "VM name")
    url = _ws_url(remote, name, "console") + ("?force=true" if force else "")
    ssl_context = remote_mod.client_context(remote)
    with _tls_failures(remote):
        code = console(url, remote.token, ssl_context, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    raise typer.Exit(code)
