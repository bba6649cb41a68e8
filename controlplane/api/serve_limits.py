"""What ``healthflow serve`` bounds, with the defaults its flags show (a light module: the CLI imports it to build
its parser)."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import FatalError


@dataclass(frozen=True)
class ServeLimits:
    """What ``serve`` bounds: failed API-key checks (``limits`` strings, counted in ``throttle_storage``:
    ``memory://`` or a ``redis://`` URL shared by every API process), how often expired sessions and
    authorizations are purged, historical requests (days per request, workers, queued requests), and how long a
    webhook waits for the broker's acknowledgement before 503."""

    auth_failures_per_client: str = "20/minute"
    auth_failures_per_dev_id: str = "20/minute"
    throttle_storage: str = "memory://"
    purge_interval_s: float = 3600.0
    history_max_days: int = 365
    backfill_workers: int = 2
    backfill_queue: int = 32
    publish_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        problems = [f"{flag} must be {rule}, got {value!r}" for flag, value, ok, rule in (
            ("--purge-interval", self.purge_interval_s, self.purge_interval_s > 0, "a positive number of seconds"),
            ("--history-max-days", self.history_max_days, self.history_max_days >= 1, "at least 1"),
            ("--backfill-workers", self.backfill_workers, self.backfill_workers >= 1, "at least 1"),
            ("--backfill-queue", self.backfill_queue, self.backfill_queue >= 0, "0 or more"),
            ("--publish-timeout", self.publish_timeout_s, self.publish_timeout_s > 0, "a positive number of seconds"),
        ) if not ok]
        if problems:
            raise FatalError("; ".join(problems))
