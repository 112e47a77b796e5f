"""The ``hvagent`` command line."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent import config as config_mod
from agent.catalog import default_manifest_path
from agent.cli_remote import remote_app, vm_app
from agent.errors import EnvError, HealthError, HvError, InputError, NotFound, one_line
from agent.health import run as ssh_run
from agent.host import Host
from agent.manifest import Kind, kind_of, load_any_manifest
from agent.output import emit_json, err, out, say, table_of, timestamp

if TYPE_CHECKING:
    from agent.client import Client
from agent.rollout import Policy, RetirePolicy, parse_duration, parse_family, parse_max_unavailable
from agent.spec import load_spec
from agent.state import RolloutState

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hvagent: run tenants' VMs from versioned qcow2 guest OS images on libvirt.")
images_app = typer.Typer(no_args_is_help=True, help="The image catalog: publish, list, retire and collect images.")
app.add_typer(images_app, name="images")
rollout_app = typer.Typer(no_args_is_help=True, help="Rollouts: latest-track VMs moving to a family's newest version.")
app.add_typer(rollout_app, name="rollout")

app.add_typer(remote_app, name="remote")  # agent.cli_remote: a tenant's commands, against a remote host
app.add_typer(vm_app, name="vm")


@dataclass
class Ctx:
    config: Path | None = None
    state_dir: Path | None = None
    debug: bool = False
    _host: Host | None = None
    _client: Client | None = None
    _probed: bool = False

    def cfg(self) -> config_mod.Config:
        return config_mod.load(self.config, state_dir=self.state_dir)

    def host(self) -> Host:
        if self._host is None:
            self._host = Host(self.cfg())
        return self._host

    def client(self) -> Client | None:
        """The running daemon, if one answers on this host's socket; mutations then go through it."""
        if not self._probed:
            from agent.client import Client  # httpx loads only in the CLI, never in the daemon

            self._client = Client.detect(self.cfg())
            self._probed = True
        return self._client


