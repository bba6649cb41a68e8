"""Housekeeping for a running server: ``purge_expired`` at start and then every ``interval_s`` on a daemon thread.

    with Housekeeping(control_plane, interval_s=3600).start():
        ...  # serve

A purge that fails (the store is down) is logged and tried again at the next interval; it never stops the server.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from core.errors import FatalError

log = logging.getLogger(__name__)


class Purges(Protocol):
    def purge_expired(self, older_than_s: float = ...) -> int: ...


class Housekeeping:
    def __init__(self, control_plane: Purges, interval_s: float = 3600.0, older_than_s: float = 86_400.0) -> None:
        if not interval_s > 0:
            raise FatalError(f"the purge interval must be a positive number of seconds, got {interval_s!r}")
        self.control_plane, self.interval_s, self.older_than_s = control_plane, interval_s, older_than_s
        self.runs = 0  # purges done (or attempted), for tests and metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int | None:
        """One purge; returns how many pending connections went, None when it failed (logged)."""
        try:
            purged = self.control_plane.purge_expired(self.older_than_s)
        except Exception as exc:  # the store may be down for a while: try again next interval
            log.warning("purging expired sessions and authorizations failed (tried again in %g s): %s",
                        self.interval_s, exc)
            return None
        finally:
            self.runs += 1
        if purged:
            log.info("purged expired sessions and authorizations; %d pending connections never completed", purged)
        return purged

    def start(self) -> Housekeeping:
        self._thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            self.run_once()
            if self._stop.wait(self.interval_s):
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> Housekeeping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
