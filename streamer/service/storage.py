"""Stored events: rule rounds, alerts and stream status changes in SQLite, and the delivery
state of each webhook, so history and undelivered events survive a restart.

Guarantees:

- an event is stored with its webhook deliveries in one transaction: after a crash
  (``kill -9``) it is there with all of them, or not at all; ``id`` is UNIQUE, so no id is
  ever stored twice;
- the database runs in WAL mode with ``synchronous=NORMAL``: a process killed at any point
  loses nothing committed (a power cut may lose the last transactions, never corrupt);
- retention by age and by count runs after writes, at most once a :data:`PRUNE_EVERY_S`;
- every method blocks on disk: call them off the event loop (a thread, ``asyncio.to_thread``).
  One connection behind a lock serves every thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

EventKind = Literal["round", "alert", "status"]
EVENT_KINDS: tuple[EventKind, ...] = ("round", "alert", "status")
PRUNE_EVERY_S = 60.0
FILE_NAME = "events.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    stream TEXT NOT NULL,
    rule TEXT,
    body TEXT NOT NULL,
    thumbnail BLOB
);
CREATE INDEX IF NOT EXISTS events_stream ON events (stream, seq);
CREATE INDEX IF NOT EXISTS events_rule ON events (rule, seq);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    PRIMARY KEY (event_id, target)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, state, next_at);
CREATE TABLE IF NOT EXISTS api_rules (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class EventRecord:
    """One stored event. ``body`` is its public JSON (what the API returns and webhooks and
    MQTT send), fixed once made so every delivery carries the same bytes."""

    id: str
    kind: EventKind
    time: float
    stream: str
    rule: str | None
    text: str
    frames: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    matched: str | None = None
    thumbnail: bytes | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "time": self.time,
            "stream": self.stream,
            "rule": self.rule,
            "text": self.text,
            "matched": self.matched,
            "frames": self.frames,
            "timings": self.timings,
            "thumbnail": f"/api/events/{self.id}/thumbnail.jpg" if self.thumbnail else None,
        }

    def body(self) -> str:
        return json.dumps(self.public(), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Delivery:
    event_id: str
    target: str
    attempts: int
    time: float
    body: str


class EventStore:
    """``events.db`` in ``directory`` (created if missing)."""

    def __init__(self, directory: Path, *, max_age_days: float, max_count: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        self.max_age_s = max_age_days * 86400
        self.max_count = max_count
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._pruned_at = 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- events --------------------------------------------------------------------------

    def add(self, record: EventRecord, targets: list[str] = ()) -> None:  # type: ignore[assignment]
        """Store ``record`` and a pending delivery to each of ``targets``, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO events (id, kind, time, stream, rule, body, thumbnail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.id, record.kind, record.time, record.stream, record.rule, record.body(), record.thumbnail),
                )
                self._db.executemany(
                    "INSERT INTO deliveries (event_id, target, next_at) VALUES (?, ?, ?)",
                    [(record.id, t, record.time) for t in targets],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                self._prune()

    def prune(self) -> int:
        """Apply retention now; returns how many events were deleted."""
        with self._lock:
            return self._prune()

    def _prune(self) -> int:
        self._pruned_at = time.monotonic()
        cur = self._db.execute("DELETE FROM events WHERE time < ?", (time.time() - self.max_age_s,))
        deleted = cur.rowcount
        cur = self._db.execute(
            "DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (self.max_count,),
        )
        return deleted + cur.rowcount

    def page(
        self,
        *,
        stream: str | None = None,
        rule: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Events newest first, filtered; ``before`` is the cursor (the last id of the page
        before). Returns the events' public JSON and the next cursor (None: no more)."""
        where, args = [], []
        for column, value in (("stream", stream), ("rule", rule), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        with self._lock:
            if before is not None:
                row = self._db.execute("SELECT seq FROM events WHERE id = ?", (before,)).fetchone()
                if row is None:
                    raise KeyError(before)
                where.append("seq < ?")
                args.append(row[0])
            sql = "SELECT id, body FROM events"
            if where:
                sql += " WHERE " + " AND ".join(where)
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [json.loads(body) for _, body in rows], (rows[-1][0] if more and rows else None)

    def thumbnail(self, event_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT thumbnail FROM events WHERE id = ?", (event_id,)).fetchone()
        return row[0] if row is not None else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    # -- deliveries ----------------------------------------------------------------------

    def due(self, target: str, now: float, limit: int = 50) -> list[Delivery]:
        """Pending deliveries to ``target`` whose next attempt is due, oldest event first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT d.event_id, d.attempts, e.time, e.body FROM deliveries d JOIN events e ON e.id = d.event_id "
                "WHERE d.target = ? AND d.state = 'pending' AND d.next_at <= ? ORDER BY e.seq LIMIT ?",
                (target, now, limit),
            ).fetchall()
        return [Delivery(r[0], target, r[1], r[2], r[3]) for r in rows]

    def next_due(self, target: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT min(next_at) FROM deliveries WHERE target = ? AND state = 'pending'", (target,)
            ).fetchone()
        return row[0]

    def delivered(self, delivery: Delivery) -> None:
        self._set(delivery, "done", delivery.attempts + 1, 0.0, None)

    def failed(self, delivery: Delivery, *, next_at: float | None, error: str) -> None:
        """One attempt failed: try again at ``next_at``, or (None) give up: the delivery is dead."""
        state = "pending" if next_at is not None else "dead"
        self._set(delivery, state, delivery.attempts + 1, next_at or 0.0, error[:500])

    def _set(self, d: Delivery, state: str, attempts: int, next_at: float, error: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, last_error = ? "
                "WHERE event_id = ? AND target = ?",
                (state, attempts, next_at, error, d.event_id, d.target),
            )

    def delivery_counts(self, target: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, count(*) FROM deliveries WHERE target = ? GROUP BY state", (target,)
            ).fetchall()
        return {state: n for state, n in rows}

    # -- rules made over the API ---------------------------------------------------------

    def api_rules(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM api_rules ORDER BY created").fetchall()
        return [json.loads(body) for (body,) in rows]

    def save_rule(self, name: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO api_rules (name, body, created) VALUES (?, ?, ?)", (name, json.dumps(body), time.time())
            )

    def delete_rule(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM api_rules WHERE name = ?", (name,)).rowcount > 0