CTX = Ctx()


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="configuration file")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="override state_dir")] = None,
    remote: Annotated[str | None, typer.Option("--remote", metavar="NAME", help="the remote host `hvagent vm` "
                                               "drives; default $HVAGENT_REMOTE, else the default remote")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    CTX.config, CTX.state_dir, CTX.debug = config, state_dir, debug
    if remote is not None and ctx.invoked_subcommand != "vm":  # cli_remote reads it from this context
        raise InputError(f"--remote: only `hvagent vm ...` talks to a remote, not `hvagent {ctx.invoked_subcommand}`")


@contextmanager
def mutating() -> Iterator[Host]:
    """Mutations on one host are serialized by a lock; each first finishes any interrupted work."""
    host = CTX.host()
    with host.lock:
        host.recover()
        host.state.prune_events(host.cfg.events_keep_days * 86400, host.cfg.events_keep_max)
        yield host


# images ------------------------------------------------------------------------------------
def _run_rollout(host: Host, rid: int) -> None:
    ro = host.rollouts.run(rid, say)
    _ended(ro.id, f"{ro.family_ref}.* -> {ro.target}", ro.state.value, ro.reason)
    say(f"rollout {ro.id} of {ro.family_ref}.* -> {ro.target}: {ro.state}" + (f" ({ro.reason})" if ro.reason else ""))


@images_app.command("publish")
def images_publish(
    file: Annotated[Path, typer.Argument(help="qcow2 image, installer ISO, or netboot bundle (DIR or DIR.yaml)")],
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="default: FILE with .yaml")] = None,
    policy: Annotated[Policy | None, typer.Option(help="rollout policy for this publish; default from config")] = None,
) -> None:
    """Check a qcow2 image or installer media (hostile until proven otherwise), add it to the catalog, roll it out."""
    man = manifest or default_manifest_path(file)
    # A netboot bundle is a directory, which no upload carries: it is published here, under the host lock.
    netboot = man.is_file() and load_any_manifest(man).kind is Kind.NETBOOT
    if (c := CTX.client()) is not None and not netboot:
        for f in (file, man):
            if not f.is_file():
                raise InputError(f"{f}: no such file")
        with file.open("rb") as img, man.open("rb") as mf:  # the daemon reads the manifest first
            r = c.request("POST", "/v1/images", files=[("manifest", (man.name, mf)), ("image", (file.name, img))],
                          params={"policy": policy.value} if policy else None)
        out.print(f"published {r['image']['name']}-{r['image']['version']} through the daemon "
                  f"(sha256 {r['image']['sha256'][:16]}…)")
        if r["rollout"] is not None:
            _follow_rollout(c, int(r["rollout"]))
        return
    with mutating() as host:
        with Progress(TextColumn("publish"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=err,
                      transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("copy", total=None)
            policy = host.rollouts.policy(policy)
            row = host.catalog.publish(file, manifest, progress=lambda d, t: bar.update(task, completed=d, total=t),
                                       rollout=policy)
        out.print(f"published {row.ref} ({kind_of(row.manifest)}, family {row.family}, sha256 {row.sha256[:16]}…) "
                  f"-> {row.path}")
        ro = host.rollouts.on_publish(row, policy)
        if ro is not None:
            _run_rollout(host, ro.id)
        host.rollouts.enforce_retirements(say)


@images_app.command("retire")
def images_retire(
    ref: Annotated[str, typer.Argument(help="image version, e.g. tiny-1.18")],
    grace: Annotated[str, typer.Option(help="time pinned VMs keep it: 0, 30m, 12h, 14d")] = "14d",
    policy: Annotated[RetirePolicy, typer.Option(help="move: pinned VMs move after the grace; never: they stay")]
    = RetirePolicy.MOVE,
) -> None:
    """No new VM may pin REF; VMs pinned to it are warned, then moved within their family."""
    seconds = parse_duration(grace)
    if (c := CTX.client()) is not None:
        r = c.request("POST", f"/v1/images/{ref}/retire", json={"grace": grace, "policy": policy.value})
        out.print(f"retired {ref}: grace until {timestamp(r['grace_until'])}, policy {r['policy']}")
        return
    with mutating() as host:
        r = host.rollouts.retire(ref, seconds, policy, say)
    out.print(f"retired {ref}: grace until {timestamp(r.grace_until)}, policy {r.policy}")


@images_app.command("gc")
def images_gc(keep: Annotated[int | None, typer.Option(min=1, help="newest versions kept per family")] = None) -> None:
    """Remove base images no VM uses that are not among the newest of their family."""
    if (c := CTX.client()) is not None:
        removed = c.request("POST", "/v1/images/gc", json={"keep": keep})["removed"]
    else:
        with mutating() as host:
            removed = host.rollouts.gc(keep)
    out.print(f"removed {', '.join(removed)}" if removed else "nothing to remove")


@images_app.command("list")
def images_list(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Images in the catalog: kind, family, version, sha256, state and how many VMs use each."""
    entries = CTX.host().catalog.entries()
    if as_json:
        emit_json([{"name": e.row.name, "kind": kind_of(e.row.manifest), "family": e.row.family,
                     "version": e.row.version, "state": e.row.state,
                     "sha256": e.row.sha256, "virtual_size": e.row.virtual_size, "vms": e.vms,
                     "firmware": e.row.manifest.get("firmware"), "path": e.row.path,
                     "published_at": timestamp(e.row.published_at)} for e in entries])
        return
    table = table_of("IMAGE", "KIND", "FAMILY", "VERSION", "STATE", "FIRMWARE", "SHA256", "VMS")
    for e in entries:
        firmware = e.row.manifest.get("firmware")
        shown = ",".join(firmware) if isinstance(firmware, list) else str(firmware)
        table.add_row(e.row.name, kind_of(e.row.manifest), str(e.row.family), e.row.version, e.row.state, shown,
                      e.row.sha256[:12], str(e.vms))
    out.print(table)


def _ended(rid: int, what: str, state: str, reason: str | None) -> None:
    """A rollout that halted (an image fault) or paused for a host fault is an error (exit 1)."""
    if state == "halted":
        raise HealthError(f"rollout {rid} of {what} halted: {reason}")
    if state == "paused" and (reason or "").startswith("host fault"):
        raise EnvError(f"rollout {rid} of {what} paused: {reason}",
                       hint=f"fix the host, then: hvagent rollout resume {what.split('.*')[0]}")


def _follow_rollout(c: Client, rid: int) -> None:
    """Show a daemon-run rollout until it ends; a halt is an error, as when run here."""
    def step(s: dict[str, Any]) -> None:
        say(f"{s['vm']}: " + (f"on the target, downtime {s['downtime']:.1f}s" if s["state"] == "done"
                                else f"{s['state']}: {s['reason'] or ''}"))

    say(f"rollout {rid} runs in the daemon; following it (Ctrl-C stops following, not the rollout)")
    ro = c.wait_rollout(rid, step)
    _ended(rid, f"{ro['family']}.* -> {ro['target']}", ro["state"], ro["reason"])
    say(f"rollout {rid} of {ro['family']}.* -> {ro['target']}: {ro['state']}")


def _active_family(c: Client, family: str | None) -> str:
    if family is not None:
        return family
    active = c.request("GET", "/v1/rollouts")
    if not active:
        raise NotFound("rollout: none in progress")
    return str(active[0]["family"])


# VMs ---------------------------------------------------------------------------------------
@app.command()
def apply(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="YAML file of VMs")],
    wait: Annotated[bool, typer.Option(help="wait until each new VM is healthy")] = True,
) -> None:
    """Converge this host to SPEC: create the VMs it lacks and wait until they are healthy."""
    spec = load_spec(spec_file)
    failures: list[str] = []
    if (c := CTX.client()) is not None:
        r = c.request("POST", "/v1/apply", json=spec.model_dump(mode="json"), params={"source": str(spec_file)})
        created = list(r["created"])
        for note in r["notes"]:
            err.print(f"[yellow]{note}[/]")
        for name in created if wait else []:
            vm = c.wait_vm(name, max(v.health.timeout for v in spec.vms) + 60)
            if vm["state"] != "running":
                failures.append(f"{name}: {vm['reason'] or vm['state']}")
    else:
        with mutating() as host, Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                          console=err, disable=not err.is_terminal) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(name: str, message: str) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(f"{name}: provisioning", total=None)
                bar.update(tasks[name], description=f"{name}: {message}")

            created = host.apply(spec, str(spec_file), progress, notes=lambda m: err.print(f"[yellow]{m}[/]"))
            for name in created if wait else []:
                progress(name, "waiting for health")
                try:
                    with host.lock.released():  # the guest decides how long: others need not wait
                        host.provisioner.wait(name)
                    progress(name, "healthy")
                except HealthError as e:
                    failures.append(f"{name}: {e.message}")
                    progress(name, "failed")
    if not created:
        out.print("nothing to do: the host already matches the spec")
    else:
        out.print(f"created {len(created)} VM(s): {', '.join(created)}")
    if failures:
        raise HealthError("; ".join(failures))


@app.command()
def ps(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """VMs on this host: name, owner, version, track, state and SSH endpoint."""
    host = CTX.host()
    rows = host.state.vms()
    live = host.virt.managed_states() if rows else {}
    warnings = host.rollouts.warnings()
    items = []
    for r in rows:
        endpoint = f"127.0.0.1:{r.host_port}" if r.host_port else "network"
        items.append({"name": r.name, "owner": r.owner, "image": r.image, "version": r.version, "track": r.track,
                      "state": r.state, "domain": live.get(r.name, "missing"), "ssh": endpoint, "reason": r.reason,
                      "warning": warnings.get(r.name)})
    if as_json:
        emit_json(items)
        return
    table = table_of("NAME", "OWNER", "VERSION", "TRACK", "STATE", "DOMAIN", "SSH", "NOTE")
    for i in items:
        note = f"[yellow]warning: {i['warning']}[/]" if i["warning"] else (i["reason"] or "")
        table.add_row(i["name"], i["owner"], f"{i['image']}-{i['version']}", i["track"], i["state"], i["domain"],
                      i["ssh"], note)
    out.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(
    name: Annotated[str, typer.Argument(help="VM name")],
    command: Annotated[list[str] | None, typer.Argument(help="command to run (after --)")] = None,
) -> None:
    """Open a shell in a guest, or run a command, checking the VM's pinned host key."""
    host = CTX.host()
    row = host.provisioner.row(name)
    ep = host.provisioner.endpoint(row)
    if command:
        import paramiko  # loaded by ssh_run anyway; the daemon never imports it for nothing

        def to(stream: BinaryIO) -> Callable[[bytes], None]:
            def write(data: bytes) -> None:
                stream.write(data)
                stream.flush()
            return write

        sys.stdout.flush()
        sys.stderr.flush()
        try:  # streamed as it comes, however much: the user asked for this guest's output
            r = ssh_run(ep, host.provisioner.agent_key.private, " ".join(command), timeout=300,
                        stdout=to(sys.stdout.buffer), stderr=to(sys.stderr.buffer))
        except (paramiko.SSHException, TimeoutError, OSError, EOFError) as e:
            raise EnvError(f"vm {name}: ssh {ep.host}:{ep.port}: {e.__class__.__name__}: {e}") from e
        raise typer.Exit(r.status)
    with tempfile.NamedTemporaryFile("w", suffix=".known_hosts", delete=False) as kh:
        kh.write(f"[{ep.host}]:{ep.port} {ep.host_key}\n")
    os.execvp("ssh", ["ssh", "-o", f"UserKnownHostsFile={kh.name}", "-o", "StrictHostKeyChecking=yes",
                      "-o", "IdentitiesOnly=yes", "-i", str(host.cfg.agent_key), "-p", str(ep.port),
                      f"{ep.user}@{ep.host}"])


@app.command()
def destroy(
    name: Annotated[str, typer.Argument(help="VM name")],
    purge: Annotated[bool, typer.Option("--purge", help="also delete the data disk")] = False,
) -> None:
    """Remove a VM's domain, overlay and seed; its data disk is kept unless --purge."""
    if (c := CTX.client()) is not None:
        c.request("DELETE", f"/v1/vms/{name}", params={"purge": purge})
    else:
        with mutating() as host:
            host.provisioner.destroy(name, purge=purge)
    out.print(f"destroyed {name}" + (" (data disk purged)" if purge else " (data disk kept)"))


@app.command()
def events(
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM name")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="only this owner's VMs and disks")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """What happened on this host, oldest first (each VM's events carry its owner and UUID)."""
    evs = CTX.host().state.events(vm, owner=owner)
    if as_json:
        emit_json([{"ts": timestamp(e.ts), "vm": e.vm, "owner": e.owner, "uuid": e.vm_uuid, "kind": e.kind,
                     "message": e.message, "duration": e.duration} for e in evs])
        return
    table = table_of("TIME", "VM", "OWNER", "EVENT", "MESSAGE", "DURATION")
    for e in evs:
        table.add_row(timestamp(e.ts), e.vm or "-", e.owner or "-", e.kind, e.message,
                      f"{e.duration:.1f}s" if e.duration else "")
    out.print(table)


disks_app = typer.Typer(help="Data disks: attached to a VM, or kept for their owner after it was destroyed.",
                        invoke_without_command=True)
app.add_typer(disks_app, name="disks")


@disks_app.callback()
def disks_list(
    ctx: typer.Context,
    owner: Annotated[str | None, typer.Option("--owner", help="only this owner's disks")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List data disks (a kept disk is attached again only to a new VM of the same name and owner)."""
    if ctx.invoked_subcommand is not None:
        return
    host = CTX.host()
    vms = {r.uuid: r.name for r in host.state.vms()}
    items: list[dict[str, Any]] = [
        {"name": d.name, "owner": d.owner, "size_gib": d.size_gib, "vm": vms.get(d.vm_uuid or ""),
         "state": d.state, "created_at": timestamp(d.created_at)}
        for d in host.state.disks(owner)]
    if as_json:
        emit_json(items)
        return
    table = table_of("NAME", "OWNER", "SIZE", "STATE", "VM", "CREATED")
    for i in items:
        table.add_row(i["name"], i["owner"], f"{i['size_gib']} GiB", i["state"], i["vm"] or "-", i["created_at"])
    out.print(table)


@disks_app.command("purge")
def disks_purge(
    name: Annotated[str, typer.Argument(help="disk name (the name of the VM it belonged to)")],
    owner: Annotated[str | None, typer.Option("--owner", help="whose disk; needed when several owners have one")]
    = None,
) -> None:
    """Delete a kept data disk and what it holds; a disk attached to a VM is refused."""
    if (c := CTX.client()) is not None:
        r = c.request("DELETE", f"/v1/disks/{name}", params={"owner": owner} if owner else None)
        whose = r["owner"]
    else:
        with mutating() as host:
            if owner is None:
                owners = [d.owner for d in host.state.disks() if d.name == name]
                if len(owners) > 1:
                    raise InputError(f"--owner: disks named {name} belong to {', '.join(owners)}; name the owner")
                owner = owners[0] if owners else "-"
            whose = host.provisioner.purge_disk(owner, name).owner
    out.print(f"purged disk {name} of {whose}", markup=False, highlight=False)


# rollouts -----------------------------------------------------------------------------------
@rollout_app.command("start")
def rollout_start(
    family: Annotated[str, typer.Argument(help="family, e.g. tiny-1")],
    max_unavailable: Annotated[str | None, typer.Option(help="VMs at once: a count (3) or a percentage (25%)")]
    = None,
    canary: Annotated[bool | None, typer.Option("--canary/--no-canary", help="boot the version on a throwaway "
                                                "VM before the first batch; default: the configuration's canary")]
    = None,
    now: Annotated[bool, typer.Option("--now", help="swap outside the VMs' maintenance windows too")] = False,
) -> None:
    """Move every VM on FAMILY's latest track to its newest usable version, batch by batch."""
    name, major = parse_family(family)
    if max_unavailable is not None:
        parse_max_unavailable(max_unavailable, "--max-unavailable")
    if (c := CTX.client()) is not None:
        r = c.request("POST", "/v1/rollouts", json={"family": family, "max_unavailable": max_unavailable,
                                                    "canary": canary, "now": now})
        if r["rollout"] is None:
            out.print(f"nothing to do: every VM on {name}-{major}.* runs its newest version")
            return
        _follow_rollout(c, int(r["rollout"]["id"]))
        return
    with mutating() as host:
        ro = host.rollouts.start(name, major, max_unavailable, canary, now)
        if ro is None:
            out.print(f"nothing to do: every VM on {name}-{major}.* runs its newest version")
            return
        _run_rollout(host, ro.id)


@rollout_app.command("resume")
def rollout_resume(family: Annotated[str | None, typer.Argument(help="family; default: the paused one")] = None) \
        -> None:
    """Continue a paused rollout (in the daemon if one runs, else in this process)."""
    if (c := CTX.client()) is not None:
        ro = c.request("POST", f"/v1/rollouts/{_active_family(c, family)}/resume")["rollout"]
        _follow_rollout(c, int(ro["id"]))
        return
    with mutating() as host:
        ro = host.rollouts.resume(family)
        _run_rollout(host, ro.id)


@rollout_app.command("pause")
def rollout_pause(family: Annotated[str | None, typer.Argument(help="family; default: the active one")] = None) \
        -> None:
    """Stop a rollout after its current batch; `rollout resume` continues it."""
    if (c := CTX.client()) is not None:
        r = c.request("POST", f"/v1/rollouts/{_active_family(c, family)}/pause")["rollout"]
        out.print(f"rollout {r['id']} ({r['family']}.* -> {r['target']}) pauses after its current batch")
        return
    ro = CTX.host().rollouts.pause(family)  # no host lock: the running rollout holds it
    out.print(f"rollout {ro.id} ({ro.family_ref}.* -> {ro.target}) pauses after its current batch")


@rollout_app.command("abort")
def rollout_abort(family: Annotated[str | None, typer.Argument(help="family; default: the active one")] = None) \
        -> None:
    """End a rollout: the current batch finishes (swap or rollback), no other VM moves."""
    if (c := CTX.client()) is not None:
        r = c.request("POST", f"/v1/rollouts/{_active_family(c, family)}/abort")["rollout"]
        out.print(f"rollout {r['id']} ({r['family']}.* -> {r['target']}) aborted; its current batch finishes")
        return
    ro = CTX.host().rollouts.abort(family)
    out.print(f"rollout {ro.id} ({ro.family_ref}.* -> {ro.target}) aborted; its current batch finishes")


def _rollout_view(host: Host, only_active: bool) -> tuple[list[dict[str, Any]], Table]:
    rows = host.state.rollouts(active_only=only_active)
    data: list[dict[str, Any]] = []
    table = table_of("ROLLOUT", "FAMILY", "TARGET", "STATE", "VM", "BATCH", "FROM", "STEP", "DOWNTIME", "REASON")
    for ro in rows:
        steps = host.state.steps(ro.id)
        data.append({"id": ro.id, "family": f"{ro.family_ref}", "target": ro.target, "state": ro.state,
                     "canary": ro.canary,
                     "max_unavailable": ro.max_unavailable, "reason": ro.reason, "created_at": timestamp(ro.created_at),
                     "vms": [{"vm": s.vm, "batch": s.batch + 1, "from": s.from_version, "state": s.state,
                              "downtime": s.downtime, "reason": s.reason} for s in steps]})
        # the canary's row first: a throwaway VM that boots the version before any tenant's goes down
        head = (str(ro.id), f"{ro.family_ref}.*", ro.target, str(ro.state))
        if ro.canary != "off":
            table.add_row(*head, "(canary)", "0", "-", ro.canary, "", "")
            head = ("", "", "", "")
        for i, s in enumerate(steps):
            head = head if i == 0 else ("", "", "", "")
            table.add_row(*head, s.vm, str(s.batch + 1), s.from_version, str(s.state),
                          f"{s.downtime:.1f}s" if s.downtime else "", s.reason or (ro.reason if i == 0 else "") or "")
    return data, table


@rollout_app.command("status")
def rollout_status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="live display until no rollout is active")] = False,
    all_: Annotated[bool, typer.Option("--all", help="finished rollouts too")] = False,
) -> None:
    """Each rollout's VMs: batch, version they came from, step state, downtime."""
    host = CTX.host()
    if as_json:
        emit_json(_rollout_view(host, not all_)[0])
        return
    if not watch:
        out.print(_rollout_view(host, not all_)[1])
        return
    from rich.live import Live

    with Live(_rollout_view(host, False)[1], console=out, refresh_per_second=2) as live:
        while True:
            time.sleep(1)
            live.update(_rollout_view(host, False)[1])
            if not host.state.rollouts(active_only=True):
                break


