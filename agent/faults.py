"""Named fault points: where a test may kill hvagent with SIGKILL, or make it fail, mid-operation.

Test-only: nothing happens unless the environment names a point in ``HVAGENT_FAULT_POINT``.
Every multi-step operation calls ``point(name)`` between its steps; the crash tests kill at each
point, start hvagent again and check that it converges (RELIABILITY.md). ``NAME:error`` raises
an ``EnvError`` at that point instead, as a libvirt call that fails there would, so a test sees
how the operation fails while the process lives on.
"""

from __future__ import annotations

import os
import signal

from agent.errors import EnvError

ENV = "HVAGENT_FAULT_POINT"

POINTS: tuple[str, ...] = (
    # provision: journal, row, overlay, seed, data disk, domain, started
    "provision.journaled", "provision.row", "provision.overlay", "provision.seed", "provision.data-disk",
    "provision.defined", "provision.started",
    # destroy
    "destroy.journaled", "destroy.domain-gone", "destroy.files-gone",
    # purge of a kept data disk
    "purge-disk.journaled", "purge-disk.file-gone",
    # publish, and the rollout it triggers (the image recorded, its rollout not yet planned)
    "publish.copied", "publish.checked", "publish.linked", "publish.recorded", "rollout.trigger",
    # swap (one VM of a rollout) and its rollback
    "swap.journaled", "swap.prepared", "swap.shutoff", "swap.defined", "swap.started", "swap.parked",
    "swap.committed",
    "rollback.marked", "rollback.defined",
    # a rollout's canary boot
    "canary.started",
    # retirement (a pinned VM's move: swapped, its event not yet written) and garbage collection
    "retire.recorded", "retire.moved", "gc.journaled", "gc.row-deleted",
    # a key pair: the first of its two files in place
    "keypair.first-written",
    # a tenant's stop: journaled and marked stopping, the host lock let go, the guest not yet asked
    "stop.journaled",
)


def point(name: str) -> None:
    """Die here, at once and without cleanup, if the test-only setting names this point (or, with
    ``:error``, raise the error a failing libvirt call would)."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    wanted, _, action = os.environ.get(ENV, "").partition(":")
    if wanted != name:
        return
    if action == "error":
        raise EnvError(f"fault point {name}: injected failure (test-only {ENV})")
    os.kill(os.getpid(), signal.SIGKILL)
