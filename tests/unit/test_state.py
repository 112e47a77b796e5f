"""The state database: migration of an older database, events by identity and their retention,
counters that outlive retention, journal holders, and the host lock let go for a health wait."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.state import MIGRATIONS, HostLock, State, VmRow, VmState, holder_alive, holder_id

pytestmark = pytest.mark.unit

# The schema of the first release (before migration 1): events without identity, a journal without holders.
OLD_SCHEMA = """
CREATE TABLE vms (
  name TEXT PRIMARY KEY, owner TEXT NOT NULL, track TEXT NOT NULL,
  image TEXT NOT NULL, version TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
  uuid TEXT NOT NULL UNIQUE, mac TEXT NOT NULL UNIQUE, host_port INTEGER UNIQUE,
  instance_id TEXT NOT NULL, spec TEXT NOT NULL, spec_hash TEXT NOT NULL,
  created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, vm TEXT, kind TEXT NOT NULL,
  message TEXT NOT NULL, duration REAL
);
CREATE TABLE journal (
  id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, target TEXT NOT NULL,
  intent TEXT NOT NULL, started_at REAL NOT NULL
);
"""


def vm_row(name: str, owner: str, uuid: str, data_disk: int = 0) -> VmRow:
    return VmRow(name, owner, "tiny-1.*", "tiny", "1.0", VmState.RUNNING, None, uuid, f"52:54:00:00:00:{uuid[-2:]}",
                 None, f"{name}-1", {"data_disk": data_disk}, "h", 1.0, 1.0)


def test_an_old_database_is_migrated_once(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO vms VALUES ('db','alice','tiny-1.*','tiny','1.0','running',NULL,'u-1','m1',NULL,"
                "'i','{\"data_disk\": 1}','h',1,1)")
    old.executemany("INSERT INTO events (ts, vm, kind, message, duration) VALUES (?,?,?,?,?)",
                    [(1.0, "db", "swap.done", "", 4.0), (2.0, "db", "swap.done", "", 50.0),
                     (3.0, "gone", "vm.restarted", "", None), (4.0, None, "image.published", "", None)])
    old.commit()
    old.close()

    state = State(db)
    assert state.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert [(e.vm, e.owner, e.vm_uuid) for e in state.events()] == [
        ("db", "alice", "u-1"), ("db", "alice", "u-1"), ("gone", None, None), (None, None, None)]
    assert state.event_counts(("swap.done", "vm.restarted")) == {"swap.done": 2, "vm.restarted": 1}
    buckets, count, total = state.downtime_histogram()
    assert dict(buckets)[5.0] == 1 and dict(buckets)[60.0] == 2 and count == 2 and total == 54.0
    [disk] = state.disks()  # the VM's data disk, where its domain already has it
    assert (disk.owner, disk.name, disk.size_gib, disk.vm_uuid) == ("alice", "db", 1, "u-1")
    assert disk.path == str(tmp_path / "data" / "db.qcow2")
    state.close()
    again = State(db)  # a second open changes nothing
    assert len(again.disks()) == 1 and again.event_counts(("swap.done",))["swap.done"] == 2
    again.close()


def test_events_carry_the_vms_identity_and_a_reused_name_starts_blank(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    state.add_vm(vm_row("db", "alice", "u-a"))
    state.event("vm.failed", "alice's health output", vm="db")
    state.delete_vm("db")
    state.add_vm(vm_row("db", "bob", "u-b"))
    state.event("vm.running", "bob's", vm="db")
    assert [e.message for e in state.events("db", owner="bob")] == ["bob's"]
    assert [e.message for e in state.events("db", owner="alice")] == ["alice's health output"]
    assert [e.vm_uuid for e in state.events("db")] == ["u-a", "u-b"]


def test_retention_drops_old_and_surplus_events_but_counters_stay(tmp_path: Path) -> None:
    now = [1000.0]
    state = State(tmp_path / "state.db", clock=lambda: now[0])
    for i in range(10):
        now[0] = 1000.0 + i
        state.event("vm.restarted", f"{i}")
    assert state.prune_events(max_age=5.5, max_rows=100) == 4  # ts 1000..1003 are older than 1009 - 5.5
    assert state.prune_events(max_age=100, max_rows=3) == 3
    assert [e.message for e in state.events()] == ["7", "8", "9"]
    assert state.event_counts(("vm.restarted",)) == {"vm.restarted": 10}
    plan = state.db.execute("EXPLAIN QUERY PLAN SELECT * FROM events WHERE owner=? AND vm=? ORDER BY id DESC LIMIT 5",
                            ("a", "b")).fetchall()
    assert any("events_owner" in str(tuple(r)) for r in plan), [tuple(r) for r in plan]


def test_journal_entries_parked_by_a_live_process_are_not_orphans(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    a = state.begin("swap", "vm-a", {})
    b = state.begin("swap", "vm-b", {})
    state.park([a])
    assert [it.target for it in state.orphaned()] == ["vm-b"]  # not parked: a cut-short operation
    assert holder_alive(holder_id())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_holder = holder_id(os.getpid()).rsplit(":", 2)[0] + f":{dead.stdout.strip()}:123"
    assert not holder_alive(dead_holder)
    state.db.execute("UPDATE journal SET holder=? WHERE id=?", (dead_holder, a))
    assert {it.target for it in state.orphaned()} == {"vm-a", "vm-b"}  # its holder died mid-wait
    state.park([a], parked=False)
    state.done(b)
    assert [it.id for it in state.orphaned()] == [a]


def _free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_host_lock_is_let_go_only_inside_released(tmp_path: Path) -> None:
    lock = HostLock(tmp_path)
    with lock:
        with lock:  # nested holds in one thread are counted
            assert not _free(tmp_path / "lock")
        assert lock.held and not _free(tmp_path / "lock")
        with lock.released():
            assert not lock.held and _free(tmp_path / "lock")
        assert lock.held and not _free(tmp_path / "lock")
    assert not lock.held and _free(tmp_path / "lock")
    with lock.released():  # not held: nothing to let go of
        assert _free(tmp_path / "lock")


