"""Polling the control plane's connections: tokens from the auth layer, refreshed on a 401.

    service = ConnectionPolling(control_plane, poller)
    service.poll_once()            # every active connection × pollable kind, once
    service.scheduler().start()    # the same, every 15 minutes with jitter

A 401 (``TokenRejected``) forces a token refresh and retries that poll once with the new token;
a refresh the provider refuses marks the connection revoked (``access_revoked`` event) and it is
no longer polled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from connectors.auth.control_plane import ConnectionInactive, ConnectionRevoked, ControlPlane
from connectors.polling.poller import Poller, PollResult, PollTarget, TokenRejected
from connectors.polling.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class PollReport:
    results: list[PollResult] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)


class ConnectionPolling:
    def __init__(self, control_plane: ControlPlane, poller: Poller) -> None:
        self.control_plane, self.poller = control_plane, poller

    def targets(self) -> list[PollTarget]:
        return list(self.control_plane.active_connections())

    def access_token(self, connection: PollTarget) -> str:
        return self.control_plane.access_token(connection.user_id)

    def kinds(self, connection: PollTarget) -> list[str]:
        manifest = self.poller.manifest(connection.provider)
        if manifest.webhooks is not None and manifest.webhooks.mode == "push":
            return []  # pushed to us (Garmin): nothing to poll
        return self.poller.kinds(connection.provider)

    def poll(self, connection: PollTarget, kind: str, report: PollReport) -> None:
        """One poll; on a 401, refresh the token (serialized per connection) and try once more."""
        try:
            report.results.append(self.poller.poll(connection, kind, lambda: self.access_token(connection)))
            return
        except TokenRejected:
            try:
                self.control_plane.refresh(connection.user_id, force=True)
            except (ConnectionRevoked, ConnectionInactive) as exc:
                log.warning("connection %s no longer polled: %s", connection.user_id, exc)
                report.revoked.append(connection.user_id)
                return
            report.refreshed.append(connection.user_id)
        report.results.append(self.poller.poll(connection, kind, lambda: self.access_token(connection)))

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

    def scheduler(self, interval_s: float = 900.0) -> Scheduler:
        return Scheduler(self.poller, self.targets, self.access_token, interval_s=interval_s, kinds=self.kinds,
                         on_error=self.on_error)
