"""The canary: a new version boots once on this host before any tenant's VM goes down for it.

A throwaway VM on a throwaway overlay of the target base, with a throwaway seed (its own SSH host
key, hvagent's key only: no tenant key, no data disk), sized like the rollout's VMs, on user-mode
networking with a loopback forward. It must pass the image's own health: SSH answering with the
pinned host key, and /etc/os-release saying the manifest's VERSION_ID. Then it is destroyed and
its files removed, whatever the outcome.

Its domain name (``canary_`` and hex) is one no tenant can give a VM (names are ``[a-z0-9-]``).
It is journaled (op ``canary``): a crash mid-canary leaves an entry that recovery clears by
removing the domain and its files. The host lock is let go while its health is awaited, as for a
swap's.
"""

from __future__ import annotations

import secrets
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from agent.domxml import Disk, Domain, Firmware, Metadata, UserNet
from agent.errors import HealthError, HvError
from agent.faults import point as fault
from agent.health import Endpoint, wait_healthy
from agent.manifest import Manifest
from agent.parts import HostParts
from agent.provision import VmPaths, make_overlay
from agent.seed import meta_data, new_ed25519, user_data, write_keypair, write_seed
from agent.state import ImageRow

Say = Callable[[str], None]

HOSTNAME = "hvagent-canary"


class Fault(StrEnum):
    """Whose fault a failure is: the image's (the version is marked bad) or the host's (the
    rollout pauses, the image stays active)."""

    IMAGE = "image"
    HOST = "host"


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: healthy
    fault: Fault | None = None
    seconds: float = 0.0


class Canary(HostParts):
    def boot(self, target: ImageRow, cpus: int, memory: int, timeout: float, say: Say = lambda _: None) -> Verdict:
        """Boot ``target`` once on a throwaway VM and await its health; call with the host lock held."""
        name = f"canary_{secrets.token_hex(4)}"
        paths = VmPaths(self.cfg.state_dir / "canary" / name)
        t0 = self._clock()
        intent = self.state.begin("canary", name, {"root": str(paths.root), "target": target.ref, "cpus": cpus,
                                                   "memory": memory})  # counted against capacity meanwhile
        try:
            try:
                manifest = Manifest.model_validate(target.manifest)
                base = self.catalog.base_for_use(target)
                paths.root.mkdir(parents=True, mode=0o711)
                for d in (paths.root.parent, paths.root):
                    d.chmod(0o711)  # QEMU (unprivileged) must reach the overlay and the seed
                host_key = new_ed25519(f"{HOSTNAME} host key")
                write_keypair(host_key, paths.host_key)
                make_overlay(base, paths.os_disk(target.version))
                write_seed(paths.seed, meta_data(f"{name}-{secrets.token_hex(4)}", HOSTNAME),
                           user_data([self.prov.agent_key.public], host_key, HOSTNAME))
                port = self.prov.free_port()
                self.virt.define(self._domain(name, target, manifest, paths, port, cpus, memory))
                say(f"canary: booting {target.ref} on a throwaway VM")
                self.virt.start(name)
                fault("canary.started")
            except HvError as e:
                return Verdict(f"canary could not boot {target.ref}: {e.message}", Fault.HOST, self._clock() - t0)
            endpoint = Endpoint("127.0.0.1", port, manifest.ssh_user, host_key.public)
            self.state.park([intent])
            try:
                with self.lock.released():
                    virt = self.virt.fork()
                    try:
                        wait_healthy(endpoint, self.prov.agent_key.private, manifest.expected_version_id, None,
                                     timeout, halted=lambda: virt.halted(name))
                    except HealthError as e:
                        return Verdict(f"canary of {target.ref}: {e.message}", Fault.IMAGE, self._clock() - t0)
                    finally:
                        virt.close()
            finally:
                self.state.park([intent], parked=False)
            return Verdict(None, seconds=self._clock() - t0)
        finally:
            self._remove(name, paths)
            self.state.done(intent)

    def _domain(self, name: str, target: ImageRow, manifest: Manifest, paths: VmPaths, port: int, cpus: int,
                memory: int) -> Domain:
        from pathlib import Path

        disks = (Disk(paths.os_disk(target.version), "vda", backing=Path(target.path)),
                 Disk(paths.seed, "vdz", fmt="raw", readonly=True, serial="cidata"))
        return Domain(
            name=name, uuid=str(uuid.uuid4()), memory_mib=memory, vcpus=cpus, firmware=manifest.firmware,
            dtype=self._accel(), disks=disks, nic=UserNet(self.prov.new_mac(), port),
            console_log=paths.root / "console.log",
            nvram=paths.nvram if manifest.firmware is Firmware.UEFI else None,
            metadata=Metadata("hvagent", f"{target.name}-{target.version}", target.name, target.version, name,
                              port, "canary"),
        )

    def _remove(self, name: str, paths: VmPaths) -> None:
        if self.virt.is_managed(name):
            self.virt.destroy(name)
            self.virt.undefine(name)
        shutil.rmtree(paths.root, ignore_errors=True)

    def recover(self) -> None:
        """A canary a crash interrupted: its domain and files go; the rollout boots a new one."""
        for it in self.state.orphaned():
            if it.op != "canary":
                continue
            self._remove(it.target, VmPaths(self.cfg.state_dir / "canary" / it.target))
            self.state.done(it.id)
