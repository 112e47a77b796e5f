"""Rollouts, retirement and garbage collection of base images.

A rollout is the swaps one newly published version causes: every VM on that family's latest
track moves to it, in batches (update domains) of at most ``max_unavailable`` VMs, each batch
only after the previous one is healthy. Its plan and progress live in the database, so
``rollout pause``/``abort`` from another process take effect between batches, and ``rollout
status`` can watch it.

Before the first batch the new version boots once on a throwaway VM (``agent.canary``) unless
the configuration's ``canary`` is false or the operator said ``--no-canary``: a version that
fails there is marked bad and no tenant's VM goes down for it. A failure is the image's fault
(its guests do not become healthy: the version is marked bad and the rollout halts) or the
host's (an overlay, a seed or a domain that cannot be made or started: the rollout pauses with
the reason, the version stays active, the VM's step is tried again on ``rollout resume``).

A latest-track VM goes down only inside its maintenance window (``agent.window``: its spec's,
else the host's); outside it the rollout's step waits, saying when the window opens, unless the
operator started it with ``--now``. Retirement moves wait for the window too.

A VM its tenant stopped is never started by a rollout: its step is skipped. Once it runs again,
``catch_up`` (each reconcile pass of the daemon) starts a rollout for the latest-track VMs that
are behind their family's newest active version, so it is swapped then, health-gated as any.

A version this host cannot run (agent.compat: say QEMU was downgraded after its publish) is never
a target: the family's newest version it can run is, and the skip is an event with the reason.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from agent.canary import Canary, Fault
from agent.catalog import TRIGGER, Catalog, remove_stored
from agent.config import Config
from agent.errors import Conflict, HvError, InputError, NotFound
from agent.faults import point as fault
from agent.manifest import Kind, kind_of
from agent.provision import VmPaths
from agent.spec import VmSpec
from agent.state import (
    ImageRow,
    ImageState,
    Retirement,
    RolloutRow,
    RolloutState,
    State,
    StepState,
    VmRow,
    VmState,
    holder_id,
)
from agent.swap import Swapper
from agent.version import Track, Version
from agent.window import Window

Say = Callable[[str], None]
log = logging.getLogger(__name__)

STOPPED_SKIP = "stopped by its tenant; swapped once it runs again"
WAITING = "waiting for maintenance windows: "
_MAX_UNAVAILABLE_RE = re.compile(r"^(?:(?P<count>[1-9][0-9]{0,5})|(?P<pct>[1-9][0-9]{0,2})%)$")
_DURATION_RE = re.compile(r"^(?P<n>0|[1-9][0-9]{0,6})(?P<unit>[smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Policy(StrEnum):
    AUTO = "auto"
    MANUAL = "manual"


class RetirePolicy(StrEnum):
    MOVE = "move"
    NEVER = "never"


def parse_max_unavailable(text: object, field: str = "max_unavailable") -> str:
    """A count (``3``) or a percentage of the rollout's VMs (``25%``, at most 100%)."""
    m = _MAX_UNAVAILABLE_RE.match(str(text)) if isinstance(text, (str, int)) else None
    if m is None or (m.group("pct") is not None and int(m.group("pct")) > 100):
        raise InputError(f"{field}: {text!r} is not accepted; give a count of at least 1 (3) "
                         "or a percentage from 1% to 100% (25%)")
    return str(text)


def batch_size(max_unavailable: str, total: int) -> int:
    m = _MAX_UNAVAILABLE_RE.match(max_unavailable)
    assert m is not None
    if m.group("pct") is not None:
        return max(1, math.floor(total * int(m.group("pct")) / 100))
    return int(m.group("count"))


def parse_duration(text: object, field: str = "grace") -> float:
    m = _DURATION_RE.match(str(text)) if isinstance(text, (str, int)) else None
    if m is None:
        raise InputError(f"{field}: {text!r} is not a duration; accepted: 0, 90s, 30m, 12h, 14d")
    return float(int(m.group("n")) * _UNIT[m.group("unit")])


