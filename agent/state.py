"""State in one SQLite database: images, VMs, events and the intent journal.

Every multi-step operation writes its intent to the journal before it acts and clears it
when done, so a restart can finish or undo it (DESIGN.md invariant 6).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import Conflict, EnvError, one_line

# Every state change is an event; the daemon logs each as one logfmt line (the journal's view).
event_log = logging.getLogger("hvagent.event")

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
  name TEXT NOT NULL, version TEXT NOT NULL, family INTEGER NOT NULL, minor INTEGER NOT NULL,
  sha256 TEXT NOT NULL, path TEXT NOT NULL, virtual_size INTEGER NOT NULL,
  state TEXT NOT NULL, manifest TEXT NOT NULL, published_at REAL NOT NULL,
  PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS vms (
  name TEXT PRIMARY KEY, owner TEXT NOT NULL, track TEXT NOT NULL,
  image TEXT NOT NULL, version TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
  uuid TEXT NOT NULL UNIQUE, mac TEXT NOT NULL UNIQUE, host_port INTEGER UNIQUE,
  instance_id TEXT NOT NULL, spec TEXT NOT NULL, spec_hash TEXT NOT NULL,
  created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, vm TEXT, kind TEXT NOT NULL,
  message TEXT NOT NULL, duration REAL
);
CREATE TABLE IF NOT EXISTS disks (
  owner TEXT NOT NULL, name TEXT NOT NULL, size_gib INTEGER NOT NULL, path TEXT NOT NULL UNIQUE,
  vm_uuid TEXT UNIQUE, created_at REAL NOT NULL, PRIMARY KEY (owner, name)
);
CREATE TABLE IF NOT EXISTS counters (
  name TEXT PRIMARY KEY, value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retirements (
  name TEXT NOT NULL, version TEXT NOT NULL, retired_at REAL NOT NULL, grace_until REAL NOT NULL,
  policy TEXT NOT NULL, PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, family INTEGER NOT NULL,
  target TEXT NOT NULL, state TEXT NOT NULL, max_unavailable TEXT NOT NULL, reason TEXT,
  created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_vms (
  rollout INTEGER NOT NULL REFERENCES rollouts(id), vm TEXT NOT NULL, batch INTEGER NOT NULL,
  from_version TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, started_at REAL, finished_at REAL,
  downtime REAL, PRIMARY KEY (rollout, vm)
);
CREATE TABLE IF NOT EXISTS journal (
  id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, target TEXT NOT NULL,
  intent TEXT NOT NULL, started_at REAL NOT NULL
);
"""

# Schema changes after the first release, in order; PRAGMA user_version counts those applied.
MIGRATIONS = (
    # 1: events keyed by the VM's identity (UUID, owner), indexed; journal entries name their holder.
    """ALTER TABLE events ADD COLUMN vm_uuid TEXT;
    ALTER TABLE events ADD COLUMN owner TEXT;
    UPDATE events SET vm_uuid=(SELECT uuid FROM vms WHERE vms.name=events.vm),
                      owner=(SELECT owner FROM vms WHERE vms.name=events.vm) WHERE vm IS NOT NULL;
    CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id);
    CREATE INDEX IF NOT EXISTS events_owner ON events (owner, vm, id);
    CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
    ALTER TABLE journal ADD COLUMN holder TEXT;
    ALTER TABLE journal ADD COLUMN parked INTEGER NOT NULL DEFAULT 0;""",
    # 2: a rollout's canary boot (Canary): pending, running, passed, failed, or off (rollouts
    # planned before there were canaries count as off); whether it ignores maintenance windows.
    """ALTER TABLE rollouts ADD COLUMN canary TEXT NOT NULL DEFAULT 'off';
    ALTER TABLE rollouts ADD COLUMN ignore_windows INTEGER NOT NULL DEFAULT 0;""",
)

# Events counted for /metrics as they are written, so counts survive the events' retention and a
# scrape costs the same whatever the history's length.
COUNTED = ("swap.done", "swap.failed", "rollback.done", "rollback.failed", "vm.restarted", "vm.recreated")
DOWNTIME_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0)


