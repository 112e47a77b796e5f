"""Swap: move VMs to another version of their family's image, health-gated, with rollback.

A swap keeps the VM's identity (name, UUID, MAC, forwarded port, SSH host key, owner keys) and
its data disk; it replaces the OS disk with a new overlay on the target base and gives the seed
a new instance-id, so the guest's first-boot configuration runs again on the new disk. The old
overlay is deleted only once the VM is healthy on the new version; until then it is what a
rollback boots again.

``swap_batch`` swaps several VMs at once (one update domain): they shut down together, boot
together and are health-checked in parallel, so a batch costs about one swap of wall time.

Each failure has a class (``agent.canary.Fault``). The image's: its guest does not become
healthy (no SSH, another host key, a halted guest, a VERSION_ID mismatch, the health command
failing); the version is marked bad. The host's: the new overlay or seed cannot be made, or
the domain cannot be defined or started; the version stays active. A VM whose new disk could
not even be prepared never went down: it keeps running as it was, nothing is restored.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.canary import Fault
from agent.errors import HealthError, HvError, InputError, NotFound
from agent.faults import point as fault
from agent.health import Endpoint, wait_healthy
from agent.manifest import Manifest
from agent.parts import HostParts
from agent.provision import VmPaths, make_overlay
from agent.spec import VmSpec
from agent.state import ImageRow, ImageState, VmRow, VmState
from agent.version import Version
from agent.virt import ShutdownPath

Say = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    vm: str
    ok: bool
    from_version: str
    to_version: str
    reason: str = ""
    downtime: float | None = None  # SSH-unreachable window: shutdown request .. healthy again
    rolled_back_healthy: bool = True
    fault: Fault | None = None  # why it failed: the image's fault or the host's


@dataclass
class _Job:
    old: VmRow
    new: VmRow
    intent: int
    t_down: float = 0.0
    t_up: float | None = None  # when this VM passed its health check (stamped in its own thread)


class Swapper(HostParts):
    def check_target(self, vm: VmRow, target: ImageRow) -> None:
        """Invariant 4: no swap crosses families (or image lineages)."""
        if vm.image != target.name or Version.parse(vm.version).family != target.family:
            raise InputError(f"vm {vm.name}: runs {vm.image}-{vm.version}; {target.ref} is another family, "
                             "and a VM never moves across families")

    def swap_batch(self, names: list[str], target: ImageRow, say: Say = lambda _: None,
                   track: str | None = None) -> list[Outcome]:
        """Swap ``names`` to ``target`` together; call with the host lock held. The lock is let go
        while the guests' health is awaited (their tenants decide how long that takes).

        ``track``: the track the VMs take with the new version (a retirement move pins them to
        it), journaled with the swap and committed with the version in one update.
        """
        base = self.catalog.base_for_use(target)
        manifest = Manifest.model_validate(target.manifest)
        accel = self._accel()
        jobs: list[_Job] = []
        for name in names:
            old = self.prov.row(name)
            self.check_target(old, target)
            new = dataclasses.replace(old, version=target.version, track=track or old.track,
                                      instance_id=f"{name}-{secrets.token_hex(4)}")
            # "down" turns true just before the batch is shut down: until then recovery leaves
            # the guest running as it was and only removes what was prepared
            intent = self.state.begin("swap", name, {"from": old.version, "to": target.version,
                                                     "old_instance_id": old.instance_id,
                                                     "new_instance_id": new.instance_id,
                                                     "state": old.state.value, "track": new.track,
                                                     "down": False})
            self.state.update_vm(name, state=VmState.SWAPPING, reason=None)
            self.state.event("swap.start", f"{old.image}-{old.version} -> {target.ref}", vm=name)
            jobs.append(_Job(old, new, intent))
        fault("swap.journaled")

        # 1. while the old OS still serves: the new overlay and a seed with the new instance-id
        failed: list[tuple[_Job, str, Fault]] = []
        prepared: list[_Job] = []
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                make_overlay(base, VmPaths.of(self.cfg, job.old.name).os_disk(target.version))
                self.prov.write_vm_seed(job.new, VmPaths.of(self.cfg, job.old.name))
                prepared.append(job)
                fault("swap.prepared")
            except HvError as e:
                outcomes.append(self._not_prepared(job, target, f"could not prepare {target.ref}: {e.message}"))
        # 2. graceful shutdown of the whole batch (guest agent, else ACPI; forced after the timeout)
        say(f"shutting down {', '.join(j.old.name for j in prepared)}")
        for job in prepared:  # journaled before any of them goes down
            self.state.advance(job.intent, down=True)
        for job in prepared:
            job.t_down = self._clock()
        paths = self._shutdown_all([j.old.name for j in prepared])
        fault("swap.shutoff")
        for job in prepared:
            self.state.event("swap.shutoff", f"off after {self._clock() - job.t_down:.1f}s ({paths[job.old.name]})",
                             vm=job.old.name)
        # 3. the same identity on the new disk; defined one by one, started all at once
        defined: list[_Job] = []
        for job in prepared:
            try:
                self.virt.define(self.prov.domain(job.new, manifest, accel))
                fault("swap.defined")
                defined.append(job)
            except HvError as e:
                failed.append((job, f"could not start on {target.ref}: {e.message}", Fault.HOST))
        started: list[_Job] = []
        for job, error in zip(defined, self._start_all([j.old.name for j in defined]), strict=True):
            if error is not None:
                failed.append((job, f"could not start on {target.ref}: {error}", Fault.HOST))
                continue
            fault("swap.started")
            self.state.event("swap.booting", f"started on {target.ref}", vm=job.old.name)
            started.append(job)
        # 4. health of every started VM, in parallel and without the host lock
        say(f"booting {', '.join(j.old.name for j in started)} on {target.ref}, waiting for health")
        checks = self._health_phase([(j.new, j.intent, manifest.expected_version_id) for j in started])
        for job, (error, t_up) in zip(started, checks, strict=True):
            job.t_up = t_up
            if error is None:
                outcomes.append(self._commit(job, target))
            else:
                failed.append((job, error, Fault.IMAGE))
        outcomes += self._rollback_all(failed, target)
        order = {n: i for i, n in enumerate(names)}
        return sorted(outcomes, key=lambda o: order[o.vm])

    # -- steps --------------------------------------------------------------------------------
    def _shutdown_all(self, names: list[str]) -> dict[str, ShutdownPath]:
        """Guest agent where one answers, else ACPI; forced off after ``shutdown_timeout``. How each went."""
        paths = self.virt.shutdown_all(names, self.cfg.shutdown_timeout)
        for name in names:
            if paths[name] is ShutdownPath.FORCED:
                self.state.event("swap.forced-off", f"still running {self.cfg.shutdown_timeout:.0f}s after its "
                                 "shutdown request", vm=name)
        return paths

    def _start_all(self, names: list[str]) -> list[str | None]:
        """Start the defined domains at once, each on a libvirt connection of its own: one QEMU's
        start-up does not wait for another's, and none of the batch's downtime is spent queueing
        (started one by one, the third of a batch of three came up 1 to 3 s after the first).
        For each: None, or why it did not start."""

        def one(name: str) -> str | None:
            virt = self.virt.fork()
            try:
                virt.start(name)
            except HvError as e:
                return e.message
            finally:
                virt.close()
            return None

        if len(names) <= 1:
            try:
                for name in names:
                    self.virt.start(name)
            except HvError as e:
                return [e.message]
            return [None] * len(names)
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            return list(pool.map(one, names))

    def _health_phase(self, probes: list[tuple[VmRow, int, str]]) -> list[tuple[str | None, float]]:
        """Health of each (VM, its journal entry, expected VERSION_ID): None when healthy, else why
        not; and when it was decided.

        The host lock is let go meanwhile, so no other tenant's call waits on these guests. Their
        journal entries are parked (held by this process) for that time: nobody else recovers
        them while this process lives, and if it dies they are recovered as after any crash.
        """
        if not probes:
            return []
        ids = [intent for _, intent, _ in probes]
        self.state.park(ids)
        try:
            with self.lock.released():
                fault("swap.parked")
                return self._health_all([(row, expected) for row, _, expected in probes])
        finally:
            self.state.park(ids, parked=False)

    def _health_all(self, probes: list[tuple[VmRow, str]]) -> list[tuple[str | None, float]]:
        """SSH, and each thread's own libvirt connection for whether QEMU stopped its guest; no
        database access in threads. Each VM's time is its own, so a batch's fast VMs do not
        inherit the downtime of its slowest."""
        key = self.prov.agent_key.private
        specs = [VmSpec.model_validate(row.spec) for row, _ in probes]
        checks = [(row.name, self.prov.endpoint(row, wait=True), spec.health.command, self.prov.health_timeout(spec),
                   expected) for (row, expected), spec in zip(probes, specs, strict=True)]

        def one(check: tuple[str, Endpoint, str | None, float, str]) -> tuple[str | None, float]:
            name, endpoint, command, timeout, expected = check
            virt = self.virt.fork()
            try:
                wait_healthy(endpoint, key, expected, command, timeout, halted=lambda: virt.halted(name))
            except HealthError as e:
                return e.message, self._clock()
            finally:
                virt.close()
            return None, self._clock()

        with ThreadPoolExecutor(max_workers=len(checks)) as pool:
            return list(pool.map(one, checks))

    def _commit(self, job: _Job, target: ImageRow) -> Outcome:
        name = job.old.name
        downtime = (job.t_up or self._clock()) - job.t_down
        self.state.update_vm(name, version=target.version, instance_id=job.new.instance_id, track=job.new.track,
                             state=VmState.RUNNING, reason=None)
        fault("swap.committed")
        paths = VmPaths.of(self.cfg, name)
        if job.old.version != target.version:
            paths.os_disk(job.old.version).unlink(missing_ok=True)
        self.state.event("swap.done", f"{job.old.version} -> {target.version}, downtime {downtime:.1f}s", vm=name,
                         duration=downtime)
        self.state.done(job.intent)
        return Outcome(name, True, job.old.version, target.version, downtime=downtime)

    def _not_prepared(self, job: _Job, target: ImageRow, reason: str) -> Outcome:
        """A VM whose new disk could not be made: it never went down, so it keeps running as it was."""
        name = job.old.name
        VmPaths.of(self.cfg, name).os_disk(target.version).unlink(missing_ok=True)  # the seed is written last
        self.state.update_vm(name, state=job.old.state, reason=f"not swapped to {target.ref}: {reason}")
        self.state.event("swap.failed", f"on {target.ref}: {reason} (host fault; it kept running on "
                         f"{job.old.version})", vm=name)
        self.state.done(job.intent)
        return Outcome(name, False, job.old.version, target.version, reason=reason, fault=Fault.HOST)

    def _rollback_all(self, failed: list[tuple[_Job, str, Fault]], target: ImageRow) -> list[Outcome]:
        """Boot each VM's old overlay again with its old instance-id; mark the target bad on this
        host when its guest was at fault."""
        if not failed:
            return []
        for job, reason, cause in failed:
            self.state.event("swap.failed", f"on {target.ref}: {reason} ({cause} fault)", vm=job.old.name)
            self.state.update_vm(job.old.name, state=VmState.ROLLING_BACK, reason=reason)
            if cause is Fault.IMAGE:
                self.state.set_image_state(target.name, target.version, ImageState.BAD)
                self.state.event("image.bad", f"{target.ref} failed health on {job.old.name}: {reason}")
        fault("rollback.marked")
        t0 = self._clock()
        restored = self._restore_all([(job.old, job.intent, target.version) for job, _, _ in failed])
        outcomes = []
        for (job, reason, cause), unhealthy in zip(failed, restored, strict=True):
            name = job.old.name
            if unhealthy is None:
                self.state.update_vm(name, state=VmState.RUNNING, reason=f"rolled back from {target.ref}: {reason}")
                self.state.event("rollback.done", f"back on {job.old.version}", vm=name, duration=self._clock() - t0)
            else:
                self.state.update_vm(name, state=VmState.FAILED, reason=f"rollback unhealthy: {unhealthy}")
                self.state.event("rollback.failed", unhealthy, vm=name, duration=self._clock() - t0)
            outcomes.append(Outcome(name, False, job.old.version, target.version, reason=reason,
                                    rolled_back_healthy=unhealthy is None, fault=cause))
        return outcomes

    def _restore_all(self, olds: list[tuple[VmRow, int, str]]) -> list[str | None]:
        """Put back the domain of each (old row, its journal entry, the version that failed), boot
        it and await its health; clear the entry. For each: None when healthy, else why not."""
        booted: list[tuple[VmRow, int, str]] = []
        results: dict[str, str | None] = {}
        for old, intent, failed_version in olds:
            try:
                booted.append((old, intent, self._boot_old(old, failed_version)))
            except HvError as e:
                results[old.name] = f"could not boot {old.image}-{old.version} again: {e.message}"
                self.state.done(intent)
        checks = self._health_phase(booted)
        for (old, intent, _), (error, _) in zip(booted, checks, strict=True):
            results[old.name] = error
            self.state.done(intent)
        return [results[old.name] for old, _, _ in olds]

    def _boot_old(self, old: VmRow, failed_version: str) -> str:
        """Define ``old``'s domain again and start it; the VERSION_ID its guest must report."""
        name = old.name
        paths = VmPaths.of(self.cfg, name)
        if self.virt.is_managed(name):
            self.virt.destroy(name)
        image = self.state.image(old.image, old.version)
        if image is None:
            raise NotFound(f"vm {name}: its image {old.image}-{old.version} is not in the catalog")
        manifest = Manifest.model_validate(image.manifest)
        self.prov.write_vm_seed(old, paths)
        self.virt.define(self.prov.domain(old, manifest, self._accel()))
        fault("rollback.defined")
        if failed_version != old.version:
            paths.os_disk(failed_version).unlink(missing_ok=True)
        self.virt.start(name)
        return manifest.expected_version_id

    def recover(self) -> None:
        """A swap interrupted by a crash: committed ones lose their old overlay; one whose VM never
        went down loses what was prepared and keeps running untouched; others roll back."""
        restore: list[tuple[VmRow, int, str]] = []
        for it in self.state.orphaned():
            if it.op != "swap":
                continue
            row = self.state.vm(it.target)
            if row is None:
                self.state.done(it.id)
                continue
            if it.intent.get("down") is False:  # (an older version's entry says nothing: restored)
                self._undo_prepared(row, it.id, it.intent)
            elif row.version == it.intent["to"] and row.instance_id == it.intent["new_instance_id"]:
                if it.intent["from"] != row.version:
                    VmPaths.of(self.cfg, row.name).os_disk(it.intent["from"]).unlink(missing_ok=True)
                self.state.update_vm(row.name, state=VmState.RUNNING)
                self.state.event("swap.recovered", f"interrupted swap to {it.intent['to']} settled", vm=row.name)
                self.state.done(it.id)
            else:
                restore.append((row, it.id, it.intent["to"]))
        for (row, _, to), reason in zip(restore, self._restore_all(restore), strict=True):
            self.state.update_vm(row.name, state=VmState.RUNNING if reason is None else VmState.FAILED,
                                 reason=reason)
            self.state.event("swap.recovered", f"interrupted swap to {to} settled", vm=row.name)

    def _undo_prepared(self, row: VmRow, intent: int, swap: dict[str, Any]) -> None:
        """A swap cut short before its batch was shut down: the guest still runs its old overlay
        under its old domain, so neither is touched. The new overlay goes, and the seed gets the
        old instance-id back (the next boot must not take the old disk for a new instance)."""
        paths = VmPaths.of(self.cfg, row.name)
        if swap["to"] != row.version:
            paths.os_disk(swap["to"]).unlink(missing_ok=True)
        self.prov.write_vm_seed(row, paths)
        self.state.update_vm(row.name, state=VmState(swap.get("state", VmState.RUNNING)), reason=None)
        self.state.event("swap.recovered", f"interrupted swap to {swap['to']} undone before the VM went down; "
                         f"it kept running on {row.version}", vm=row.name)
        self.state.done(intent)
