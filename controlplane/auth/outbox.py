"""The lifecycle-event outbox (table ``auth_events``): an event is written in the transaction that changes the state
it describes (``add``), then handed to ``emit`` (``deliver``); ``flush`` offers again what a failing ``emit`` did not
take."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from controlplane.auth.model import Emit
from controlplane.auth.tables import Tables
from core.store import now_ms

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, tables: Tables, emit: Emit | None = None) -> None:
        self.tables, self.emit = tables, emit

    def ddl(self, json_type: str) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {self.tables.events} (event_id TEXT PRIMARY KEY, created_at_ms BIGINT "
                f"NOT NULL, body {json_type} NOT NULL, emitted_at_ms BIGINT)"]

    def add(self, cur: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Write ``event`` inside the caller's transaction; returns what ``deliver`` takes once it committed."""
        event_id = uuid.uuid4().hex
        cur.execute(f"INSERT INTO {self.tables.events} (event_id, created_at_ms, body) VALUES (?, ?, ?)",
                    [event_id, now_ms(), json.dumps(event, separators=(",", ":"))])
        return {"event_id": event_id, "event": event}

    def deliver(self, pending: list[dict[str, Any]]) -> int:
        if self.emit is None:
            return 0
        done = 0
        for item in pending:
            try:
                self.emit(item["event"])
            except Exception:
                log.exception("emit failed for a %s event; kept in the outbox for flush_events()",
                              item["event"].get("type"))
                continue
            self.tables.store.execute(f"UPDATE {self.tables.events} SET emitted_at_ms = ? WHERE event_id = ?",
                                      [now_ms(), item["event_id"]])
            done += 1
        return done

    def flush(self) -> int:
        """Hand over events a failing ``emit`` did not take, oldest first; returns how many were taken."""
        store = self.tables.store
        rows = store.query(f"SELECT event_id, body FROM {self.tables.events} WHERE emitted_at_ms IS NULL "
                           "ORDER BY created_at_ms, event_id")
        return self.deliver([{"event_id": eid, "event": store.load_json(body)} for eid, body in rows])

    def purge(self, cur: Any, cutoff: int) -> None:
        """Delete events emitted before ``cutoff``."""
        cur.execute(f"DELETE FROM {self.tables.events} WHERE emitted_at_ms IS NOT NULL AND emitted_at_ms < ?", [cutoff])