@app.command()
def recover() -> None:
    """Finish or undo work a crash interrupted (journal), then finish interrupted rollouts."""
    with mutating() as host:  # recovers the journal
        for ro in host.state.rollouts(active_only=True):
            if ro.state is RolloutState.RUNNING:
                done = host.rollouts.run(ro.id, say)
                say(f"rollout {done.id} of {done.family_ref}.* -> {done.target}: {done.state}"
                     + (f" ({done.reason})" if done.reason else ""))
    out.print("recovered: no interrupted operation left")


@app.command()
def serve() -> None:
    """Run the daemon: API, reconcile loop, lifecycle events, rollouts, publish inbox (systemd: Type=notify)."""
    from agent.daemon import Daemon

    cfg = CTX.cfg()
    raise typer.Exit(Daemon(cfg).serve())


config_app = typer.Typer(no_args_is_help=True, help="The configuration file.")
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(as_json: Annotated[bool, typer.Option("--json", help="print the settings in effect")] = False,
                 ) -> None:
    """Load and validate the configuration (exit 2 naming the bad field); used before a file is replaced."""
    cfg = CTX.cfg()
    if cfg.api.tls is not None:
        from agent.tls import server_context

        server_context(cfg.api.tls)  # the files are there, readable, and a certificate and its key
    if as_json:
        emit_json(cfg.model_dump(mode="json", exclude={"api": {"tokens"}}))
        return
    source = config_mod.config_file(CTX.config)
    out.print(f"{source}: ok" if source else "no configuration file: the defaults are in effect",
              markup=False, highlight=False)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Whether the daemon answers on its socket, and what it reports of this host; exit 1 if it does not."""
    c = CTX.client()
    if c is None:
        raise EnvError(f"hvagent daemon: not answering on {CTX.cfg().api.socket}")
    facts = c.request("GET", "/v1/host")
    if as_json:
        emit_json({"daemon": "running", **facts})
        return
    out.print(f"daemon running (hvagent {facts['version']}, accelerator {facts['accelerator']}) on {c.where}",
              markup=False, highlight=False)


host_app = typer.Typer(no_args_is_help=True, help="This host: what it offers guests.")
app.add_typer(host_app, name="host")


@host_app.command("compat")
def host_compat(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """The guest OS compatibility list: each image in the catalog, whether it runs here and why not."""
    c = CTX.client()
    report: dict[str, Any] = c.request("GET", "/v1/host")["compat"] if c is not None else CTX.host().catalog.compat()
    if as_json:
        emit_json(report)
        return
    h = report["host"]
    fw = h["firmware"]
    say(f"QEMU {h['qemu']} ({h['virttype']}), machine {h['machine']['asked']}: "
        f"{h['machine']['canonical'] or 'not offered'}" + (f" ({h['error']})" if h.get("error") else ""))
    say("firmware: bios" + (f", uefi ({fw['loader']}, NVRAM template {fw['nvram_template']})" if fw["uefi"] else
                            ", no uefi") + f"; loaders libvirt lists: {', '.join(fw['loaders']) or 'none'}")
    say(f"devices: {', '.join(h['devices']) or 'none'}")
    table = table_of("IMAGE", "STATE", "KIND", "FIRMWARE", "RUNS HERE", "WHY NOT")
    for i in report["images"]:
        table.add_row(i["image"], i["state"], i["kind"], str(i["firmware"]), "yes" if i["runs"] else "no",
                      "; ".join(i["why_not"]))
    out.print(table)


token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
app.add_typer(token_app, name="token")


@token_app.command("new")
def token_new(
    name: Annotated[str, typer.Argument(help="principal: an operator, a pipeline or a tenant (owner name)")],
    role: Annotated[config_mod.Role, typer.Option(help="admin or tenant")] = config_mod.Role.TENANT,
) -> None:
    """Print a new random token (give it to its holder) and the configuration entry (only its hash)."""
    import secrets

    from agent.daemon import token_hash

    try:
        config_mod.Token(name=name, role=role, sha256="0" * 64)
    except ValidationError as e:
        raise InputError(f"name: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from e
    token = secrets.token_urlsafe(32)
    err.print("token (shown once; hvagent keeps only its sha256):", markup=False)
    sys.stdout.write(f"{token}\n")
    err.print("configuration entry, under api.tokens:", markup=False)
    err.print(f"  - {{name: {name}, role: {role.value}, sha256: {token_hash(token)}}}", markup=False,
              highlight=False)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="leave the demo VMs running")] = False,
    images_dir: Annotated[Path, typer.Option(help="where `make images` put the images")] = Path("images/cache/out"),
) -> None:
    """Publish tiny 1.0 and 2.0, run three VMs, then publish 1.1 and watch the latest-track VM swap."""
    from agent.demo import run_demo

    run_demo(CTX, images_dir, keep, out, err)


def main() -> None:
    try:
        app()  # standalone: usage errors print themselves and exit 2
    except HvError as e:
        if CTX.debug:
            raise
        err.print(f"hvagent: error: {one_line(str(e))}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    finally:
        if CTX._host is not None:
            CTX._host.close()
