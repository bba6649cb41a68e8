"""Connection lifecycle events in Terra's shapes (data-model.md §4.1/§4.2).

They are written to the control plane's outbox in the same transaction as the state change they
describe, then handed to the ``emit(event)`` callback; ``ControlPlane.flush_events()`` hands over
again whatever a failing callback did not take.
"""

from __future__ import annotations

import threading
from typing import Any

from schemas import DATA_MODEL_VERSION

Event = dict[str, Any]


def auth_success(user: dict[str, Any], widget_session_id: str | None, flow_id: str) -> Event:
    return {"type": "auth", "status": "success", "user": user, "reference_id": user.get("reference_id"),
            "widget_session_id": widget_session_id, "flow_id": flow_id,
            "message": "User has successfully authenticated", "version": DATA_MODEL_VERSION}


def auth_cancelled(reason: str, provider: str, reference_id: str | None, widget_session_id: str | None,
                   flow_id: str, message: str) -> Event:
    return {"type": "auth_cancelled", "status": "error", "reason": reason, "provider": provider,
            "reference_id": reference_id, "widget_session_id": widget_session_id, "flow_id": flow_id,
            "message": message, "version": DATA_MODEL_VERSION}


def deauth(user: dict[str, Any]) -> Event:
    return {"type": "deauth", "status": "success", "user": user, "message": "User has deauthenticated",
            "version": DATA_MODEL_VERSION}


def user_reauth(new_user: dict[str, Any], old_user: dict[str, Any]) -> Event:
    return {"type": "user_reauth", "status": "warning", "new_user": new_user, "old_user": old_user,
            "message": "User has reauthenticated: the same provider account is now connected under new_user",
            "version": DATA_MODEL_VERSION}


def access_revoked(user: dict[str, Any], message: str) -> Event:
    return {"type": "access_revoked", "status": "warning", "user": user, "message": message,
            "version": DATA_MODEL_VERSION}


class MemoryCollector:
    """An ``emit`` callback keeping events in memory (tests, demos); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of_type(self, kind: str) -> list[Event]:
        with self._lock:
            return [event for event in self.events if event["type"] == kind]

    def clear(self) -> None:
        with self._lock:
            self.events.clear()
