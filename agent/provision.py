"""Provisioning: turn a VM spec into an overlay, a seed, an optional data disk and a domain.

Each multi-step operation writes its intent (the files and the domain it will create) to the
journal first; ``recover`` undoes whatever an interrupted one left behind.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import proc
from agent.catalog import Catalog
from agent.config import Config
from agent.domxml import Disk, Domain, DomainType, Firmware, Metadata, NetworkNic, UserNet
from agent.errors import Conflict, EnvError, HealthError, HvError, InputError, NotFound
from agent.faults import point as fault
from agent.health import Endpoint, wait_healthy
from agent.hostnet import require_bridge_filtering
from agent.manifest import Manifest
from agent.seed import KeyPair, load_or_create_keypair, meta_data, new_ed25519, user_data, write_keypair, write_seed
from agent.spec import NetMode, VmSpec
from agent.state import DiskRow, HostLock, ImageRow, Intent, State, VmRow, VmState
from agent.virt import DomState, Virt

Say = Callable[[str], None]


@dataclass(frozen=True)
class VmPaths:
    """A VM's own files: removed with it, so nothing of them reaches a later VM of its name. Its
    data disk is not here: disks belong to their owner (``Provisioner.data_disk_path``)."""

    root: Path

    @classmethod
    def of(cls, cfg: Config, name: str) -> VmPaths:
        return cls(cfg.vm_dir / name)

    def os_disk(self, version: str) -> Path:
        return self.root / f"os-{version}.qcow2"

    @property
    def seed(self) -> Path:
        return self.root / "seed.iso"

    @property
    def nvram(self) -> Path:
        return self.root / "nvram.fd"

    def console(self, vm_uuid: str) -> Path:
        """The serial console log, named by the VM's UUID (one VM's output never reads as another's)."""
        return self.root / f"console-{vm_uuid}.log"

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"


