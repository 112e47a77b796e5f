"""The ``hvagent`` command line."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent import config as config_mod
from agent.errors import HealthError, HvError
from agent.health import run as ssh_run
from agent.host import Host
from agent.rollout import Policy, RetirePolicy, parse_duration, parse_family, parse_max_unavailable
from agent.spec import load_spec
from agent.state import RolloutState, host_lock

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hvagent: run tenants' VMs from versioned qcow2 guest OS images on libvirt.")
images_app = typer.Typer(no_args_is_help=True, help="The image catalog: publish, list, retire and collect images.")
app.add_typer(images_app, name="images")
rollout_app = typer.Typer(no_args_is_help=True, help="Rollouts: latest-track VMs moving to a family's newest version.")
app.add_typer(rollout_app, name="rollout")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@dataclass
class Ctx:
    config: Path | None = None
    state_dir: Path | None = None
    debug: bool = False
    _host: Host | None = None

    def cfg(self) -> config_mod.Config:
        return config_mod.load(self.config, state_dir=self.state_dir)

    def host(self) -> Host:
        if self._host is None:
            self._host = Host(self.cfg())
        return self._host


CTX = Ctx()


@app.callback()
def _main(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="configuration file")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="override state_dir")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    CTX.config, CTX.state_dir, CTX.debug = config, state_dir, debug


@contextmanager
def mutating() -> Iterator[Host]:
    """Mutations on one host are serialized by a lock; each first finishes any interrupted work."""
    host = CTX.host()
    with host_lock(host.cfg.state_dir):
        host.recover()
        yield host


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


# images ------------------------------------------------------------------------------------
def _say(message: str) -> None:
    out.print(message, markup=False, highlight=False)


def _run_rollout(host: Host, rid: int) -> None:
    ro = host.rollouts.run(rid, _say)
    if ro.state is RolloutState.HALTED:
        raise HealthError(f"rollout {ro.id} of {ro.family_ref}.* -> {ro.target} halted: {ro.reason}")
    _say(f"rollout {ro.id} of {ro.family_ref}.* -> {ro.target}: {ro.state}")


@images_app.command("publish")
def images_publish(
    file: Annotated[Path, typer.Argument(help="qcow2 image file")],
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="default: FILE with .yaml")] = None,
    policy: Annotated[Policy | None, typer.Option(help="rollout policy for this publish; default from config")] = None,
) -> None:
    """Check a qcow2 image (hostile until proven otherwise), add it to the catalog, roll it out."""
    with mutating() as host:
        with Progress(TextColumn("publish"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=err,
                      transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("copy", total=None)
            row = host.catalog.publish(file, manifest, progress=lambda d, t: bar.update(task, completed=d, total=t))
        out.print(f"published {row.ref} (family {row.family}, sha256 {row.sha256[:16]}…) -> {row.path}")
        ro = host.rollouts.on_publish(row, policy)
        if ro is not None:
            _run_rollout(host, ro.id)
        host.rollouts.enforce_retirements(_say)


@images_app.command("retire")
def images_retire(
    ref: Annotated[str, typer.Argument(help="image version, e.g. tiny-1.18")],
    grace: Annotated[str, typer.Option(help="time pinned VMs keep it: 0, 30m, 12h, 14d")] = "14d",
    policy: Annotated[RetirePolicy, typer.Option(help="move: pinned VMs move after the grace; never: they stay")]
    = RetirePolicy.MOVE,
) -> None:
    """No new VM may pin REF; VMs pinned to it are warned, then moved within their family."""
    seconds = parse_duration(grace)
    with mutating() as host:
        r = host.rollouts.retire(ref, seconds, policy, _say)
    out.print(f"retired {ref}: grace until {_ts(r.grace_until)}, policy {r.policy}")


@images_app.command("gc")
def images_gc(keep: Annotated[int | None, typer.Option(min=1, help="newest versions kept per family")] = None) -> None:
    """Remove base images no VM uses that are not among the newest of their family."""
    with mutating() as host:
        removed = host.rollouts.gc(keep)
    out.print(f"removed {', '.join(removed)}" if removed else "nothing to remove")


@images_app.command("list")
def images_list(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Images in the catalog: family, version, sha256, state and how many VMs use each."""
    entries = CTX.host().catalog.entries()
    if as_json:
        _emit_json([{"name": e.row.name, "family": e.row.family, "version": e.row.version, "state": e.row.state,
                     "sha256": e.row.sha256, "virtual_size": e.row.virtual_size, "vms": e.vms,
                     "firmware": e.row.manifest.get("firmware"), "path": e.row.path,
                     "published_at": _ts(e.row.published_at)} for e in entries])
        return
    table = Table("IMAGE", "FAMILY", "VERSION", "STATE", "FIRMWARE", "SHA256", "VMS")
    for e in entries:
        table.add_row(e.row.name, str(e.row.family), e.row.version, e.row.state, str(e.row.manifest.get("firmware")),
                      e.row.sha256[:12], str(e.vms))
    out.print(table)


def _describe(bar: Progress, task: TaskID, message: str) -> None:
    bar.update(task, description=message)


