"""Connection lifecycle events (auth, auth_cancelled, deauth, user_reauth, access_revoked) to every
destination, like data events: the same sinks, signatures, retries and dead letters.

The control plane writes each event to its outbox in the transaction that changes the connection,
then hands it to ``LifecycleDelivery.emit``. Delivery is synchronous: when every destination took
the event (or it was dead-lettered for replay), ``emit`` returns; if it raises (a misconfigured
destination), the event stays in the outbox and ``ControlPlane.flush_events()`` offers it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from core.dead_letters import write_dead_letter
from core.events import NormalizedEvent
from sinks.policy import Target
from transforms.deliver import DeadLettered, Delivery


class LifecycleDelivery:
    """``emit(event)`` for ``ControlPlane``: delivers one lifecycle event to ``targets``."""

    def __init__(self, targets: Sequence[Target], dead_letter_root: str) -> None:
        self.targets = [t for t in targets]
        self.dead_letter_root = dead_letter_root
        self._lock = threading.Lock()  # sinks are not shared across threads: one delivery at a time
        self._opened = False
        self.delivered = 0
        self.dead_lettered = 0

    def _open(self) -> None:
        if not self._opened:
            for target in self.targets:
                target.sink.open()
            self._opened = True

    def close(self) -> None:
        with self._lock:
            if self._opened:
                for target in self.targets:
                    target.sink.close()
                self._opened = False

    def emit(self, event: dict[str, Any]) -> None:
        normalized = NormalizedEvent.lifecycle(event, int(time.time() * 1000))
        with self._lock:
            self._open()
            for target in self.targets:
                if target.event_types is not None and normalized.type not in target.event_types:
                    continue
                for outcome in Delivery(target).deliver([normalized]):
                    if isinstance(outcome, DeadLettered):
                        write_dead_letter(self.dead_letter_root, outcome.record)
                        self.dead_lettered += 1
                    else:
                        self.delivered += 1
