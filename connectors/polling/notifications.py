"""Notify-only webhooks (Oura, WHOOP, Fitbit) turned into data: fetch what a notification names.

The webhook receiver queues verified notifications on ``healthflow.notifications``; this reads
them, finds the connection of the notified account, and polls the kinds the manifest maps the
notification to (``webhooks.kinds``) — an immediate live poll, under the same rate limits and
cursors as scheduled polls, so the data lands on the ingestion topic like any poll. Offsets are
committed after the fetches: a crash re-reads the notification (at least once). Notifications for
unknown accounts, or that name nothing to fetch (deletions), are counted, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from connectors import registry
from connectors.polling.service import ConnectionPolling, PollReport
from schemas.serde import SchemaMismatch, decode
from transforms.sources import ReadPartitionToEnd, commit_offsets, plan_partitions


@dataclass
class FetchReport:
    fetched: PollReport = field(default_factory=PollReport)
    unknown_accounts: int = 0
    ignored: int = 0  # nothing to fetch for it (deletions, types the manifest does not map)
    unreadable: int = 0


def notifications_of(body: bytes) -> Iterator[dict[str, Any]]:
    """A notification body holds one notification (Oura, WHOOP) or a list of them (Fitbit)."""
    parsed = json.loads(body)
    yield from (parsed if isinstance(parsed, list) else [parsed])


class NotificationFetcher:
    def __init__(self, polling: ConnectionPolling) -> None:
        self.polling = polling

    def handle(self, provider: str, body: bytes, report: FetchReport | None = None) -> FetchReport:
        """Fetch what one queued notification names."""
        report = report or FetchReport()
        hooks = registry()[provider].manifest.webhooks
        try:
            notifications = list(notifications_of(body))
        except ValueError:
            report.unreadable += 1
            return report
        for note in notifications:
            if not isinstance(note, dict) or hooks is None or not hooks.user_field or not hooks.kind_field:
                report.ignored += 1
                continue
            kinds = hooks.kinds.get(str(note.get(hooks.kind_field)), [])
            account = note.get(hooks.user_field)
            connection = self.polling.control_plane.resolve_user(provider, str(account)) if account else None
            if not kinds:
                report.ignored += 1
            elif connection is None:
                report.unknown_accounts += 1
            else:
                for kind in kinds:
                    self.polling.poll(connection, kind, report.fetched)
        return report

    def run_once(self, bootstrap: str, topic: str = "healthflow.notifications",
                 group: str = "healthflow-fetch") -> FetchReport:
        """Handle everything queued now, then commit the group's offsets (the pipeline's reader and
        commit: each partition from the committed offset to its end)."""
        report = FetchReport()
        next_offsets: dict[int, int] = {}
        for partition, start in plan_partitions(bootstrap, topic, group):
            for message in ReadPartitionToEnd(bootstrap, topic, group).process((partition, start)):
                next_offsets[partition] = int(message.source["offset"]) + 1
                try:
                    raw = decode("raw_event", message.data)
                except SchemaMismatch:
                    report.unreadable += 1
                    continue
                self.handle(raw["provider"], raw["payload"], report)
        commit_offsets(bootstrap, topic, group, next_offsets)
        return report