class ImageState(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"
    BAD = "bad"


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"  # a swap failed and was rolled back
    ABORTED = "aborted"
    DONE = "done"

    @property
    def finished(self) -> bool:
        return self in (RolloutState.HALTED, RolloutState.ABORTED, RolloutState.DONE)


class StepState(StrEnum):
    PENDING = "pending"
    SWAPPING = "swapping"
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    SKIPPED = "skipped"


class VmState(StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    STOPPING = "stopping"  # a stop awaits its domain's power-off; its journal entry says what it was
    STOPPED = "stopped"
    SWAPPING = "swapping"
    ROLLING_BACK = "rolling-back"
    FAILED = "failed"
    DESTROYING = "destroying"


@dataclass(frozen=True)
class ImageRow:
    name: str
    version: str
    family: int
    minor: int
    sha256: str
    path: str
    virtual_size: int
    state: ImageState
    manifest: dict[str, Any]
    published_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class VmRow:
    name: str
    owner: str
    track: str
    image: str
    version: str
    state: VmState
    reason: str | None
    uuid: str
    mac: str
    host_port: int | None
    instance_id: str
    spec: dict[str, Any]
    spec_hash: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    vm: str | None
    kind: str
    message: str
    duration: float | None
    vm_uuid: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Retirement:
    name: str
    version: str
    retired_at: float
    grace_until: float
    policy: str  # "move" | "never"


@dataclass(frozen=True)
class RolloutRow:
    id: int
    name: str
    family: int
    target: str
    state: RolloutState
    max_unavailable: str
    reason: str | None
    created_at: float
    updated_at: float
    canary: str = "off"  # pending | running | passed | failed | off
    ignore_windows: bool = False  # `rollout start --now`: maintenance windows do not hold it

    @property
    def family_ref(self) -> str:
        return f"{self.name}-{self.family}"


@dataclass(frozen=True)
class StepRow:
    rollout: int
    vm: str
    batch: int
    from_version: str
    state: StepState
    reason: str | None
    started_at: float | None
    finished_at: float | None
    downtime: float | None


@dataclass(frozen=True)
class Intent:
    id: int
    op: str
    target: str
    intent: dict[str, Any]
    started_at: float
    holder: str | None = None  # the process that wrote it: boot id, pid, start time
    parked: bool = False  # its holder let go of the host lock for a health wait

    @property
    def in_flight(self) -> bool:
        """Parked by a process that still runs: that process finishes it; nobody else recovers it."""
        return self.parked and self.holder is not None and holder_alive(self.holder)


@dataclass(frozen=True)
class DiskRow:
    """A data disk. ``vm_uuid`` is the VM it is attached to; None while it is kept for its owner."""

    owner: str
    name: str
    size_gib: int
    path: str
    vm_uuid: str | None
    created_at: float

    @property
    def state(self) -> str:
        return "attached" if self.vm_uuid else "kept"


class State:
    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = db_path
        self.clock = clock
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            self.db.row_factory = sqlite3.Row
            self._migrate()
        except (OSError, sqlite3.Error) as e:
            raise EnvError(f"{db_path}: cannot open the state database ({e})",
                           hint="check that the state directory exists and is writable") from e

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
            return
        with self.tx() as db:  # each thread opens the database; the first one migrates it
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                if n == 1:
                    self._seed_counters_and_disks(db)
                db.execute(f"PRAGMA user_version={n}")  # n is ours, not input

    @staticmethod
    def _seed_counters_and_disks(db: sqlite3.Connection) -> None:
        """Migration 1: counters from the events so far; a disk row for each data disk a VM has."""
        marks = ",".join("?" * len(COUNTED))
        for kind, n in db.execute(f"SELECT kind, COUNT(*) FROM events WHERE kind IN ({marks}) GROUP BY kind",
                                  COUNTED).fetchall():
            db.execute("INSERT OR REPLACE INTO counters VALUES (?,?)", (f"events:{kind}", n))
        for (d,) in db.execute("SELECT duration FROM events WHERE kind='swap.done' AND duration IS NOT NULL"):
            _count_downtime(db, float(d))
        data_dir = None
        for r in db.execute("SELECT name, owner, uuid, spec, created_at FROM vms").fetchall():
            size = int(json.loads(r["spec"]).get("data_disk") or 0)
            if size and data_dir is None:
                data_dir = Path(db.execute("PRAGMA database_list").fetchone()["file"]).parent / "data"
            if size and data_dir is not None:
                # a disk of the old layout (data/NAME.qcow2) stays where its domain expects it
                db.execute("INSERT OR IGNORE INTO disks VALUES (?,?,?,?,?,?)",
                           (r["owner"], r["name"], size, str(data_dir / f"{r['name']}.qcow2"), r["uuid"],
                            r["created_at"]))

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # images
    def add_image(self, row: ImageRow) -> None:
        try:
            with self.tx() as db:
                db.execute(
                    "INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (row.name, row.version, row.family, row.minor, row.sha256, row.path,
                     row.virtual_size, row.state.value, json.dumps(row.manifest), row.published_at),
                )
        except sqlite3.IntegrityError as e:
            raise Conflict(f"image {row.ref}: already in the catalog") from e

    def images(self) -> list[ImageRow]:
        rows = self.db.execute("SELECT * FROM images ORDER BY name, family, minor").fetchall()
        return [self._image(r) for r in rows]

    def image(self, name: str, version: str) -> ImageRow | None:
        r = self.db.execute("SELECT * FROM images WHERE name=? AND version=?", (name, version)).fetchone()
        return self._image(r) if r else None

    def set_image_state(self, name: str, version: str, state: ImageState) -> None:
        self.db.execute("UPDATE images SET state=? WHERE name=? AND version=?", (state.value, name, version))

    def delete_image(self, name: str, version: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM retirements WHERE name=? AND version=?", (name, version))
            db.execute("DELETE FROM images WHERE name=? AND version=?", (name, version))

    @staticmethod
    def _image(r: sqlite3.Row) -> ImageRow:
        return ImageRow(r["name"], r["version"], r["family"], r["minor"], r["sha256"], r["path"],
                        r["virtual_size"], ImageState(r["state"]), json.loads(r["manifest"]),
                        r["published_at"])

    # VMs
    def add_vm(self, row: VmRow) -> None:
        try:
            with self.tx() as db:
                db.execute(
                    "INSERT INTO vms VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (row.name, row.owner, row.track, row.image, row.version, row.state.value, row.reason,
                     row.uuid, row.mac, row.host_port, row.instance_id, json.dumps(row.spec),
                     row.spec_hash, row.created_at, row.updated_at),
                )
        except sqlite3.IntegrityError as e:
            raise Conflict(f"vm {row.name}: already exists") from e

    def vms(self, owner: str | None = None) -> list[VmRow]:
        if owner is None:
            rows = self.db.execute("SELECT * FROM vms ORDER BY name").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM vms WHERE owner=? ORDER BY name", (owner,)).fetchall()
        return [self._vm(r) for r in rows]

    def vm(self, name: str) -> VmRow | None:
        r = self.db.execute("SELECT * FROM vms WHERE name=?", (name,)).fetchone()
        return self._vm(r) if r else None

    def update_vm(self, name: str, **fields: Any) -> None:
        allowed = {"state", "reason", "version", "instance_id", "spec", "spec_hash", "track", "host_port"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        values = [json.dumps(v) if k == "spec" else (v.value if isinstance(v, StrEnum) else v)
                  for k, v in fields.items()]
        sets = ", ".join(f"{k}=?" for k in fields)  # keys come from the allow-list above
        self.db.execute(f"UPDATE vms SET {sets}, updated_at=? WHERE name=?", (*values, self.clock(), name))

    def delete_vm(self, name: str) -> None:
        self.db.execute("DELETE FROM vms WHERE name=?", (name,))

    def used_ports(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT host_port FROM vms WHERE host_port IS NOT NULL")}

    @staticmethod
    def _vm(r: sqlite3.Row) -> VmRow:
        return VmRow(r["name"], r["owner"], r["track"], r["image"], r["version"], VmState(r["state"]),
                     r["reason"], r["uuid"], r["mac"], r["host_port"], r["instance_id"],
                     json.loads(r["spec"]), r["spec_hash"], r["created_at"], r["updated_at"])

    # events
    def event(self, kind: str, message: str, vm: str | None = None, duration: float | None = None, *,
              uuid: str | None = None, owner: str | None = None) -> None:
        """Record an event. One about a VM carries that VM's identity (its UUID and owner, looked up
        when not given), so its history never reaches a later VM of the same name."""
        message = one_line(message)  # names and guests' words in it reach terminals and logs
        if vm is not None and uuid is None:
            r = self.db.execute("SELECT uuid, owner FROM vms WHERE name=?", (vm,)).fetchone()
            if r is not None:
                uuid, owner = r["uuid"], r["owner"]
        with self.tx() as db:
            db.execute("INSERT INTO events (ts, vm, kind, message, duration, vm_uuid, owner) VALUES (?,?,?,?,?,?,?)",
                       (self.clock(), vm, kind, message, duration, uuid, owner))
            if kind in COUNTED:
                _count(db, f"events:{kind}", 1)
            if kind == "swap.done" and duration is not None:
                _count_downtime(db, duration)
        if event_log.isEnabledFor(logging.INFO):
            fields = {"event": kind, "vm": vm, "duration": f"{duration:.2f}" if duration is not None else None,
                      "msg": message}
            event_log.info(logfmt(fields))

    def events(self, vm: str | None = None, limit: int = 1000, owner: str | None = None) -> list[Event]:
        """The newest ``limit`` events, oldest first; of one VM name and/or one owner's VMs."""
        where, args = [], []
        if vm is not None:
            where.append("vm=?")
            args.append(vm)
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        q = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        rows = self.db.execute(q, (*args, limit)).fetchall()
        return [Event(r["id"], r["ts"], r["vm"], r["kind"], r["message"], r["duration"], r["vm_uuid"], r["owner"])
                for r in reversed(rows)]

    def prune_events(self, max_age: float, max_rows: int) -> int:
        """Drop events older than ``max_age`` seconds and beyond the newest ``max_rows``; how many."""
        with self.tx() as db:
            n = db.execute("DELETE FROM events WHERE ts < ?", (self.clock() - max_age,)).rowcount
            n += db.execute("DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                            (max_rows,)).rowcount
        return int(n)

    def event_counts(self, kinds: tuple[str, ...]) -> dict[str, int]:
        """How many events of each kind (of ``COUNTED``) were ever recorded, retention aside."""
        rows = dict(self.db.execute("SELECT name, value FROM counters WHERE name LIKE 'events:%'").fetchall())
        return {k: int(rows.get(f"events:{k}", 0)) for k in kinds}

    def downtime_histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Swap downtimes: cumulative counts per bucket bound, count and sum."""
        rows = dict(self.db.execute("SELECT name, value FROM counters WHERE name LIKE 'downtime:%'").fetchall())
        buckets = [(b, int(rows.get(f"downtime:le:{b}", 0))) for b in DOWNTIME_BUCKETS]
        return buckets, int(rows.get("downtime:count", 0)), float(rows.get("downtime:sum", 0.0))

    # disks
    def add_disk(self, row: DiskRow) -> None:
        try:
            self.db.execute("INSERT INTO disks VALUES (?,?,?,?,?,?)",
                            (row.owner, row.name, row.size_gib, row.path, row.vm_uuid, row.created_at))
        except sqlite3.IntegrityError as e:
            raise Conflict(f"disk {row.name} of {row.owner}: already exists") from e

    def disks(self, owner: str | None = None) -> list[DiskRow]:
        if owner is None:
            rows = self.db.execute("SELECT * FROM disks ORDER BY owner, name").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM disks WHERE owner=? ORDER BY name", (owner,)).fetchall()
        return [self._disk(r) for r in rows]

    def disk(self, owner: str, name: str) -> DiskRow | None:
        r = self.db.execute("SELECT * FROM disks WHERE owner=? AND name=?", (owner, name)).fetchone()
        return self._disk(r) if r else None

    def disk_of(self, vm_uuid: str) -> DiskRow | None:
        r = self.db.execute("SELECT * FROM disks WHERE vm_uuid=?", (vm_uuid,)).fetchone()
        return self._disk(r) if r else None

    def attach_disk(self, owner: str, name: str, vm_uuid: str | None) -> None:
        self.db.execute("UPDATE disks SET vm_uuid=? WHERE owner=? AND name=?", (vm_uuid, owner, name))

    def delete_disk(self, owner: str, name: str) -> None:
        self.db.execute("DELETE FROM disks WHERE owner=? AND name=?", (owner, name))

    @staticmethod
    def _disk(r: sqlite3.Row) -> DiskRow:
        return DiskRow(r["owner"], r["name"], r["size_gib"], r["path"], r["vm_uuid"], r["created_at"])

    # retirements
    def retire(self, r: Retirement) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO retirements VALUES (?,?,?,?,?)",
                       (r.name, r.version, r.retired_at, r.grace_until, r.policy))
            db.execute("UPDATE images SET state=? WHERE name=? AND version=? AND state=?",
                       (ImageState.RETIRED.value, r.name, r.version, ImageState.ACTIVE.value))

    def retirements(self) -> list[Retirement]:
        rows = self.db.execute("SELECT * FROM retirements ORDER BY name, retired_at").fetchall()
        return [Retirement(r["name"], r["version"], r["retired_at"], r["grace_until"], r["policy"]) for r in rows]

    def retirement(self, name: str, version: str) -> Retirement | None:
        return next((r for r in self.retirements() if (r.name, r.version) == (name, version)), None)

    # rollouts
    def add_rollout(self, name: str, family: int, target: str, max_unavailable: str,
                    steps: list[tuple[str, int, str]], canary: str = "off", ignore_windows: bool = False) -> int:
        now = self.clock()
        with self.tx() as db:
            cur = db.execute("INSERT INTO rollouts (name, family, target, state, max_unavailable, reason, created_at,"
                             " updated_at, canary, ignore_windows) VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (name, family, target, RolloutState.RUNNING.value, max_unavailable, None, now, now,
                              canary, int(ignore_windows)))
            rid = cur.lastrowid
            assert rid is not None
            db.executemany("INSERT INTO rollout_vms (rollout, vm, batch, from_version, state) VALUES (?,?,?,?,?)",
                           [(rid, vm, batch, frm, StepState.PENDING.value) for vm, batch, frm in steps])
        return rid

    def rollouts(self, active_only: bool = False) -> list[RolloutRow]:
        rows = self.db.execute("SELECT * FROM rollouts ORDER BY id").fetchall()
        out = [RolloutRow(r["id"], r["name"], r["family"], r["target"], RolloutState(r["state"]),
                          r["max_unavailable"], r["reason"], r["created_at"], r["updated_at"], r["canary"],
                          bool(r["ignore_windows"])) for r in rows]
        return [r for r in out if not r.state.finished] if active_only else out

    def rollout(self, rid: int) -> RolloutRow | None:
        return next((r for r in self.rollouts() if r.id == rid), None)

    def set_rollout_reason(self, rid: int, reason: str | None) -> None:
        self.db.execute("UPDATE rollouts SET reason=?, updated_at=? WHERE id=?", (reason, self.clock(), rid))

    def set_canary(self, rid: int, canary: str) -> None:
        self.db.execute("UPDATE rollouts SET canary=?, updated_at=? WHERE id=?", (canary, self.clock(), rid))

    def set_rollout(self, rid: int, state: RolloutState, reason: str | None = None) -> None:
        self.db.execute("UPDATE rollouts SET state=?, reason=COALESCE(?, reason), updated_at=? WHERE id=?",
                        (state.value, reason, self.clock(), rid))

    def steps(self, rid: int) -> list[StepRow]:
        rows = self.db.execute("SELECT * FROM rollout_vms WHERE rollout=? ORDER BY batch, vm", (rid,)).fetchall()
        return [StepRow(r["rollout"], r["vm"], r["batch"], r["from_version"], StepState(r["state"]), r["reason"],
                        r["started_at"], r["finished_at"], r["downtime"]) for r in rows]

    def set_step(self, rid: int, vm: str, state: StepState, **fields: Any) -> None:
        allowed = {"reason", "started_at", "finished_at", "downtime"}
        if not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        sets = "".join(f", {k}=?" for k in fields)  # keys come from the allow-list above
        self.db.execute(f"UPDATE rollout_vms SET state=?{sets} WHERE rollout=? AND vm=?",
                        (state.value, *fields.values(), rid, vm))

    # journal
    def begin(self, op: str, target: str, intent: dict[str, Any]) -> int:
        cur = self.db.execute("INSERT INTO journal (op, target, intent, started_at, holder) VALUES (?,?,?,?,?)",
                              (op, target, json.dumps(intent), self.clock(), holder_id()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def advance(self, intent_id: int, **fields: Any) -> None:
        """Record in an open entry how far its operation got (merged into its intent), before the
        operation takes that step, so recovery knows what it has to undo."""
        with self.tx() as db:
            r = db.execute("SELECT intent FROM journal WHERE id=?", (intent_id,)).fetchone()
            if r is None:
                raise ValueError(f"journal entry {intent_id} is not open")
            db.execute("UPDATE journal SET intent=? WHERE id=?", (json.dumps(json.loads(r["intent"]) | fields),
                                                                  intent_id))

    def done(self, intent_id: int) -> None:
        self.db.execute("DELETE FROM journal WHERE id=?", (intent_id,))

    def park(self, ids: list[int], parked: bool = True) -> None:
        """Mark entries this process is about to finish without the host lock (a health wait), or
        has the lock back for; it becomes their holder (recovery adopts a dead process's entries)."""
        me = holder_id()
        self.db.executemany("UPDATE journal SET parked=?, holder=? WHERE id=?", [(int(parked), me, i) for i in ids])

    def pending(self) -> list[Intent]:
        """Every open entry, those in flight in a live process included."""
        rows = self.db.execute("SELECT * FROM journal ORDER BY id").fetchall()
        return [Intent(r["id"], r["op"], r["target"], json.loads(r["intent"]), r["started_at"], r["holder"],
                       bool(r["parked"])) for r in rows]

    def orphaned(self) -> list[Intent]:
        """Open entries that no live process is finishing: what recovery finishes or undoes."""
        return [it for it in self.pending() if not it.in_flight]


def _count(db: sqlite3.Connection, name: str, by: float) -> None:
    db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value",
               (name, by))


def _count_downtime(db: sqlite3.Connection, seconds: float) -> None:
    for b in DOWNTIME_BUCKETS:
        if seconds <= b:
            _count(db, f"downtime:le:{b}", 1)
    _count(db, "downtime:count", 1)
    _count(db, "downtime:sum", seconds)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the
    boot id and the pid, it names one process even after its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def holder_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{pid}:{_start_time(pid)}"


def holder_alive(holder: str) -> bool:
    boot, _, rest = holder.partition(":")
    pid, _, start = rest.partition(":")
    return boot == _boot_id() and pid.isdigit() and start != "None" and _start_time(int(pid)) == start


def logfmt(fields: dict[str, str | None]) -> str:
    """``key=value key="value with spaces"``: one line (controls escaped), quoted only where needed."""
    def value(v: str) -> str:
        v = one_line(v)
        return json.dumps(v) if not v or any(c in v for c in ' ="') else v
    return " ".join(f"{k}={value(v)}" for k, v in fields.items() if v is not None)


@contextlib.contextmanager
def host_lock(state_dir: Path) -> Iterator[None]:
    """Serialize mutating commands on one host (CLI against CLI, CLI against daemon)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class HostLock:
    """The host lock of one thread's ``Host`` (its own open file, so threads exclude each other).

    ``with lock:`` takes it (nested uses in one thread are counted); ``released()`` lets go of it
    for a wait that a tenant controls (a guest's health) and takes it back afterwards.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> HostLock:
        if self._depth == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        self._depth += 1
        return self

    def __exit__(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Without the lock for the block, if it is held; then held again as before."""
        if self._fd is None:
            yield
            return
        depth, self._depth = self._depth, 1
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()
            self._depth = depth
