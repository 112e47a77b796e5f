"""Rollouts, retirement and garbage collection of base images.

A rollout is the swaps one newly published version causes: every VM on that family's latest
track moves to it, in batches (update domains) of at most ``max_unavailable`` VMs, each batch
only after the previous one is healthy, halting at the first failure. Its plan and progress
live in the database, so ``rollout pause``/``abort`` from another process take effect between
batches, and ``rollout status`` can watch it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from agent.catalog import Catalog
from agent.config import Config
from agent.errors import Conflict, InputError, NotFound
from agent.faults import point as fault
from agent.provision import VmPaths
from agent.state import ImageRow, ImageState, Retirement, RolloutRow, RolloutState, State, StepState, VmRow
from agent.swap import Swapper
from agent.version import Track, Version

Say = Callable[[str], None]

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
    def __init__(self, cfg: Config, state: State, catalog: Catalog, swapper: Swapper,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state = state
        self.catalog = catalog
        self.swapper = swapper
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

    def start(self, name: str, family: int, max_unavailable: str | None = None) -> RolloutRow | None:
        """Plan a rollout of the family's newest usable version; None when no VM needs it."""
        self._family_exists(name, family)
        mu = parse_max_unavailable(max_unavailable or self.cfg.max_unavailable)
        if self.active(name, family) is not None:
            raise Conflict(f"family: {name}-{family} has a rollout in progress; see hvagent rollout status")
        target = self.catalog.resolve(Track(name, family, None))
        tv = Version.parse(target.version)
        vms = [v for v in self.followers(name, family) if Version.parse(v.version) < tv]
        if not vms:
            self.state.event("rollout.nothing", f"every VM on {name}-{family}.* already runs {target.version}")
            return None
        size = batch_size(mu, len(vms))
        steps = [(v.name, i // size, v.version) for i, v in enumerate(vms)]
        rid = self.state.add_rollout(name, family, target.version, mu, steps)
        self.state.event("rollout.start", f"{name}-{family}.* -> {target.version}: {len(vms)} VM(s) in "
                         f"{math.ceil(len(vms) / size)} batch(es) of at most {size}")
        row = self.state.rollout(rid)
        assert row is not None
        return row

    def on_publish(self, image: ImageRow, policy: Policy | None = None) -> RolloutRow | None:
        """The publish trigger: a new newest version starts a rollout (policy auto)."""
        newest = self.catalog.resolve(Track(image.name, image.family, None))
        if newest.version != image.version:
            self.state.event("rollout.none", f"{image.ref} is not the newest usable version of its family "
                             f"({newest.ref}); nothing moves")
            return None
        if not self.followers(image.name, image.family):
            return None
        if (policy or Policy(self.cfg.rollout_policy)) is Policy.MANUAL:
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
        names = []
        for s in (s for s in pending if s.batch == batch):
            vm = self.state.vm(s.vm)
            if vm is None or vm.track != str(Track(ro.name, ro.family, None)) or \
                    Version.parse(vm.version) >= Version.parse(ro.target):
                self.state.set_step(rid, s.vm, StepState.SKIPPED, reason="no longer on the track or newer")
                continue
            self.state.set_step(rid, s.vm, StepState.SWAPPING, started_at=self.clock())
            names.append(s.vm)
        if not names:
            return True
        t0 = self.clock()
        say(f"rollout {rid}, batch {batch + 1}: {', '.join(names)} -> {ro.target}")
        outcomes = self.swapper.swap_batch(names, target, say)
        failed = [o for o in outcomes if not o.ok]
        for o in outcomes:
            self.state.set_step(rid, o.vm, StepState.DONE if o.ok else StepState.ROLLED_BACK,
                                reason=o.reason or None, finished_at=self.clock(), downtime=o.downtime)
            say(f"{o.vm}: " + (f"on {o.to_version}, downtime {o.downtime:.1f}s" if o.ok
                               else f"rolled back to {o.from_version}: {o.reason}"))
        self.state.event("rollout.batch", f"rollout {rid} batch {batch + 1}: {len(outcomes) - len(failed)} "
                         f"swapped, {len(failed)} rolled back", duration=self.clock() - t0)
        if failed:
            reason = f"{failed[0].vm}: {failed[0].reason}"
            self.state.set_rollout(rid, RolloutState.HALTED, reason)
            self.state.event("rollout.halted", f"{ro.family_ref}.* -> {ro.target} halted: {reason}")
        return True

    def recover(self) -> None:
        """Steps a crash left ``swapping``: done if the VM reached the target, else pending again.

        Call after ``Swapper.recover`` has settled each VM (committed or rolled back).
        """
        in_flight = {it.target for it in self.state.pending() if it.op == "swap" and it.in_flight}
        for ro in self.state.rollouts(active_only=True):
            for s in self.state.steps(ro.id):
                if s.state is not StepState.SWAPPING or s.vm in in_flight:  # the latter: a live process's
                    continue
                vm = self.state.vm(s.vm)
                if vm is not None and vm.version == ro.target:
                    self.state.set_step(ro.id, s.vm, StepState.DONE, finished_at=self.clock())
                else:
                    self.state.set_step(ro.id, s.vm, StepState.PENDING)
                self.state.event("rollout.recovered", f"rollout {ro.id}: step of {s.vm} settled after a crash")

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
                say(f"{vm.name}: {image.ref} retired, moving to {target.ref}")
                [outcome] = self.swapper.swap_batch([vm.name], target, say)
                if outcome.ok:
                    self.state.update_vm(vm.name, track=f"{target.name}-{target.version}")
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
                Path(r.path).unlink(missing_ok=True)
                self.state.done(intent)
                removed.append(r.ref)
                self.state.event("image.gc", f"{r.ref}: unused and older than the newest {keep} of its family")
        return removed
