"""``hvagent demo``: the product in one minute, on a state directory of its own."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from agent import config as config_mod
from agent.errors import InputError
from agent.health import run as ssh_run
from agent.host import Host
from agent.seed import new_ed25519
from agent.spec import parse_spec

if TYPE_CHECKING:
    from agent.cli import Ctx

DEMO_STATE = Path("/var/lib/hvagent-demo")


def run_demo(ctx: Ctx, images_dir: Path, keep: bool, out: Console, err: Console) -> None:
    state_dir = ctx.state_dir or DEMO_STATE
    cfg = config_mod.load(ctx.config, state_dir=state_dir, port_min=22800, port_max=22899)
    needed = [images_dir / f"tiny-{v}.qcow2" for v in ("1.0", "2.0")]
    newer = images_dir / "tiny-1.1.qcow2"
    for path in (*needed, newer):
        if not path.exists():
            raise InputError(f"{path}: missing; build the images first: make images")
    host = Host(cfg)
    ctx._host = host
    tenant = new_ed25519("demo-tenant")
    spec = parse_spec({"vms": [
        {"name": "demo-pinned", "owner": "demo", "image": "tiny-1.0", "ssh_keys": [tenant.public]},
        {"name": "demo-latest", "owner": "demo", "image": "tiny-1.*", "ssh_keys": [tenant.public], "data_disk": 1},
        {"name": "demo-uefi", "owner": "demo", "image": "tiny-2.*", "ssh_keys": [tenant.public]},
    ]}, "demo spec")
    try:
        with host.lock:
            host.recover()
            _rule(out, f"1. publish images into {cfg.store}")
            for path in needed:
                ref = path.stem
                if any(r.ref == ref for r in host.state.images()):
                    out.print(f"{ref}: already in the catalog")
                    continue
                row = host.catalog.publish(path)
                out.print(f"published {row.ref}: family {row.family}, firmware {row.manifest['firmware']}, "
                          f"sha256 {row.sha256[:16]}…")
            _rule(out, "2. provision three VMs: pinned 1.0, latest of family 1, latest of family 2")
            out.print(f"accelerator: {host.accelerator().value} (chosen by a probe guest)")
            for vm in spec.vms:
                if host.state.vm(vm.name) is None:
                    created = host.provisioner.create(vm, say=out.print)
                    out.print(f"{vm.name}: {vm.image} -> {created.image}-{created.version}, booting")
            for vm in spec.vms:
                host.provisioner.wait(vm.name)
                out.print(f"{vm.name}: healthy")
        show(host, out, "3. hvagent ps")
        inside(host, out, "4. inside each guest (SSH with the pinned host key)")
        with host.lock:
            _rule(out, "5. the image pipeline publishes tiny 1.1: the latest-track VM swaps, the pinned one stays")
            row = host.catalog.publish(newer)
            out.print(f"published {row.ref}")
            rollout = host.rollouts.on_publish(row)
            if rollout is not None:
                done = host.rollouts.run(rollout.id, say=lambda m: out.print(m, markup=False, highlight=False))
                out.print(f"rollout {done.id}: {done.state}")
        show(host, out, "6. hvagent ps after the rollout")
        inside(host, out, "7. inside each guest again")
    finally:
        if keep:
            out.print(f"kept: state in {cfg.state_dir}; hvagent --state-dir {cfg.state_dir} ps")
        else:
            _rule(out, "8. clean up")
            with host.lock:
                for r in host.state.vms():
                    host.provisioner.destroy(r.name, purge=True)
                    out.print(f"destroyed {r.name}")
            host.close()
            ctx._host = None
            shutil.rmtree(cfg.state_dir, ignore_errors=True)


def show(host: Host, out: Console, title: str) -> None:
    _rule(out, title)
    table = Table("NAME", "VERSION", "TRACK", "STATE", "SSH")
    for r in host.state.vms():
        table.add_row(r.name, f"{r.image}-{r.version}", r.track, r.state, f"127.0.0.1:{r.host_port}")
    out.print(table)


def inside(host: Host, out: Console, title: str) -> None:
    _rule(out, title)
    for r in host.state.vms():
        ep = host.provisioner.endpoint(r)
        res = ssh_run(ep, host.provisioner.agent_key.private,
                      ". /etc/os-release; printf '%s VERSION_ID=%s, ' \"$PRETTY_NAME\" \"$VERSION_ID\"; "
                      "tr '\\n' ' ' < /etc/hvagent-image")
        out.print(f"{r.name}: {res.stdout.strip()}", markup=False, highlight=False)


def _rule(out: Console, title: str) -> None:
    # a piped console is as wide as a listing needs (agent.output): a rule keeps a terminal's width
    out.print(Rule(title), width=min(out.width, 100))
