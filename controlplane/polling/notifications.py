"""Notify-only webhooks (Oura, WHOOP, Fitbit, Withings) turned into data: fetch what a notification names.

The webhook receiver queues verified notifications on ``healthflow.notifications``; this reads them, finds the
connection of the notified account (``webhooks.user_field``) and acts on what the manifest says the notification
means (``webhooks.kind_field``):

- ``webhooks.revoked`` (Fitbit ``userRevokedAccess`` / ``deleteUser``, Withings ``appli=46`` with ``action=unlink``
  or ``delete``): the user withdrew access at the provider. Every active connection of the account is marked revoked
  (``ControlPlane.revoke_account``: tokens deleted, ``access_revoked`` event) and is no longer polled.
- ``webhooks.kinds``: the raw kinds to fetch. When the notification names what changed in time
  (``webhooks.date_field``: one day, Fitbit ``date``; ``start_field``/``end_field``: a span, Withings
  ``startdate``/``enddate``), exactly that window is fetched, at live priority, even when it lies before the live
  cursor (a backdated log); the live cursor is not moved. A calendar day is ``[day, day + 1)`` for date-windowed
  endpoints, and widened by the world's UTC offsets (-12 h … +14 h) for endpoints windowed by time, since the day is
  the user's. Without those fields (or for endpoints without a time window) it is an immediate live poll, as a
  scheduled one. Either way under the same rate limits, and the data lands on the ingestion topic like any poll. A
  401 refreshes the token and fetches once more; a refused refresh revokes the connection (as a poll does); any other
  failure is counted in the report (``fetched.failed``) and does not hold up the queue. A notification naming its
  document (``webhooks.id_field``: WHOOP ``id``, Oura ``object_id``) fetches just that document for each kind whose
  endpoint declares an ``item_path`` (``Poller.fetch_item``, through the provider's poll hook).

Pings (``webhooks.callback_field``; Garmin queues ``{"<summaryType>": [{"userId", "callbackURL"}]}`` per account, see
``controlplane.webhooks``): each entry's callback URL is fetched with the account's connection token through
``Poller.fetch_url`` (rate limits, retries; through ``ConnectionPolling.attempt``, so a 401 refreshes and fetches
once more) and the answer, a JSON array of that summary type, is published on the ingestion topic in push shape
(``{"<summaryType>": [...]}``, like a push body), so the pipeline maps it as pushed data. Only URLs on the
provider's API are fetched (``Poller.api_url``): any other is counted (``foreign``) and logged, never requested,
since a webhook body must not be able to send the user's token elsewhere. A callback answering 410 (already
downloaded, or expired: Garmin keeps them 24 h) is counted (``gone``) and not asked again. Summary types the
provider does not map (Garmin ``activityFiles``, FIT/TCX/GPX files: single download) are ignored, not fetched.

Offsets are committed after everything read was handled: a crash re-reads the notifications (at least once; a
revocation applied twice is a no-op, a repeated fetch is recognisable by the raw events' idempotency keys).
A notification whose fetch failed for a transient reason (provider down, rate limited, network) is queued again on
the same topic with ``healthflow-attempt`` / ``healthflow-due`` headers and fetched once due (backoff doubling from
``retry_base_s`` up to ``retry_max_s``), so one failing account never holds up the queue and nothing is dropped (a
Garmin ping, for one, is sent once). A fetch the provider refuses (a 4xx) is counted in ``fetched.failed`` and not
repeated: asked the same way it cannot succeed (a pull provider's live poll reads the data again).
Notifications for unknown accounts, or that name nothing to fetch (``webhooks.ignored``: Oura deletions of day-keyed
collections), are counted, never fatal (mapped deletions never get
here: the receiver publishes them as raw events, ``webhooks.deletions``).

A notification the receiver claimed by its content (Fitbit, Polar: the ``healthflow-replay-claim`` header, see
``controlplane.webhooks``) has its claim forgotten in the control-plane store once it was handled (fetched, or
failed for good; not while it waits for a retry): an identical notification arriving later (another sync of the same
day) is queued and fetched again instead of being taken for a replay. A provider's replay after the fetch therefore
costs one idempotent re-fetch (the same raw events again, under the rate limits), never missed data.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from connectors import registry
from connectors.manifest import Webhooks, matches_any
from controlplane.polling.poller import PollResult, ProviderRefused
from controlplane.polling.publisher import PublishFailed
from controlplane.polling.service import ConnectionPolling, PollReport
from controlplane.webhooks import parse_notification
from controlplane.webhooks.seen import CLAIM_HEADER, SeenNotifications
from core.kafka import producer_config, send_all
from schemas.serde import SchemaMismatch, decode
from transforms.sources import ReadPartitionToEnd, commit_offsets, plan_partitions

log = logging.getLogger(__name__)

ATTEMPT_HEADER, DUE_HEADER = "healthflow-attempt", "healthflow-due"  # on notifications queued again
NOTIFICATION_TRACK = "notification"  # cursor track of notified windows: never the live cursor
# a user's calendar day, as UTC: from UTC+14 (the day starts 14 h before UTC midnight) to UTC-12
DAY_EARLIEST, DAY_LATEST = timedelta(hours=14), timedelta(hours=12)
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass
class FetchReport:
    fetched: PollReport = field(default_factory=PollReport)
    unknown_accounts: int = 0
    ignored: int = 0  # nothing to fetch for it (deletions, types the manifest does not map)
    unreadable: int = 0
    revoked: list[str] = field(default_factory=list)  # connections (user ids) a revocation notice ended
    pings: int = 0  # ping entries read (callback URLs), whatever became of them
    foreign: int = 0  # pings whose callback URL is not on the provider's API: never requested
    gone: int = 0  # callbacks answering 410 (already downloaded, or expired): not asked again
    requeued: int = 0  # notifications whose fetch failed for a transient reason: queued again with a due time
    deferred: int = 0  # notifications queued again that are not due yet: queued again as they are


class CallbackGone(Exception):
    """A callback URL answered 410: its data was already downloaded, or it expired."""


def redacted(url: str) -> str:
    """A URL for logs: without its query (Garmin's callback URLs carry a pull token there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "…" if parts.query else "", ""))


@dataclass(frozen=True)
class Window:
    """What a notification says changed: ``[start, end)``; ``day`` when it named a calendar day."""

    start: datetime
    end: datetime
    day: bool = False


def notifications_of(body: bytes, encoding: str = "json") -> Iterator[dict[str, Any]]:
    """A notification body holds one notification (Oura, WHOOP, Withings form fields) or a list of them (Fitbit)."""
    parsed = parse_notification(body, encoding)
    yield from (parsed if isinstance(parsed, list) else [parsed])


def moment(value: Any) -> tuple[datetime, bool]:
    """A notification's time field: unix seconds (or milliseconds), a date (``YYYY-MM-DD``: midnight UTC, and
    ``True``) or an ISO datetime (UTC when it has no offset). ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        seconds = float(value)
        return datetime.fromtimestamp(seconds / 1000 if seconds > 10**11 else seconds, UTC), False
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    text = value.strip()
    if _DAY.match(text):
        day = date.fromisoformat(text)
        return datetime(day.year, day.month, day.day, tzinfo=UTC), True
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC), False


def notified_window(note: dict[str, Any], hooks: Webhooks) -> Window | None:
    """The window a notification names (``date_field``, or ``start_field``/``end_field``), else None."""
    if hooks.date_field and note.get(hooks.date_field) not in (None, ""):
        at, _ = moment(note[hooks.date_field])
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(start, start + timedelta(days=1), day=True)
    if hooks.start_field and note.get(hooks.start_field) not in (None, ""):
        start, start_is_day = moment(note[hooks.start_field])
        end, end_is_day = start, start_is_day
        if hooks.end_field and note.get(hooks.end_field) not in (None, ""):
            end, end_is_day = moment(note[hooks.end_field])
        end = max(end, start)
        # the end is inclusive: the whole last day, or the last second
        return Window(start, end + (timedelta(days=1) if end_is_day else timedelta(seconds=1)),
                      day=start_is_day and end_is_day)
    return None


def revocation(note: dict[str, Any], hooks: Webhooks) -> str | None:
    """What in ``note`` says the user withdrew access (``webhooks.revoked``), else None."""
    for spec in hooks.revoked:
        if isinstance(spec, str):
            if hooks.kind_field and note.get(hooks.kind_field) is not None and str(note[hooks.kind_field]) == spec:
                return spec
        elif spec and all(note.get(name) is not None and str(note[name]) == value for name, value in spec.items()):
            return " ".join(f"{name}={value}" for name, value in spec.items())
    return None


class NotificationFetcher:
    """Acts on queued notifications; see the module docstring. A notification whose fetch failed for a transient
    reason is queued again with ``healthflow-attempt`` and ``healthflow-due`` headers (``retry_base_s`` doubling per
    attempt, at most ``retry_max_s``) and fetched again once due, never dropped."""

    def __init__(self, polling: ConnectionPolling, retry_base_s: float = 30.0, retry_max_s: float = 3600.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), seen: SeenNotifications | None = None
                 ) -> None:
        """``seen``: where the receiver keeps its replay claims (default: the control plane's store)."""
        self.polling, self.retry_base_s, self.retry_max_s, self.clock = polling, retry_base_s, retry_max_s, clock
        self._seen = seen

    def forget_claim(self, provider: str, seen_id: str) -> None:
        """The notification was handled: an identical one later is fetched again. A store failure is logged; the
        claim then lapses at the end of its replay window."""
        try:
            if self._seen is None:
                self._seen = SeenNotifications(self.polling.control_plane.store_url)
            self._seen.forget(provider, seen_id)
        except Exception:  # logged; never holds up the queue
            log.exception("%s notification claim %s not forgotten; it lapses with its replay window", provider,
                          seen_id)

    def handle(self, provider: str, body: bytes, report: FetchReport | None = None) -> FetchReport:
        """Act on one queued notification body (revoke, or fetch what it names)."""
        report = report or FetchReport()
        hooks = registry()[provider].manifest.webhooks
        if hooks is not None and hooks.callback_field:
            return self.handle_pings(provider, body, hooks, report)
        try:
            notifications = list(notifications_of(body, hooks.body if hooks else "json"))
        except ValueError:
            report.unreadable += 1
            return report
        for note in notifications:
            if not isinstance(note, dict) or hooks is None or not hooks.user_field:
                report.ignored += 1
                continue
            account = note.get(hooks.user_field)
            withdrawn = revocation(note, hooks)
            if withdrawn is not None:
                ended = self.revoke(provider, str(account), withdrawn) if account not in (None, "") else []
                report.revoked.extend(ended)
                report.unknown_accounts += 0 if ended else 1
                continue
            kinds = hooks.kinds.get(str(note.get(hooks.kind_field))) if hooks.kind_field else None
            if matches_any(note, hooks.ignored):  # e.g. a deletion no record stands for: nothing to fetch
                kinds = None
            connection = self.polling.control_plane.resolve_user(provider, str(account)) if account else None
            if not kinds:
                report.ignored += 1
            elif connection is None:
                report.unknown_accounts += 1
            else:
                try:
                    window = notified_window(note, hooks)
                except (TypeError, ValueError) as exc:
                    log.warning("%s notification names an unreadable time (%s): fetching from the live cursor",
                                provider, exc)
                    window = None
                named = note.get(hooks.id_field) if hooks.id_field else None
                for kind in kinds:
                    if connection.user_id in report.fetched.revoked:
                        break
                    self.fetch(connection, kind, window, report.fetched, None if named in (None, "") else str(named))
        return report

    def handle_pings(self, provider: str, body: bytes, hooks: Webhooks, report: FetchReport) -> FetchReport:
        """Fetch the callbacks of one queued ping body ``{"<summaryType>": [{<user>, <callback_field>}]}``."""
        try:
            parsed = parse_notification(body, hooks.body)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not all(isinstance(entries, list) for entries in parsed.values()):
            report.unreadable += 1
            return report
        found = registry()[provider]
        user_field = hooks.user_field or found.user_field or "userId"
        for kind, entries in parsed.items():
            for entry in entries:
                report.pings += 1
                url = entry.get(hooks.callback_field) if isinstance(entry, dict) else None
                account = entry.get(user_field) if isinstance(entry, dict) else None
                if not isinstance(url, str) or not url or account in (None, ""):
                    report.unreadable += 1
                    continue
                if kind not in found.kinds or found.ignores(kind):
                    log.info("%s ping for %s %s ignored: the type is not mapped (not fetched)", provider, account, kind)
                    report.ignored += 1
                    continue
                if not self.polling.poller.api_url(provider, url):
                    log.warning("%s ping for %s %s names a callback off the %s API, not fetched: %s", provider,
                                account, kind, provider, redacted(url))
                    report.foreign += 1
                    continue
                connection = self.polling.control_plane.resolve_user(provider, str(account))
                if connection is None:
                    report.unknown_accounts += 1
                elif connection.user_id not in report.fetched.revoked:
                    self.fetch_callback(connection, kind, url, report)
        return report

    def fetch_callback(self, connection: Any, kind: str, url: str, report: FetchReport) -> None:
        """GET a ping's callback for the connection and publish the answer as ``{kind: answer}``, through
        ``ConnectionPolling.attempt`` (a 401 refreshes once; failures are reported); 410 counts as ``gone``."""
        poller = self.polling.poller

        def get() -> PollResult:
            try:
                return poller.fetch_url(connection, kind, url, lambda: self.polling.access_token(connection),
                                        envelope=kind)
            except ProviderRefused as exc:
                if exc.status == 410:
                    raise CallbackGone(str(exc)) from exc
                raise

        try:
            self.polling.attempt(connection, kind, report.fetched, get)
        except CallbackGone:
            log.warning("%s %s callback for %s answered 410 (already downloaded or expired): %s",
                        connection.provider, kind, connection.user_id, redacted(url))
            report.gone += 1

    def revoke(self, provider: str, account: str, why: str) -> list[str]:
        """Mark every active connection of the provider account revoked; returns their user ids."""
        ended = self.polling.control_plane.revoke_account(
            provider, account, f"the user withdrew access at {provider} ({why}); the user must connect again")
        log.info("%s account %s withdrew access (%s): connections %s revoked", provider, account, why, ended)
        return ended

    def fetch(self, connection: Any, kind: str, window: Window | None, report: PollReport,
              document_id: str | None = None) -> None:
        """Fetch ``kind``: the document the notification names (``document_id``, when the endpoint has an
        ``item_path``), else ``window``, else a live poll; through ``ConnectionPolling.attempt``: a 401 refreshes the
        token once, other failures are reported, not raised."""
        poller = self.polling.poller
        endpoint = poller.manifest(connection.provider).api.endpoints.get(kind)
        if document_id is not None and endpoint is not None and endpoint.item_path:
            path = endpoint.item_path.replace("{id}", urllib.parse.quote(document_id, safe=""))
            self.polling.attempt(connection, kind, report, lambda: poller.fetch_item(
                connection, kind, path, lambda: self.polling.access_token(connection)))
            return
        if window is None or endpoint is None or endpoint.window is None:
            self.polling.poll(connection, kind, report)
            return
        start, end = window.start, window.end
        if window.day and endpoint.window.format != "date":
            start, end = start - DAY_EARLIEST, end + DAY_LATEST
        self.polling.attempt(connection, kind, report, lambda: poller.fetch_window(
            connection, kind, start, end, lambda: self.polling.access_token(connection), NOTIFICATION_TRACK))

    def run_once(self, bootstrap: str, topic: str = "healthflow.notifications",
                 group: str = "healthflow-fetch") -> FetchReport:
        """Handle everything queued now, queue again what failed for a transient reason (and what is not due yet),
        then commit the group's offsets (the pipeline's reader and commit: each partition from the committed offset
        to its end). A crash before the commit handles the notifications again: at least once."""
        report = FetchReport()
        next_offsets: dict[int, int] = {}
        again: list[tuple[bytes, str, int, int, str | None]] = []  # (message, key, attempt, due in epoch ms, claim)
        now_ms = int(self.clock().timestamp() * 1000)
        for partition, start in plan_partitions(bootstrap, topic, group):
            for message in ReadPartitionToEnd(bootstrap, topic, group).process((partition, start)):
                next_offsets[partition] = int(message.source["offset"]) + 1
                try:
                    raw = decode("raw_event", message.data)
                except SchemaMismatch:
                    report.unreadable += 1
                    continue
                key = f"{raw['provider']}:{raw.get('user_id') or ''}"
                attempt, due = (int(message.source.get(h) or 0) for h in (ATTEMPT_HEADER, DUE_HEADER))
                claim = message.source.get(CLAIM_HEADER) or None
                if due > now_ms:
                    again.append((message.data, key, attempt, due, claim))
                    report.deferred += 1
                    continue
                transient = report.fetched.retryable
                self.handle(raw["provider"], raw["payload"], report)
                if report.fetched.retryable > transient:
                    delay_s = min(self.retry_max_s, self.retry_base_s * 2 ** attempt)
                    again.append((message.data, key, attempt + 1, now_ms + int(delay_s * 1000), claim))
                    report.requeued += 1
                elif claim:
                    self.forget_claim(raw["provider"], claim)
        if again:
            requeue(bootstrap, topic, again)
        commit_offsets(bootstrap, topic, group, next_offsets)
        return report


def requeue(bootstrap: str, topic: str, messages: list[tuple[bytes, str, int, int, str | None]]) -> None:
    """Queue notifications again with their attempt, due time and replay claim; raises unless the broker took every
    one."""
    sent = send_all(producer_config(bootstrap), topic, (
        (value, key, [(ATTEMPT_HEADER, str(attempt).encode()), (DUE_HEADER, str(due).encode()),
                      *([(CLAIM_HEADER, claim.encode())] if claim else [])])
        for value, key, attempt, due, claim in messages))
    if not sent.ok:
        raise PublishFailed(f"{sent.remaining or len(sent.errors)} of {len(messages)} notifications not queued again; "
                            f"errors: {sent.errors[:3]}")
