"""Named fault points: where a test may kill hvagent with SIGKILL mid-operation.

Test-only: nothing happens unless the environment names a point in ``HVAGENT_FAULT_POINT``.
Every multi-step operation calls ``point(name)`` between its steps; the crash tests kill at each
point, start hvagent again and check that it converges (RELIABILITY.md).
"""

from __future__ import annotations

import os
import signal

ENV = "HVAGENT_FAULT_POINT"

POINTS: tuple[str, ...] = (
    # provision: journal, row, overlay, seed, data disk, domain, started
    "provision.journaled", "provision.row", "provision.overlay", "provision.seed", "provision.data-disk",
    "provision.defined", "provision.started",
    # destroy
    "destroy.journaled", "destroy.domain-gone", "destroy.files-gone",
    # purge of a kept data disk
    "purge-disk.journaled", "purge-disk.file-gone",
    # publish
    "publish.copied", "publish.checked", "publish.linked", "publish.recorded",
    # swap (one VM of a rollout) and its rollback
    "swap.journaled", "swap.prepared", "swap.shutoff", "swap.defined", "swap.started", "swap.parked",
    "swap.committed",
    "rollback.marked", "rollback.defined",
    # retirement and garbage collection
    "retire.recorded", "gc.journaled", "gc.row-deleted",
)


def point(name: str) -> None:
    """Die here, at once and without cleanup, if the test-only setting names this point."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