# VMs ---------------------------------------------------------------------------------------
@app.command()
def apply(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="YAML file of VMs")],
    wait: Annotated[bool, typer.Option(help="wait until each new VM is healthy")] = True,
) -> None:
    """Converge this host to SPEC: create the VMs it lacks and wait until they are healthy."""
    spec = load_spec(spec_file)
    with mutating() as host:
        created: list[str] = []
        for vm in spec.vms:
            existing = host.state.vm(vm.name)
            if existing is not None:
                if existing.owner != vm.owner:
                    raise HvError(f"{spec_file}: vms: {vm.name}: owned by another owner")
                if existing.spec_hash != vm.digest():
                    err.print(f"[yellow]{vm.name}: spec changed; changes to an existing VM are not applied "
                              "yet (destroy it and apply again)[/]")
                continue
            # Resolve every track before creating anything, so a bad track changes nothing.
            host.catalog.resolve_for_new_vm(vm.track, vm.name)
        host.provisioner.check_capacity([vm for vm in spec.vms if host.state.vm(vm.name) is None])
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      disable=not err.is_terminal) as bar:
            for vm in spec.vms:
                if host.state.vm(vm.name) is not None:
                    continue
                task = bar.add_task(f"{vm.name}: provisioning", total=None)
                host.provisioner.create(vm, say=partial(_describe, bar, task))
                bar.update(task, description=f"{vm.name}: booting")
                created.append(vm.name)
            failures: list[str] = []
            if wait:
                for name in created:
                    task = bar.add_task(f"{name}: waiting for health", total=None)
                    try:
                        host.provisioner.wait(name)
                        bar.update(task, description=f"{name}: healthy", completed=1, total=1)
                    except HealthError as e:
                        failures.append(f"{name}: {e.message}")
                        bar.update(task, description=f"{name}: failed", completed=1, total=1)
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
        _emit_json(items)
        return
    table = Table("NAME", "OWNER", "VERSION", "TRACK", "STATE", "DOMAIN", "SSH", "NOTE")
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
        r = ssh_run(ep, host.provisioner.agent_key.private, " ".join(command), timeout=300)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
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
    with mutating() as host:
        host.provisioner.destroy(name, purge=purge)
    out.print(f"destroyed {name}" + (" (data disk purged)" if purge else " (data disk kept)"))


@app.command()
def events(
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """What happened on this host, oldest first."""
    evs = CTX.host().state.events(vm)
    if as_json:
        _emit_json([{"ts": _ts(e.ts), "vm": e.vm, "kind": e.kind, "message": e.message, "duration": e.duration}
                    for e in evs])
        return
    table = Table("TIME", "VM", "EVENT", "MESSAGE", "DURATION")
    for e in evs:
        table.add_row(_ts(e.ts), e.vm or "-", e.kind, e.message, f"{e.duration:.1f}s" if e.duration else "")
    out.print(table)


# rollouts -----------------------------------------------------------------------------------
@rollout_app.command("start")
def rollout_start(
    family: Annotated[str, typer.Argument(help="family, e.g. tiny-1")],
    max_unavailable: Annotated[str | None, typer.Option(help="VMs at once: a count (3) or a percentage (25%)")]
    = None,
) -> None:
    """Move every VM on FAMILY's latest track to its newest usable version, batch by batch."""
    name, major = parse_family(family)
    if max_unavailable is not None:
        parse_max_unavailable(max_unavailable, "--max-unavailable")
    with mutating() as host:
        ro = host.rollouts.start(name, major, max_unavailable)
        if ro is None:
            out.print(f"nothing to do: every VM on {name}-{major}.* runs its newest version")
            return
        _run_rollout(host, ro.id)


@rollout_app.command("resume")
def rollout_resume(family: Annotated[str | None, typer.Argument(help="family; default: the paused one")] = None) \
        -> None:
    """Continue a paused rollout (in this process)."""
    with mutating() as host:
        ro = host.rollouts.resume(family)
        _run_rollout(host, ro.id)


@rollout_app.command("pause")
def rollout_pause(family: Annotated[str | None, typer.Argument(help="family; default: the active one")] = None) \
        -> None:
    """Stop a rollout after its current batch; `rollout resume` continues it."""
    ro = CTX.host().rollouts.pause(family)  # no host lock: the running rollout holds it
    out.print(f"rollout {ro.id} ({ro.family_ref}.* -> {ro.target}) pauses after its current batch")


@rollout_app.command("abort")
def rollout_abort(family: Annotated[str | None, typer.Argument(help="family; default: the active one")] = None) \
        -> None:
    """End a rollout: the current batch finishes (swap or rollback), no other VM moves."""
    ro = CTX.host().rollouts.abort(family)
    out.print(f"rollout {ro.id} ({ro.family_ref}.* -> {ro.target}) aborted; its current batch finishes")


def _rollout_view(host: Host, only_active: bool) -> tuple[list[dict[str, Any]], Table]:
    rows = host.state.rollouts(active_only=only_active)
    data: list[dict[str, Any]] = []
    table = Table("ROLLOUT", "FAMILY", "TARGET", "STATE", "VM", "BATCH", "FROM", "STEP", "DOWNTIME", "REASON")
    for ro in rows:
        steps = host.state.steps(ro.id)
        data.append({"id": ro.id, "family": f"{ro.family_ref}", "target": ro.target, "state": ro.state,
                     "max_unavailable": ro.max_unavailable, "reason": ro.reason, "created_at": _ts(ro.created_at),
                     "vms": [{"vm": s.vm, "batch": s.batch + 1, "from": s.from_version, "state": s.state,
                              "downtime": s.downtime, "reason": s.reason} for s in steps]})
        for i, s in enumerate(steps):
            head = (str(ro.id), f"{ro.family_ref}.*", ro.target, str(ro.state)) if i == 0 else ("", "", "", "")
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
        _emit_json(_rollout_view(host, not all_)[0])
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
        err.print(f"hvagent: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    finally:
        if CTX._host is not None:
            CTX._host.close()