class Provisioner:
    def __init__(self, cfg: Config, state: State, catalog: Catalog, virt: Virt,
                 accel: Callable[[], DomainType]) -> None:
        self.cfg = cfg
        self.state = state
        self.catalog = catalog
        self.virt = virt
        self._accel = accel
        self._agent_key: KeyPair | None = None

    @property
    def agent_key(self) -> KeyPair:
        if self._agent_key is None:
            self._agent_key = load_or_create_keypair(self.cfg.agent_key, "hvagent")
        return self._agent_key

    # create --------------------------------------------------------------------------------
    def create(self, spec: VmSpec, say: Say = lambda _: None, start: bool = True) -> VmRow:
        """Create and start one VM; it is not yet known to be healthy (see ``wait``).

        With ``start=False`` the domain is only defined and the VM is ``stopped``.
        """
        if self.state.vm(spec.name) is not None:
            raise Conflict(f"vm {spec.name}: already exists")
        if self.virt.exists(spec.name):
            raise Conflict(f"vm {spec.name}: a libvirt domain of that name exists and hvagent did not create it")
        image = self.catalog.resolve_for_new_vm(spec.track, spec.name)
        manifest = Manifest.model_validate(image.manifest)
        base = self.catalog.base_for_use(image)
        self.check_capacity([spec])
        accel = self._accel()
        paths = VmPaths.of(self.cfg, spec.name)
        port = self.free_port() if spec.network.mode is NetMode.USER else None
        if spec.network.mode is NetMode.NETWORK:
            require_bridge_filtering()
        vm_uuid = str(uuid.uuid4())
        now = self.state.clock()
        kept = self.kept_disk(spec)
        disk = kept or (DiskRow(spec.owner, spec.name, spec.data_disk, str(self.data_disk_path(spec.owner, spec.name)),
                                vm_uuid, now) if spec.data_disk else None)
        row = VmRow(spec.name, spec.owner, spec.image, image.name, image.version, VmState.PROVISIONING, None,
                    vm_uuid, self.new_mac(), port, f"{spec.name}-{secrets.token_hex(4)}",
                    spec.model_dump(mode="json"), spec.digest(), now, now)
        disk_intent = None if disk is None else {"owner": disk.owner, "name": disk.name, "path": disk.path,
                                                 "new": kept is None}
        _ = self.agent_key  # hvagent's own key pair (its seed needs it): made before anything of the VM is
        intent = self.state.begin("provision", spec.name, {"root": str(paths.root), "disk": disk_intent})
        fault("provision.journaled")
        try:
            self.state.add_vm(row)
            fault("provision.row")
            self.state.event("vm.provisioning", f"{spec.image} -> {image.ref} on {accel}", vm=spec.name)
            paths.root.mkdir(parents=True, mode=0o711)
            os.chmod(self.cfg.vm_dir, 0o711)
            write_keypair(new_ed25519(f"{spec.name} host key"), paths.host_key)
            say(f"{spec.name}: overlay on {image.ref}")
            make_overlay(base, paths.os_disk(image.version))
            fault("provision.overlay")
            self.write_vm_seed(row, paths)
            fault("provision.seed")
            if kept is not None:
                self.state.attach_disk(kept.owner, kept.name, vm_uuid)
                say(f"{spec.name}: its owner's kept data disk {kept.name} ({kept.size_gib} GiB)")
                fault("provision.data-disk")
            elif disk is not None:
                self.state.add_disk(disk)
                data = Path(disk.path)
                data.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
                os.chmod(self.cfg.data_dir, 0o711)
                proc.run(["qemu-img", "create", "-q", "-f", "qcow2", data, f"{spec.data_disk}G"])
                fault("provision.data-disk")
            self.virt.define(self.domain(row, manifest, accel))
            fault("provision.defined")
            if start:
                self.virt.start(spec.name)
                fault("provision.started")
            else:
                self.state.update_vm(spec.name, state=VmState.STOPPED, reason="created stopped")
        except BaseException:
            self._undo_create(spec.name, paths, disk_intent)
            self.state.done(intent)
            raise
        self.state.done(intent)
        self.state.event("vm.started", f"domain defined and started from {image.ref}", vm=spec.name)
        created = self.state.vm(spec.name)
        assert created is not None
        return created

    def data_disk_path(self, owner: str, name: str) -> Path:
        return self.cfg.data_dir / owner / f"{name}.qcow2"

    def kept_disk(self, spec: VmSpec) -> DiskRow | None:
        """The owner's kept disk that a new VM of this name and owner attaches again, if it asks for
        a data disk; refused when the sizes differ. Another owner's disk is never looked at."""
        if not spec.data_disk:
            return None
        kept = self.state.disk(spec.owner, spec.name)
        if kept is None:
            return None
        if kept.vm_uuid is not None:
            raise Conflict(f"vms: {spec.name}: data_disk: {spec.owner}'s disk {spec.name} is attached to another VM")
        if kept.size_gib != spec.data_disk:
            raise InputError(f"vms: {spec.name}: data_disk: {spec.owner}'s kept disk {spec.name} is "
                             f"{kept.size_gib} GiB; ask for data_disk: {kept.size_gib} to attach it again, or purge "
                             f"it first (hvagent disks purge {spec.name} --owner {spec.owner})")
        return kept

    def health_timeout(self, spec: VmSpec) -> float:
        """The spec's health timeout, capped by the host's: a tenant never sets how long we wait."""
        return min(float(spec.health.timeout), self.cfg.health_timeout)

    def wait(self, name: str) -> VmRow:
        """Wait for health; the VM ends ``running`` or ``failed`` with the reason kept."""
        row = self.row(name)
        manifest = Manifest.model_validate(self._image(row).manifest)
        spec = VmSpec.model_validate(row.spec)
        started = self.state.clock()
        try:
            wait_healthy(self.endpoint(row, wait=True), self.agent_key.private, manifest.expected_version_id,
                         spec.health.command, self.health_timeout(spec), halted=lambda: self.virt.halted(name))
        except HealthError as e:
            if self.state.vm(name) is None:
                raise NotFound(f"vm {name}: destroyed while waiting for its health") from e
            self.state.update_vm(name, state=VmState.FAILED, reason=e.message)
            self.state.event("vm.failed", e.message, vm=name)
            raise
        self.state.update_vm(name, state=VmState.RUNNING, reason=None)
        self.state.event("vm.running", f"healthy: VERSION_ID={manifest.expected_version_id}", vm=name,
                         duration=self.state.clock() - started)
        return self.row(name)

    def capacity(self) -> dict[str, int]:
        """What all VMs together may have on this host: vCPUs, memory MiB, data disk GiB."""
        cfg = self.cfg
        st = os.statvfs(cfg.state_dir)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
        return {"cpus": cfg.capacity_vcpus or 4 * (os.cpu_count() or 1),
                "memory": cfg.capacity_memory_mib or max(memory - 1024, 64),
                "data_disk": cfg.capacity_disk_gib or st.f_frsize * st.f_blocks // (1 << 30)}

    def disk_use(self, owner: str | None = None) -> int:
        """GiB of data disks, attached and kept, of one owner or of the whole host."""
        return sum(d.size_gib for d in self.state.disks(owner))

    def new_disk_gib(self, spec: VmSpec) -> int:
        """GiB a new VM adds to its owner's and the host's data disks: nothing when it attaches its kept disk."""
        return 0 if self.kept_disk(spec) is not None else spec.data_disk

    def check_capacity(self, new: list[VmSpec]) -> None:
        """Refuse VMs that would take this host beyond its capacity, before anything is created."""
        limits = self.capacity()
        used = {"cpus": 0, "memory": 0, "data_disk": self.disk_use()}
        for row in self.state.vms():
            existing = VmSpec.model_validate(row.spec)
            used["cpus"] += existing.cpus
            used["memory"] += existing.memory
        for entry in self.state.pending():  # a rollout's canary holds its guest's room while it boots
            if entry.op == "canary":
                used["cpus"] += int(entry.intent.get("cpus", 0))
                used["memory"] += int(entry.intent.get("memory", 0))
        units = {"cpus": "vCPUs", "memory": "MiB of memory", "data_disk": "GiB of data disk (kept disks included)"}
        for spec in new:
            if spec.data_disk > self.cfg.max_data_disk_gib:
                raise InputError(f"vms: {spec.name}: data_disk: {spec.data_disk} GiB exceeds this host's limit of "
                                 f"{self.cfg.max_data_disk_gib} GiB per disk")
            adds = {"cpus": spec.cpus, "memory": spec.memory, "data_disk": self.new_disk_gib(spec)}
            for k in used:
                used[k] += adds[k]
                if used[k] > limits[k]:
                    raise Conflict(f"vms: {spec.name}: {k}: would take this host to {used[k]} {units[k]}, "
                                   f"beyond its capacity of {limits[k]}")

    def _undo_create(self, name: str, paths: VmPaths, disk: dict[str, Any] | None) -> None:
        if self.virt.is_managed(name):
            self.virt.destroy(name)
            self.virt.undefine(name)
        shutil.rmtree(paths.root, ignore_errors=True)
        if disk is not None:
            if disk["new"]:
                Path(disk["path"]).unlink(missing_ok=True)
                self.state.delete_disk(disk["owner"], disk["name"])
            else:
                self.state.attach_disk(disk["owner"], disk["name"], None)  # kept again, as it was
        self.state.delete_vm(name)

    def write_vm_seed(self, row: VmRow, paths: VmPaths) -> None:
        spec = VmSpec.model_validate(row.spec)
        host_key = KeyPair(paths.host_key.read_text(), paths.host_key.with_name(paths.host_key.name + ".pub")
                           .read_text().strip())
        keys = [*spec.ssh_keys, self.agent_key.public]
        write_seed(paths.seed, meta_data(row.instance_id, row.name), user_data(keys, host_key, row.name))

    def domain(self, row: VmRow, manifest: Manifest, accel: DomainType) -> Domain:
        spec = VmSpec.model_validate(row.spec)
        paths = VmPaths.of(self.cfg, row.name)
        base = Path(self._image(row).path)
        disks = [Disk(paths.os_disk(row.version), "vda", backing=base)]
        if spec.data_disk:
            data = self.state.disk_of(row.uuid)
            if data is None:
                raise EnvError(f"vm {row.name}: its data disk is not in the state database")
            disks.append(Disk(Path(data.path), "vdb", serial="hvagent-data"))
        disks.append(Disk(paths.seed, "vdz", fmt="raw", readonly=True, serial="cidata"))
        nic: UserNet | NetworkNic
        if spec.network.mode is NetMode.USER:
            assert row.host_port is not None
            nic = UserNet(row.mac, row.host_port)
        else:
            nic = NetworkNic(row.mac, network=spec.network.name, bridge=spec.network.bridge)
        return Domain(
            name=row.name, uuid=row.uuid, memory_mib=spec.memory, vcpus=spec.cpus, firmware=manifest.firmware,
            dtype=accel, disks=tuple(disks), nic=nic, console_log=paths.console(row.uuid),
            nvram=paths.nvram if manifest.firmware is Firmware.UEFI else None,
            metadata=Metadata(row.owner, row.track, row.image, row.version, row.instance_id, row.host_port,
                              row.spec_hash),
        )

    # destroy -------------------------------------------------------------------------------
    def destroy(self, name: str, purge: bool = False) -> None:
        """Remove the VM; its data disk stays, kept for its owner, unless ``purge``."""
        row = self.row(name)
        if row.state in (VmState.SWAPPING, VmState.ROLLING_BACK) or \
                any(it.target == name and it.in_flight for it in self.state.pending()):
            raise Conflict(f"vm {name}: is {row.state}; try again when it settles")
        paths = VmPaths.of(self.cfg, name)
        intent = self.state.begin("destroy", name, {"root": str(paths.root), "purge": purge})
        self.state.update_vm(name, state=VmState.DESTROYING)
        self.state.event("vm.destroying", "purge data disk" if purge else "data disk kept", vm=name)
        fault("destroy.journaled")
        if self.virt.is_managed(name):
            self.virt.destroy(name)
            self.virt.undefine(name)
        fault("destroy.domain-gone")
        shutil.rmtree(paths.root, ignore_errors=True)
        disk = self.state.disk_of(row.uuid)
        if disk is not None and purge:
            Path(disk.path).unlink(missing_ok=True)  # the file first: a crash leaves a row to retry with
            self.state.delete_disk(disk.owner, disk.name)
        elif disk is not None:
            self.state.attach_disk(disk.owner, disk.name, None)
        fault("destroy.files-gone")
        self.state.delete_vm(row.name)
        self.state.event("vm.gone", "destroyed" + (" and purged" if purge else "")
                         + (f"; data disk {disk.name} kept for {disk.owner}" if disk and not purge else ""),
                         vm=name, uuid=row.uuid, owner=row.owner)
        self.state.done(intent)

    # stop ----------------------------------------------------------------------------------
    def stop(self, name: str, by: str, lock: HostLock) -> VmRow:
        """ACPI shutdown, forced off after ``shutdown_timeout``: the VM is ``stopped`` once its domain
        is off, not before. Call with the host lock held; it is let go of while the guest shuts down.

        Journaled and marked ``stopping`` first. A shutdown that fails leaves the VM in the state it
        had (``running``) with the reason and a ``vm.stop-failed`` event, and the error is raised,
        unless the domain is off all the same; ``recover`` settles a stop a crash cut short alike.
        """
        row = self.row(name)
        if row.state not in (VmState.RUNNING, VmState.STOPPED, VmState.FAILED):
            raise Conflict(f"vm {name}: is {row.state}; try again when it is running")
        intent = self.state.begin("stop", name, {"by": by, "state": row.state.value})
        self.state.update_vm(name, state=VmState.STOPPING, reason=f"stopping: requested by {by}")
        self.state.event("vm.stopping", f"requested by {by}", vm=name)
        error: Exception | None = None
        clean = False
        self.state.park([intent])  # this process's: the reconcile loop and other processes keep off it
        try:
            with lock.released():  # a guest ignoring ACPI holds nobody else up
                fault("stop.journaled")
                clean = self.virt.shutdown(name, self.cfg.shutdown_timeout)
        except Exception as e:  # whatever it was, the state must say what the domain does
            error = e
        finally:
            self.state.park([intent], parked=False)
        now = self.state.vm(name)
        if now is None or now.state is not VmState.STOPPING:  # another operation (a swap) took it meanwhile
            self.state.done(intent)
            if now is None:
                raise NotFound(f"vm {name}: destroyed while it stopped")
            self.state.event("vm.stop-failed", f"{now.state} by another operation while it stopped", vm=name)
            raise Conflict(f"vm {name}: {now.state} by another operation while it stopped; stop it again once it "
                           "settles")
        if error is None:
            self._stopped(name, by, "shut down" if clean else "forced off after the shutdown timeout")
        elif self._off(name):
            self._stopped(name, by, f"off, though its stop reported: {_why(error)}")
            error = None
        else:
            self._stop_failed(name, row.state, f"stop failed: {_why(error)}")
        self.state.done(intent)
        if error is not None:
            raise error
        return self.row(name)

    def _off(self, name: str) -> bool:
        """Whether the domain is known to be off (shut off or gone); False when libvirt cannot say."""
        try:
            return self.virt.state(name) in (DomState.SHUTOFF, DomState.MISSING)
        except HvError:
            return False

    def _stopped(self, name: str, by: str, how: str) -> None:
        self.state.update_vm(name, state=VmState.STOPPED, reason=f"stopped by {by}")
        self.state.event("vm.stopped", how, vm=name)

    def _stop_failed(self, name: str, was: VmState, reason: str) -> None:
        """Back to the state it had (its domain still runs, or may); the reconcile loop takes it again."""
        self.state.update_vm(name, state=was, reason=reason)
        self.state.event("vm.stop-failed", f"{reason}; still {was}", vm=name)

    def _recover_stop(self, it: Intent) -> None:
        row = self.state.vm(it.target)
        if row is None or row.state is not VmState.STOPPING:
            return
        if self.virt.state(it.target) in (DomState.SHUTOFF, DomState.MISSING):  # libvirt down: retried later
            self._stopped(it.target, it.intent["by"], "off; hvagent restarted before it recorded the stop")
        else:
            self._stop_failed(it.target, VmState(it.intent["state"]),
                              "stop interrupted: hvagent restarted before the guest was off; ask again")

    def purge_disk(self, owner: str, name: str) -> DiskRow:
        """Delete a kept data disk (journaled); one attached to a VM is refused."""
        disk = self.state.disk(owner, name)
        if disk is None:
            raise NotFound(f"disk {name}: no such disk")
        if disk.vm_uuid is not None:
            raise Conflict(f"disk {name}: in use by VM {name}; destroy it with --purge, or destroy it and then "
                           "purge the disk")
        intent = self.state.begin("purge-disk", f"{owner}/{name}", {"owner": owner, "name": name, "path": disk.path})
        fault("purge-disk.journaled")
        Path(disk.path).unlink(missing_ok=True)
        fault("purge-disk.file-gone")
        self.state.delete_disk(owner, name)
        self.state.event("disk.purged", f"kept data disk {name} ({disk.size_gib} GiB) of {owner} deleted",
                         owner=owner)
        self.state.done(intent)
        return disk

    def recover(self) -> None:
        """Undo provisions, finish destroys and disk purges, settle stops that a crash interrupted."""
        for it in self.state.orphaned():
            if it.op == "provision":
                self._undo_create(it.target, VmPaths(Path(it.intent["root"])), it.intent.get("disk"))
                self.state.event("vm.recovered", "interrupted provision undone", vm=it.target)
            elif it.op == "destroy":
                if self.state.vm(it.target) is not None:
                    self.state.done(it.id)
                    self.destroy(it.target, bool(it.intent["purge"]))
                    continue
            elif it.op == "stop":
                self._recover_stop(it)
            elif it.op == "purge-disk":
                disk = self.state.disk(it.intent["owner"], it.intent["name"])
                if disk is None or disk.vm_uuid is None:
                    Path(it.intent["path"]).unlink(missing_ok=True)
                    self.state.delete_disk(it.intent["owner"], it.intent["name"])
            else:
                continue
            self.state.done(it.id)

    # helpers -------------------------------------------------------------------------------
    def endpoint(self, row: VmRow, wait: bool = False) -> Endpoint:
        """Where the guest's SSH answers. On a network or bridge the address comes from libvirt; with
        ``wait`` (health after a boot) it may be unknown yet and is looked up on each probe."""
        manifest = Manifest.model_validate(self._image(row).manifest)
        pub = (VmPaths.of(self.cfg, row.name).root / "ssh_host_ed25519_key.pub").read_text().strip()
        if row.host_port is None and wait:
            return Endpoint("", 22, manifest.ssh_user, pub, locate=functools.partial(self.virt.guest_address, row.name))
        if row.host_port is None:
            address = self.virt.guest_address(row.name)
            if address is None:
                raise EnvError(f"vm {row.name}: no address known yet for its network interface")
            return Endpoint(address, 22, manifest.ssh_user, pub)
        return Endpoint("127.0.0.1", row.host_port, manifest.ssh_user, pub)

    def endpoint_user(self, row: VmRow) -> str:
        """The login the VM's image takes its owner's keys for."""
        return Manifest.model_validate(self._image(row).manifest).ssh_user

    def row(self, name: str) -> VmRow:
        row = self.state.vm(name)
        if row is None:
            raise NotFound(f"vm {name}: no such VM")
        return row

    def _image(self, row: VmRow) -> ImageRow:
        image = self.state.image(row.image, row.version)
        if image is None:
            raise NotFound(f"vm {row.name}: its image {row.image}-{row.version} is not in the catalog")
        return image

    def new_mac(self) -> str:
        taken = {v.mac for v in self.state.vms()}
        while True:
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            if mac not in taken:
                return mac

    def free_port(self) -> int:
        used = self.state.used_ports()
        for port in range(self.cfg.port_min, self.cfg.port_max + 1):
            if port in used:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise EnvError(f"no free port in {self.cfg.port_min}-{self.cfg.port_max} on 127.0.0.1",
                       hint="widen port_min/port_max in the configuration")


def _why(error: Exception) -> str:
    return error.message if isinstance(error, HvError) else f"internal error ({error.__class__.__name__})"


def make_overlay(base: Path, overlay: Path) -> None:
    """A copy-on-write overlay on a catalog base: never a copy, formats always explicit."""
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, overlay], timeout=60)