def parse_family(text: str) -> tuple[str, int]:
    """``tiny-1`` or ``tiny-1.*`` -> ("tiny", 1)."""
    m = re.match(r"^(?P<name>[a-z][a-z0-9]*(?:-[a-z0-9]+)*?)-(?P<major>0|[1-9][0-9]{0,5})(?:\.\*)?$", text)
    if m is None:
        raise InputError(f"family: {text!r} is not a family; accepted: NAME-MAJOR (tiny-1) or NAME-MAJOR.* (tiny-1.*)")
    return m.group("name"), int(m.group("major"))


class Rollouts:
    def __init__(self, cfg: Config, state: State, catalog: Catalog, swapper: Swapper, canary: Canary,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state = state
        self.catalog = catalog
        self.swapper = swapper
        self.canary = canary
        self.clock = clock

    # -- planning ----------------------------------------------------------------------------
    def _family_exists(self, name: str, family: int) -> None:
        if not any(r.name == name and r.family == family for r in self.state.images()):
            have = sorted({f"{r.name}-{r.family}" for r in self.state.images()})
            raise NotFound(f"family: {name}-{family} is not in the catalog; available: {', '.join(have) or 'none'}")

    def followers(self, name: str, family: int) -> list[VmRow]:
        track = str(Track(name, family, None))
        return [v for v in self.state.vms() if v.track == track]

    def active(self, name: str | None = None, family: int | None = None) -> RolloutRow | None:
        for r in self.state.rollouts(active_only=True):
            if name is None or (r.name, r.family) == (name, family):
                return r
        return None

    def start(self, name: str, family: int, max_unavailable: str | None = None,
              canary: bool | None = None, now: bool = False) -> RolloutRow | None:
        """Plan a rollout of the family's newest usable version; None when no VM needs it.
        ``canary``: boot the version on a throwaway VM first (default: the configuration's);
        ``now``: swap outside the VMs' maintenance windows too (an operator's override)."""
        self._family_exists(name, family)
        mu = parse_max_unavailable(max_unavailable or self.cfg.max_unavailable)
        if self.active(name, family) is not None:
            raise Conflict(f"family: {name}-{family} has a rollout in progress; see hvagent rollout status")
        target = self.catalog.resolve(Track(name, family, None))
        for image, why in self.catalog.unrunnable(name, family, newest_only=True):
            self.state.event("rollout.skipped", f"{image.ref} is not a target: this host cannot run it "
                             f"({'; '.join(why)}); {name}-{family}.* resolves to {target.version}")
        tv = Version.parse(target.version)
        vms = [v for v in self.followers(name, family) if Version.parse(v.version) < tv]
        if not vms:
            self.state.event("rollout.nothing", f"every VM on {name}-{family}.* already runs {target.version}")
            return None
        with_canary = self.cfg.canary if canary is None else canary
        if with_canary:
            self._room_for_canary(vms)
        size = batch_size(mu, len(vms))
        steps = [(v.name, i // size, v.version) for i, v in enumerate(vms)]
        rid = self.state.add_rollout(name, family, target.version, mu, steps, "pending" if with_canary else "off",
                                     ignore_windows=now)
        self.state.event("rollout.start", f"{name}-{family}.* -> {target.version}: {len(vms)} VM(s) in "
                         f"{math.ceil(len(vms) / size)} batch(es) of at most {size}"
                         + (", after a canary boot" if with_canary else ", without a canary"))
        row = self.state.rollout(rid)
        assert row is not None
        return row

    def _canary_size(self, vms: list[VmRow]) -> tuple[int, int, float]:
        """The canary's vCPUs, memory and health timeout: the largest of the VMs it stands for."""
        specs = [VmSpec.model_validate(v.spec) for v in vms]
        return (max(s.cpus for s in specs), max(s.memory for s in specs),
                max(self.swapper.prov.health_timeout(s) for s in specs))

    def _room_for_canary(self, vms: list[VmRow]) -> None:
        cpus, memory, _ = self._canary_size(vms)
        probe = VmSpec.model_validate({"name": "canary", "owner": "hvagent", "image": vms[0].track, "cpus": cpus,
                                       "memory": memory, "ssh_keys": [self.swapper.prov.agent_key.public]})
        try:
            self.swapper.prov.check_capacity([probe])
        except Conflict as e:
            raise Conflict(f"canary: no room on this host for one more guest ({e.message.removeprefix('vms: ')})",
                           hint="free room, or run this rollout without the canary: hvagent rollout start "
                                "--no-canary") from e

    def policy(self, asked: Policy | None = None) -> Policy:
        """A publish's rollout policy: the one it asked for, else the configuration's."""
        return asked or Policy(self.cfg.rollout_policy)

    def on_publish(self, image: ImageRow, policy: Policy | None = None) -> RolloutRow | None:
        """The publish trigger: a new newest version starts a rollout (policy auto).

        The publish journaled it (``Catalog.publish``'s ``rollout``) before recording the image;
        its entry is cleared here once the rollout is planned or found not needed, so a crash in
        between leaves it to ``recover``, which calls this again."""
        try:
            fault("rollout.trigger")
            return self._on_publish(image, policy)
        finally:
            me = holder_id()
            for it in self.state.pending():
                if it.op == TRIGGER and it.target == image.ref and it.holder == me:
                    self.state.done(it.id)

    def _on_publish(self, image: ImageRow, policy: Policy | None) -> RolloutRow | None:
        if kind_of(image.manifest) is not Kind.DISK:
            return None  # installer media: no VM runs them, so none moves
        newest = self.catalog.resolve(Track(image.name, image.family, None))
        if newest.version != image.version:
            self.state.event("rollout.none", f"{image.ref} is not the newest usable version of its family "
                             f"({newest.ref}); nothing moves")
            return None
        if not self.followers(image.name, image.family):
            return None
        if self.policy(policy) is Policy.MANUAL:
            self.state.event("rollout.waiting", f"{image.ref} published; policy manual: "
                             f"hvagent rollout start {image.name}-{image.family}")
            return None
        return self.start(image.name, image.family)

    # -- running -----------------------------------------------------------------------------
    def run(self, rid: int, say: Say = lambda _: None) -> RolloutRow:
        """Swap batch after batch until done, halted, paused or aborted."""
        while self.step(rid, say):
            pass
        ro = self.state.rollout(rid)
        assert ro is not None
        return ro

    def step(self, rid: int, say: Say = lambda _: None) -> bool:
        """Swap the rollout's next batch; False once it is no longer running (done, halted, paused...).

        The daemon runs one step per hold of the host lock, so API calls interleave between batches.
        """
        ro = self.state.rollout(rid)
        assert ro is not None
        if ro.state is not RolloutState.RUNNING:
            say(f"rollout {rid}: {ro.state}")
            return False
        if self._settle(ro):
            say(f"rollout {rid}: a swap cut short awaits its recovery")
            return False
        pending = [s for s in self.state.steps(rid) if s.state is StepState.PENDING]
        if not pending:
            self.state.set_rollout(rid, RolloutState.DONE)
            self.state.event("rollout.done", f"{ro.family_ref}.* -> {ro.target}: every VM swapped")
            self.gc()
            say(f"rollout {rid}: done")
            return False
        batch = min(s.batch for s in pending)
        target = self.state.image(ro.name, ro.target)
        if target is None or target.state is not ImageState.ACTIVE:
            self.state.set_rollout(rid, RolloutState.HALTED, f"{ro.name}-{ro.target} is no longer active")
            return True
        if ro.canary == "pending":
            self._run_canary(ro, target, [s.vm for s in pending], say)
            return True
        if ro.canary == "running":  # another process boots it (a crash's is cleared by recover)
            say(f"rollout {rid}: its canary is booting")
            return False
        names = []
        waiting: list[tuple[str, float, Window]] = []
        for s in (s for s in pending if s.batch == batch):
            vm = self.state.vm(s.vm)
            if vm is None or vm.track != str(Track(ro.name, ro.family, None)) or \
                    Version.parse(vm.version) >= Version.parse(ro.target):
                self.state.set_step(rid, s.vm, StepState.SKIPPED, reason="no longer on the track or newer")
                continue
            if vm.state in (VmState.STOPPED, VmState.STOPPING):  # its tenant's intent: never started by us
                self.state.set_step(rid, s.vm, StepState.SKIPPED, reason=STOPPED_SKIP)
                self.state.event("swap.skipped", f"stopped: not started for {ro.name}-{ro.target}", vm=s.vm)
                continue
            window = None if ro.ignore_windows else self.window_of(vm)
            if window is not None and not window.is_open(self.clock()):
                waiting.append((s.vm, window.next_open(self.clock()), window))
                continue
            self.state.set_step(rid, s.vm, StepState.SWAPPING, started_at=self.clock())
            names.append(s.vm)
        if waiting and not names:
            self._wait_for_windows(ro, waiting, say)
            return False
        if ro.reason and ro.reason.startswith(WAITING):
            self.state.set_rollout_reason(rid, None)
        if not names:
            return True
        t0 = self.clock()
        say(f"rollout {rid}, batch {batch + 1}: {', '.join(names)} -> {ro.target}")
        try:
            outcomes = self.swapper.swap_batch(names, target, say)
        except Exception as e:  # before or between its swaps: none of them reported an outcome
            self._settle(ro, f"swap to {ro.target} failed: {e.message if isinstance(e, HvError) else repr(e)}; "
                         "tried again on the rollout's next pass")
            raise
        image_faults = [o for o in outcomes if not o.ok and o.fault is Fault.IMAGE]
        host_faults = [o for o in outcomes if not o.ok and o.fault is Fault.HOST]
        for o in outcomes:
            step = StepState.DONE if o.ok else StepState.PENDING if o.fault is Fault.HOST else StepState.ROLLED_BACK
            self.state.set_step(rid, o.vm, step, reason=o.reason or None, finished_at=self.clock(),
                                downtime=o.downtime)
            say(f"{o.vm}: " + (f"on {o.to_version}, downtime {o.downtime:.1f}s" if o.ok
                               else f"rolled back to {o.from_version}: {o.reason}"))
        failed = len(image_faults) + len(host_faults)
        self.state.event("rollout.batch", f"rollout {rid} batch {batch + 1}: {len(outcomes) - failed} "
                         f"swapped, {failed} rolled back", duration=self.clock() - t0)
        if image_faults:
            reason = f"{image_faults[0].vm}: {image_faults[0].reason}"
            self.state.set_rollout(rid, RolloutState.HALTED, reason)
            self.state.event("rollout.halted", f"{ro.family_ref}.* -> {ro.target} halted: {reason}")
        elif host_faults:
            reason = f"host fault on {host_faults[0].vm}: {host_faults[0].reason}"
            self.state.set_rollout(rid, RolloutState.PAUSED, reason)
            self.state.event("rollout.paused", f"{ro.family_ref}.* -> {ro.target} paused: {reason}; "
                             f"{ro.name}-{ro.target} stays active (hvagent rollout resume once the host is fixed)")
        return True

    def window_of(self, vm: VmRow) -> Window | None:
        """The VM's maintenance window: its spec's, else the host's, else none (any time)."""
        maintenance = VmSpec.model_validate(vm.spec).maintenance or self.cfg.maintenance
        return None if maintenance is None else maintenance.parsed()

    def _wait_for_windows(self, ro: RolloutRow, waiting: list[tuple[str, float, Window]], say: Say) -> None:
        """Say (once per change) which VMs of the batch wait for their window, and when it opens."""
        when = {vm: f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(opens))} ({window})"
                for vm, opens, window in waiting}
        reason = WAITING + ", ".join(f"{vm} opens {w}" for vm, w in when.items())
        if reason == ro.reason:
            return
        self.state.set_rollout_reason(ro.id, reason)
        for vm, w in when.items():
            self.state.set_step(ro.id, vm, StepState.PENDING, reason=f"waiting for its maintenance window: opens {w}")
        self.state.event("rollout.waiting", f"rollout {ro.id}: {reason}")
        say(f"rollout {ro.id}: {reason} (hvagent rollout start --now overrides)")

    def _run_canary(self, ro: RolloutRow, target: ImageRow, pending: list[str], say: Say) -> None:
        vms = [v for v in (self.state.vm(n) for n in pending) if v is not None]
        if not vms:
            self.state.set_canary(ro.id, "off")
            return
        cpus, memory, timeout = self._canary_size(vms)
        self.state.set_canary(ro.id, "running")
        verdict = self.canary.boot(target, cpus, memory, timeout, say)
        if verdict.reason is None:
            self.state.set_canary(ro.id, "passed")
            self.state.event("rollout.canary", f"{target.ref} booted on a throwaway VM and passed its health in "
                             f"{verdict.seconds:.1f}s", duration=verdict.seconds)
            say(f"rollout {ro.id}: canary passed ({verdict.seconds:.1f}s)")
            return
        self.state.set_canary(ro.id, "failed")
        self.state.event("rollout.canary-failed", verdict.reason, duration=verdict.seconds)
        say(f"rollout {ro.id}: {verdict.reason}")
        if verdict.fault is Fault.IMAGE:
            self.state.set_image_state(target.name, target.version, ImageState.BAD)
            self.state.event("image.bad", f"{target.ref} failed its canary boot: {verdict.reason}")
            self.state.set_rollout(ro.id, RolloutState.HALTED, verdict.reason)
            self.state.event("rollout.halted", f"{ro.family_ref}.* -> {ro.target} halted before any VM went down: "
                             f"{verdict.reason}")
        else:
            self.state.set_canary(ro.id, "pending")  # booted again on resume
            self.state.set_rollout(ro.id, RolloutState.PAUSED, f"host fault: {verdict.reason}")
            self.state.event("rollout.paused", f"{ro.family_ref}.* -> {ro.target} paused: host fault: "
                             f"{verdict.reason}; {target.ref} stays active")

    def catch_up(self) -> list[RolloutRow]:
        """Rollouts for VMs a rollout skipped because their tenant had them stopped, once they run
        again behind their family's newest active version, if no rollout of the family is under
        way and none to that version halted or was aborted since (the image or the operator
        decided). Policy auto only; call with the host lock held."""
        if self.cfg.rollout_policy != "auto":
            return []
        waiting: set[tuple[str, int]] = set()
        for ro in self.state.rollouts():
            if not ro.state.finished or (ro.name, ro.family) in waiting:
                continue
            try:
                newest = Version.parse(self.catalog.resolve(Track(ro.name, ro.family, None)).version)
            except HvError:  # no usable version left in the family
                continue
            for s in self.state.steps(ro.id):
                vm = self.state.vm(s.vm) if s.state is StepState.SKIPPED and s.reason == STOPPED_SKIP else None
                if vm is not None and vm.state is VmState.RUNNING and vm.track == str(Track(ro.name, ro.family, None)) \
                        and Version.parse(vm.version) < newest:
                    waiting.add((ro.name, ro.family))
        started: list[RolloutRow] = []
        for name, family in sorted(waiting):
            if self.active(name, family) is not None:
                continue
            target = self.catalog.resolve(Track(name, family, None))
            if any((r.name, r.family, r.target) == (name, family, target.version)
                   and r.state in (RolloutState.HALTED, RolloutState.ABORTED) for r in self.state.rollouts()):
                continue
            try:
                planned = self.start(name, family)
            except Conflict as e:  # no room for its canary: tried again on the next pass
                log.warning("catch-up rollout of %s-%d: %s", name, family, e)
                continue
            if planned is not None:
                self.state.event("rollout.catch-up", f"rollout {planned.id}: VMs skipped while stopped run again")
                started.append(planned)
        return started

    def recover(self) -> None:
        """Steps a crash left ``swapping``: done if the VM reached the target, else pending again.
        Then the rollouts of publishes a crash cut off from their trigger (``on_publish``).

        Call after ``Swapper.recover`` and ``Canary.recover`` have settled each VM and canary.
        """
        canary_in_flight = any(it.op == "canary" and it.in_flight for it in self.state.pending())
        for ro in self.state.rollouts(active_only=True):
            self._settle(ro, recovered=True)
            if ro.canary == "running" and not canary_in_flight:  # its canary was removed: boot another
                self.state.set_canary(ro.id, "pending")
                self.state.event("rollout.recovered", f"rollout {ro.id}: canary cut short by a crash; booted again")
        for it in self.state.orphaned():
            if it.op != TRIGGER:
                continue
            name, _, version = it.target.rpartition("-")
            image = self.state.image(name, version)
            try:
                if image is not None:  # else the publish was undone: nothing to roll out
                    planned = self.on_publish(image, Policy(it.intent["policy"]))
                    self.state.event("rollout.recovered", f"{it.target}: published before a crash; " + (
                        f"rollout {planned.id} planned" if planned else "no rollout needed or policy manual"))
            except HvError as e:  # a rollout of the family under way, no room for a canary...
                self.state.event("rollout.recovered", f"{it.target}: published before a crash; no rollout: "
                                 f"{e.message}")
            finally:
                self.state.done(it.id)

    def _settle(self, ro: RolloutRow, reason: str | None = None, recovered: bool = False) -> bool:
        """Settle the rollout's ``swapping`` steps whose swap has no open journal entry (it ended,
        or failed before writing one): done if the VM reached the target, else pending again, with
        ``reason``. True when some step's swap still has an entry (in flight, or for recovery)."""
        swaps = {it.target: it for it in self.state.pending() if it.op == "swap"}
        waiting = False
        for s in self.state.steps(ro.id):
            if s.state is not StepState.SWAPPING:
                continue
            if s.vm in swaps and (swaps[s.vm].in_flight or not recovered):
                waiting = True  # a live process's swap, or one Swapper.recover settles first
                continue
            vm = self.state.vm(s.vm)
            if vm is not None and vm.version == ro.target:
                self.state.set_step(ro.id, s.vm, StepState.DONE, finished_at=self.clock())
            else:
                self.state.set_step(ro.id, s.vm, StepState.PENDING, reason=reason)
            if recovered or s.reason != reason:  # a failure that repeats on every pass is told once
                self.state.event("rollout.recovered", f"rollout {ro.id}: step of {s.vm} settled "
                                 + ("after a crash" if recovered else f"({reason or 'its swap ended'})"))
        return waiting

    def _find(self, family: str | None) -> RolloutRow:
        if family is not None:
            name, major = parse_family(family)
            self._family_exists(name, major)
            ro = self.active(name, major)
        else:
            ro = self.active()
        if ro is None:
            raise NotFound(f"rollout: none in progress{' for ' + family if family else ''}")
        return ro

    def pause(self, family: str | None) -> RolloutRow:
        ro = self._find(family)
        self.state.set_rollout(ro.id, RolloutState.PAUSED)
        self.state.event("rollout.paused", f"rollout {ro.id} ({ro.family_ref}.* -> {ro.target}) pauses after "
                         "its current batch")
        return ro

    def resume(self, family: str | None) -> RolloutRow:
        ro = self._find(family)
        if ro.state is not RolloutState.PAUSED:
            raise Conflict(f"rollout {ro.id}: is {ro.state}, not paused")
        self.state.set_rollout(ro.id, RolloutState.RUNNING)
        self.state.event("rollout.resumed", f"rollout {ro.id}")
        return ro

    def abort(self, family: str | None) -> RolloutRow:
        ro = self._find(family)
        self.state.set_rollout(ro.id, RolloutState.ABORTED, "aborted by the operator")
        self.state.event("rollout.aborted", f"rollout {ro.id} ({ro.family_ref}.* -> {ro.target}): the current "
                         "batch finishes, no other VM moves")
        return ro

    # -- retirement --------------------------------------------------------------------------
    def retire(self, ref: str, grace: float, policy: RetirePolicy, say: Say = lambda _: None) -> Retirement:
        image = self.catalog.get(ref)
        others = [r for r in self.state.images() if (r.name, r.family) == (image.name, image.family)
                  and r.version != image.version and r.state is ImageState.ACTIVE]
        if not others:
            raise InputError(f"image: {ref} is the only active version of {image.name}-{image.family}; "
                             "publish a newer one before retiring it")
        now = self.clock()
        r = Retirement(image.name, image.version, now, now + grace, policy.value)
        self.state.retire(r)
        fault("retire.recorded")
        self.state.event("image.retired", f"{ref}: no new pins; grace {grace:.0f}s, policy {policy}")
        for vm in self.pinned_to(image):
            self.state.event("vm.warning", f"pinned to retired {ref}; " + (
                f"moves to the newest {image.name}-{image.family}.x when the grace ends" if policy is RetirePolicy.MOVE
                else "policy never: it stays"), vm=vm.name)
        self.enforce_retirements(say)
        return r

    def pinned_to(self, image: ImageRow) -> list[VmRow]:
        return [v for v in self.state.vms() if (v.image, v.version) == (image.name, image.version)
                and Track.parse(v.track).pinned]

    def warnings(self) -> dict[str, str]:
        """VMs pinned to a retired version, with what will happen to them."""
        out: dict[str, str] = {}
        for r in self.state.retirements():
            image = self.state.image(r.name, r.version)
            if image is None:
                continue
            for vm in self.pinned_to(image):
                when = "policy never: stays" if r.policy == RetirePolicy.NEVER else \
                    f"moves after {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.grace_until))} UTC"
                out[vm.name] = f"pinned to retired {image.ref} ({when})"
        return out

    def enforce_retirements(self, say: Say = lambda _: None) -> None:
        """Move VMs pinned to a retired version whose grace has passed (policy move)."""
        for r in self.state.retirements():
            if r.policy != RetirePolicy.MOVE or self.clock() < r.grace_until:
                continue
            image = self.state.image(r.name, r.version)
            if image is None:
                continue
            for vm in self.pinned_to(image):
                target = self.catalog.resolve(Track(image.name, image.family, None))
                if target.version == vm.version:
                    continue
                window = self.window_of(vm)
                if window is not None and not window.is_open(self.clock()):
                    continue  # moved once its maintenance window opens
                if vm.state in (VmState.STOPPED, VmState.STOPPING):
                    continue  # its tenant's intent: a retirement move never starts it
                say(f"{vm.name}: {image.ref} retired, moving to {target.ref}")
                # the new pin is journaled with the swap and committed with its version: a crash
                # never leaves the VM on the new version pinned to the retired one, or the reverse
                [outcome] = self.swapper.swap_batch([vm.name], target, say, track=f"{target.name}-{target.version}")
                if outcome.ok:
                    fault("retire.moved")
                    self.state.event("retire.moved", f"{image.ref} -> {target.ref} (now pinned to it)", vm=vm.name,
                                     duration=outcome.downtime)
                else:
                    self.state.event("retire.failed", f"{target.ref}: {outcome.reason}", vm=vm.name)

    # -- garbage collection ------------------------------------------------------------------
    def gc(self, keep: int | None = None) -> list[str]:
        """Remove bases that no VM uses and that are not among the newest ``keep`` of their family."""
        keep = self.cfg.keep_images if keep is None else keep
        used = {(v.image, v.version) for v in self.state.vms()}
        for it in self.state.pending():  # a swap in flight may still need either side
            if it.op == "swap":
                vm = self.state.vm(it.target)
                if vm is not None:
                    used |= {(vm.image, it.intent["from"]), (vm.image, it.intent["to"])}
        on_disk = {(vm.image, p.name[3:-6]) for vm in self.state.vms()
                   for p in VmPaths.of(self.cfg, vm.name).root.glob("os-*.qcow2")}
        removed: list[str] = []
        families: dict[tuple[str, int], list[ImageRow]] = {}
        for r in self.state.images():
            families.setdefault((r.name, r.family), []).append(r)
        for rows in families.values():
            rows.sort(key=lambda r: Version.parse(r.version), reverse=True)
            for r in rows[keep:]:
                if (r.name, r.version) in used or (r.name, r.version) in on_disk:
                    continue
                intent = self.state.begin("gc", r.ref, {"path": r.path})
                fault("gc.journaled")
                self.state.delete_image(r.name, r.version)
                fault("gc.row-deleted")
                remove_stored(Path(r.path))
                self.state.done(intent)
                removed.append(r.ref)
                self.state.event("image.gc", f"{r.ref}: unused and older than the newest {keep} of its family")
        return removed
