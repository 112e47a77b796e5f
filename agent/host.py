"""Wiring: one object that holds this host's configuration, state, catalog, libvirt and provisioner."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.canary import Canary
from agent.catalog import Catalog, LibvirtCaps
from agent.config import Accel, Config
from agent.domxml import DomainType
from agent.errors import Conflict, EnvError
from agent.provision import Provisioner
from agent.rollout import Rollouts
from agent.spec import Spec, VmSpec
from agent.state import HostLock, State
from agent.swap import Swapper
from agent.virt import Virt


class Host:
    def __init__(self, cfg: Config, libvirt_attempts: int = 5) -> None:
        """``libvirt_attempts``: connection retries per call (0.25 s doubling to 4 s between them);
        the CLI fails fast, the daemon waits out a libvirtd restart."""
        self.cfg = cfg
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cfg.state_dir, 0o711)  # QEMU (unprivileged) must traverse to its disks
            # a file of its own per probe: the daemon's threads each build a Host, at once
            with tempfile.TemporaryFile(dir=cfg.state_dir):
                pass
        except OSError as e:
            raise EnvError(f"{cfg.state_dir}: state directory is not writable ({e.strerror})",
                           hint="run as root or set state_dir in the configuration") from e
        self.state = State(cfg.db_path)
        self.lock = HostLock(cfg.state_dir)  # this thread's hold of the host lock
        self.catalog = Catalog(cfg, self.state, LibvirtCaps(cfg))
        self.virt = Virt(cfg.libvirt_uri, attempts=libvirt_attempts)
        self.provisioner = Provisioner(cfg, self.state, self.catalog, self.virt, self.accelerator)
        self.swapper = Swapper(cfg, self.state, self.catalog, self.virt, self.provisioner, self.accelerator,
                               self.lock)
        self.canary = Canary(cfg, self.state, self.catalog, self.virt, self.provisioner, self.accelerator, self.lock)
        self.rollouts = Rollouts(cfg, self.state, self.catalog, self.swapper, self.canary)
        self._accel: DomainType | None = None

    def apply(self, spec: Spec, source: str, say: Callable[[str, str], None] = lambda _n, _m: None,
              notes: Callable[[str], None] = lambda _: None) -> list[str]:
        """Create the VMs of SPEC this host lacks (not waiting for health); their names.

        Every new VM's track and the host's capacity are checked before anything is created, so a
        bad spec changes nothing. Call with the host lock held.
        """
        new: list[VmSpec] = []
        for vm in spec.vms:
            existing = self.state.vm(vm.name)
            if existing is None:
                self.catalog.resolve_for_new_vm(vm.track, vm.name)
                new.append(vm)
            elif existing.owner != vm.owner:
                raise Conflict(f"{source}: vms: {vm.name}: owned by another owner")
            elif existing.spec_hash != vm.digest():
                notes(f"{vm.name}: spec changed; changes to an existing VM are not applied yet "
                      "(destroy it and apply again)")
        self.provisioner.check_capacity(new)
        for vm in new:
            self.provisioner.create(vm, say=functools.partial(say, vm.name))
        return [vm.name for vm in new]

    def recover(self) -> None:
        """Finish or undo what a crashed process left in the journal (never another live one's work)."""
        self.recover_quick()
        self.recover_rollouts()

    def recover_quick(self) -> None:
        """The part of ``recover`` that awaits no guest: publishes, collections, provisions, destroys,
        purges and stops."""
        self.catalog.recover()
        self.provisioner.recover()

    def recover_rollouts(self) -> None:
        """The part that may await guests: interrupted swaps are committed or rolled back (a rollback
        awaits its guest's health, up to ``health_timeout``, without the host lock), canaries removed,
        then the rollouts' steps settled. The daemon runs it after READY=1, on its rollouts thread."""
        self.swapper.recover()
        self.canary.recover()
        self.rollouts.recover()

    def accelerator(self) -> DomainType:
        """``auto`` runs a probe guest under KVM once per host boot and caches what it saw."""
        if self._accel is not None:
            return self._accel
        if self.cfg.accelerator is not Accel.AUTO:
            self._accel = DomainType(self.cfg.accelerator.value)
            return self._accel
        cache = self.cfg.accel_cache
        boot_id = _boot_id()
        try:
            cached = json.loads(cache.read_text())
            if cached.get("boot_id") == boot_id:
                self._accel = DomainType(cached["accel"])
                return self._accel
        except (OSError, ValueError, KeyError):
            pass
        workdir = self.cfg.state_dir / "probe"
        workdir.mkdir(mode=0o711, exist_ok=True)
        self._accel = self.virt.probe_accel(workdir)
        cache.write_text(json.dumps({"boot_id": boot_id, "accel": self._accel.value}))
        self.state.event("host.accel", f"probe chose {self._accel.value}")
        return self._accel

    def close(self) -> None:
        self.state.close()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
