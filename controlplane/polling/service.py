"""Polling the control plane's connections: tokens from the auth layer, refreshed on a 401.

    service = ConnectionPolling(control_plane, poller)
    service.poll_once()            # every active connection × pollable kind, once
    service.scheduler().start()    # the same, every 15 minutes with jitter

A 401 (``TokenRejected``) forces a token refresh and retries that poll once with the new token;
a refresh the provider refuses marks the connection revoked (``access_revoked`` event) and it is
no longer polled. Historical requests (``backfill``) refresh the same way; each covers at most
``max_backfill_days`` and runs on a bounded work queue (``backfill_workers`` threads, at most ``backfill_queue``
requests waiting; beyond that ``backfill`` raises ``QueueFull`` at once).

Push providers (``webhooks.mode: push``, Garmin) are never polled; their manifest endpoints are
backfill *requests*: each window is asked for separately, the provider answers 202 with an empty
body (nothing is published by the request itself) and later pushes the data to the webhook, where
it is published like any other push. 409 (this window was already requested) is not an error. The
pushed data carries nothing that ties it to the request, so it is delivered as normal data, without
``terra-reference``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from controlplane.auth.control_plane import ConnectionInactive, ConnectionRevoked, ControlPlane
from controlplane.polling.poller import Poller, PollResult, PollTarget, ProviderRefused, TokenRejected, windows
from controlplane.polling.ratelimit import Cancelled
from controlplane.polling.scheduler import Scheduler
from core.errors import FatalError, HealthflowError, PermanentError, RetryableError
from core.workqueue import BoundedExecutor

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class PollReport:
    results: list[PollResult] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (user_id, kind, reason): retried next round
    retryable: int = 0  # how many of ``failed`` were transient (provider down, rate limited, network)


MAX_BACKFILL_DAYS = 365  # what one historical request may cover (peers allow up to 365 days)


class BackfillTooLong(PermanentError):
    """A historical request covers more days than allowed."""


class ConnectionPolling:
    def __init__(self, control_plane: ControlPlane, poller: Poller,
                 kinds: Callable[[PollTarget], list[str]] | None = None, *,
                 max_backfill_days: int = MAX_BACKFILL_DAYS, backfill_workers: int = 2,
                 backfill_queue: int = 32) -> None:
        """``kinds`` chooses what to poll per connection (default: every pollable kind of its provider);
        ``max_backfill_days``, ``backfill_workers`` and ``backfill_queue`` bound historical requests."""
        self.control_plane, self.poller = control_plane, poller
        self.kinds = kinds or self.pollable_kinds
        if max_backfill_days < 1:
            raise FatalError(f"max_backfill_days must be at least 1, got {max_backfill_days}")
        self.max_backfill_days = max_backfill_days
        self._backfills = BoundedExecutor("backfill", backfill_workers, backfill_queue, retry_after_s=30)

    def targets(self) -> list[PollTarget]:
        return list(self.control_plane.active_connections())

    def access_token(self, connection: PollTarget) -> str:
        return self.control_plane.access_token(connection.user_id)

    def pushed(self, provider: str) -> bool:
        """Whether the provider pushes its data (Garmin): never polled, its endpoints are backfill requests."""
        hooks = self.poller.manifest(provider).webhooks
        return hooks is not None and hooks.mode == "push"

    def pollable_kinds(self, connection: PollTarget) -> list[str]:
        if self.pushed(connection.provider):
            return []  # pushed to us (Garmin): nothing to poll
        return self.poller.kinds(connection.provider)

    def poll(self, connection: PollTarget, kind: str, report: PollReport) -> None:
        """One poll from the live cursor, through ``attempt``."""
        self.attempt(connection, kind, report,
                     lambda: self.poller.poll(connection, kind, lambda: self.access_token(connection)))

    def attempt(self, connection: PollTarget, kind: str, report: PollReport, fetch: Callable[[], PollResult]) -> None:
        """``fetch()`` (a poll, or a fetch of a notified window); on a 401, refresh the token (serialized per
        connection) and try once more; a refused refresh puts the connection in ``report.revoked``.

        Any other failure of this connection and kind (rate limited, provider down, a 4xx, a second 401, a refresh
        that failed for now) is recorded in ``report.failed`` and the caller goes on with the next one: no cursor
        moved past what failed, so the next round asks again. Only ``FatalError`` (our configuration) propagates.
        """
        try:
            try:
                report.results.append(fetch())
                return
            except TokenRejected:
                try:
                    self.control_plane.refresh(connection.user_id, force=True)
                except (ConnectionRevoked, ConnectionInactive) as exc:
                    log.warning("connection %s no longer polled: %s", connection.user_id, exc)
                    report.revoked.append(connection.user_id)
                    return
                report.refreshed.append(connection.user_id)
            report.results.append(fetch())
        except (FatalError, Cancelled):
            raise
        except HealthflowError as exc:
            log.warning("fetch of %s %s failed (asked again next round): %s", connection.user_id, kind, exc)
            report.failed.append((connection.user_id, kind, f"{type(exc).__name__}: {exc}"))
            report.retryable += isinstance(exc, RetryableError)

    def poll_once(self) -> PollReport:
        report = PollReport()
        for connection in self.targets():
            for kind in self.kinds(connection):
                if connection.user_id in report.revoked:
                    break
                self.poll(connection, kind, report)
        return report

    def on_error(self, connection: PollTarget, kind: str, error: BaseException) -> None:
        """The scheduler's error hook: refresh on a 401 (the next round uses the new token)."""
        if isinstance(error, TokenRejected):
            try:
                self.control_plane.refresh(connection.user_id, force=True)
            except (ConnectionRevoked, ConnectionInactive) as exc:
                log.warning("connection %s no longer polled: %s", connection.user_id, exc)
        else:
            log.warning("poll of %s %s failed: %s", connection.user_id, kind, error)

    def backfill_kinds(self, provider: str, model_type: str) -> list[str]:
        """The provider's endpoint kinds that feed ``model_type`` (e.g. Oura sleep, daily_sleep for sleep;
        Garmin's backfill endpoints for push providers)."""
        from connectors import registry

        mapped = registry()[provider].kinds
        return [k for k in self.poller.kinds(provider) if k in mapped and model_type in mapped[k].models]

    def backfill(self, user_id: str, model_type: str, start: datetime, end: datetime) -> tuple[str, list[str]]:
        """Queue a historical request; returns its reference and the kinds it reads. Raises ``BackfillTooLong``
        beyond ``max_backfill_days`` and ``QueueFull`` (with ``retry_after``) when the work queue is full.

        Pull providers: every kind is fetched in its endpoint's ``max_days`` windows at low priority
        (live polls always go first), published with the reference, and delivered with
        ``terra-reference``. Push providers: every window (``max_days``, capped at now) is requested
        once, at low priority; the data arrives later by push, as normal data (see the module
        docstring). Either way a 401 refreshes the token and retries once; a window already done
        (cursor) is not asked again, so a repeated request resumes where the last one stopped.
        """
        if end - start > timedelta(days=self.max_backfill_days):
            raise BackfillTooLong(f"a historical request covers at most {self.max_backfill_days} days and "
                                  f"{start.date()} to {end.date()} is {(end - start).days} days: split it into "
                                  "several requests")
        connection = self.control_plane.connection(user_id)
        kinds = self.backfill_kinds(connection.provider, model_type)
        reference = str(uuid.uuid4())
        pushed = self.pushed(connection.provider)

        def run() -> None:
            for kind in kinds:
                try:
                    if pushed:
                        self._request_windows(connection, kind, start, end, reference)
                    else:
                        self._refreshing(connection, lambda kind=kind: self.poller.backfill(
                            connection, kind, start, end, lambda: self.access_token(connection), reference=reference))
                except (ConnectionRevoked, ConnectionInactive) as exc:
                    log.warning("backfill %s of %s stopped: %s", reference, user_id, exc)
                    return
                except Exception as exc:  # reported, and the cursor lets a repeated request resume
                    log.warning("backfill %s of %s %s failed: %s", reference, user_id, kind, exc)

        if kinds:
            self._backfills.submit(run)
        return reference, kinds

    @property
    def backfills_in_flight(self) -> int:
        """Historical requests running or waiting."""
        return self._backfills.in_flight

    def close(self) -> None:
        """Stop taking historical requests; queued ones are dropped (a repeated request resumes from its cursor)."""
        self._backfills.close()

    def _refreshing(self, connection: PollTarget, call: Callable[[], T]) -> T:
        """``call()``; on a 401, refresh the token (serialized per connection) and call once more."""
        try:
            return call()
        except TokenRejected:
            self.control_plane.refresh(connection.user_id, force=True)
        return call()

    def _request_windows(self, connection: PollTarget, kind: str, start: datetime, end: datetime,
                         reference: str) -> list[PollResult]:
        """A push provider's backfill: one request per window; 409 (already requested) counts as done."""
        manifest = self.poller.manifest(connection.provider)
        assert manifest.api is not None
        done = []
        end = min(end.astimezone(UTC), self.poller.clock().astimezone(UTC))
        for window_start, window_end in windows(manifest.api.endpoints[kind], start.astimezone(UTC), end):
            try:
                done.append(self._refreshing(connection, lambda s=window_start, e=window_end: self.poller.backfill(
                    connection, kind, s, e, lambda: self.access_token(connection), reference=reference)))
            except ProviderRefused as exc:
                if exc.status != 409:
                    raise
                log.info("backfill %s: %s %s %s–%s was already requested (409)", reference, connection.user_id,
                         kind, window_start, window_end)
        return done

    def scheduler(self, interval_s: float = 900.0) -> Scheduler:
        return Scheduler(self.poller, self.targets, self.access_token, interval_s=interval_s, kinds=self.kinds,
                         on_error=self.on_error)
