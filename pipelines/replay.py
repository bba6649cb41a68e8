"""Dead-letter replay: put failed events back on their way once the cause is fixed.

- Delivery dead letters (``deliver:<destination>``) hold the exact event body sent: replay rebuilds
  the events and delivers them again to their destination (or another one), each user's events
  in their original order, with the destination's own retry policy. A delivered event's dead
  letter is removed; one that fails again is kept with its attempts added up and the new error.
- Ingest dead letters (``decode``, ``parse``, ``normalize``, ``validate``) hold the original raw
  bytes: replay runs them through the normalize pipeline again (after a mapper fix, say) and
  delivers the results to the destinations. Their dead letters are removed once the run
  succeeds; whatever still fails is dead-lettered anew by that run.

Destinations are idempotent and events keep their ids, so replaying twice is harmless. With the control-plane store
(``status_url``, which also holds the record state), a delivery dead letter older than the record's stored version
is settled as superseded instead of delivered: a newer version (data, or a tombstone) went out after it, and an old
event delivered after it would bring a deleted record back or delete a re-created one.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from core.dead_letters import SCRATCH_PREFIX, delete_dead_letter, read_dead_letters, write_dead_letter
from core.errors import FatalError
from core.raw import RawMessage
from core.store import now_ms
from pipelines.normalize import MessagesSource, NormalizeJob, RunSummary, run_batch
from sinks.policy import Target
from sinks.status import DestinationStatus
from transforms.deliver import (
    DeadLettered,
    Delivered,
    Delivery,
    delivery_dead_letter,
    event_from_dead_letter,
)
from transforms.record_state import Key, open_state

INGEST_STAGES = ("decode", "parse", "normalize", "validate", "plausibility")


@dataclass
class ReplayResult:
    delivered: Counter[str] = field(default_factory=Counter)
    failed_again: Counter[str] = field(default_factory=Counter)
    superseded: Counter[str] = field(default_factory=Counter)  # settled unsent: older than the record's version
    ingest: RunSummary | None = None


def select(root: str, *, destination: str | None = None, ingest: bool = False,
           due_at: int | None = None) -> list[dict[str, Any]]:
    """Dead letters to replay: delivery ones (optionally of one destination, optionally only those
    whose scheduled redelivery is due at ``due_at``), or ingest ones."""
    chosen = []
    for record in read_dead_letters(root):
        stage = record["stage"]
        if ingest:
            if stage in INGEST_STAGES:
                chosen.append(record)
        elif stage.startswith("deliver:") and destination in (None, record["destination"]):
            next_at = record.get("next_attempt_at")
            if due_at is None or (next_at is not None and next_at <= due_at):
                chosen.append(record)
    return chosen


def replay_deliveries(root: str, targets: Sequence[Target], destination: str | None = None,
                      to: str | None = None, due_only: bool = False, status_url: str | None = None) -> ReplayResult:
    """Redeliver delivery dead letters (of ``destination``, or all) to their destination or to ``to``.

    ``due_only``: scheduled redelivery — only dead letters whose ``next_attempt_at`` has come, and
    never to a disabled destination (with ``status_url``); a failure moves the record to the next
    round of its destination's schedule. A manual replay of a disabled destination is refused.
    ``status_url``: the control-plane store (destination status and record state); with it, a dead letter whose
    ordering timestamp is below its record's stored version is removed unsent and counted in ``superseded``.
    """
    by_name = {t.name: t for t in targets}
    records = select(root, destination=destination, due_at=now_ms() if due_only else None)
    disabled = _disabled(status_url)
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(to or record["destination"], []).append(record)
    missing = sorted(set(groups) - set(by_name))
    if missing:
        raise FatalError(f"dead letters name destination(s) {', '.join(missing)} that the destinations file lacks; "
                         f"configured: {', '.join(by_name)}")
    result = ReplayResult()
    versions = _stored_versions(status_url, records)
    for name, group in groups.items():
        if name in disabled:
            if due_only:
                continue
            raise FatalError(f"destination {name!r} is disabled ({disabled[name]}); run "
                             f"`healthflow destinations enable {name}` first")
        target = by_name[name]
        # Several dead letters can hold the same event (the same content re-emitted while the destination
        # was down): deliver it once, settle every one of them.
        by_event: dict[str, list[dict[str, Any]]] = {}
        for record in group:
            by_event.setdefault(record["event_id"], []).append(record)
        events = []
        for event in (event_from_dead_letter(records[-1]) for records in by_event.values()):
            if event.ordering_timestamp_ms < versions.get((event.user_id, event.type, event.natural_key), -1):
                for record in by_event[event.event_id]:  # a newer version went out after it: never send it now
                    delete_dead_letter(root, record)
                result.superseded[name] += 1
            else:
                events.append(event)
        events.sort(key=lambda e: (e.user_id, e.sequence))
        with contextlib.suppress(Exception):  # unavailable right now: write() opens again and routes the error
            target.sink.open()
        try:
            for start in range(0, len(events), target.batch_size):
                for outcome in Delivery(target).deliver(events[start:start + target.batch_size]):
                    if isinstance(outcome, Delivered):
                        for record in by_event[outcome.event_id]:
                            delete_dead_letter(root, record)
                        result.delivered[name] += 1
                    else:
                        for record in by_event[outcome.record["event_id"]]:
                            _record_again(root, target, record, outcome)
                        result.failed_again[name] += 1
        finally:
            target.sink.close()
    return result


def _stored_versions(state_url: str | None, records: list[dict[str, Any]]) -> dict[Key, int]:
    """The record state's version of each (user, type, natural key) the delivery dead letters hold (lifecycle events
    have none); nothing without a state URL."""
    if not state_url or not records:
        return {}
    keys = sorted({(r["user_id"], r["source"]["type"], r["source"]["natural_key"]) for r in records
                   if r.get("user_id") and r["source"].get("natural_key") and r["source"].get("type")})
    state = open_state(state_url)
    state.open()
    try:
        return state.versions(keys)
    finally:
        state.close()


def _disabled(status_url: str | None) -> dict[str, str]:
    if not status_url:
        return {}
    status = DestinationStatus(status_url).open()
    try:
        return {s.name: s.reason or "disabled" for s in status.all() if s.disabled}
    finally:
        status.close()


def _record_again(root: str, target: Target, old: dict[str, Any], outcome: DeadLettered) -> None:
    """Keep a record that failed again: attempts add up, and it moves to its next redelivery round."""
    event = event_from_dead_letter(old)
    new = delivery_dead_letter(target, event, outcome.error, old["attempts"] + outcome.record["attempts"],
                               redelivery_round=old.get("redelivery_round", 0) + 1)
    write_dead_letter(root, new)  # first the new record, then the old one goes: a crash between keeps both
    if new["dead_letter_id"] != old["dead_letter_id"]:  # replayed to another destination
        delete_dead_letter(root, old)


REPLAYED_SOURCE = ("topic", "partition", "offset", "path", "line", "publish_time_ms", "message_id")


def replayed_message(record: dict[str, Any]) -> RawMessage:
    """An ingest dead letter's message as it was read: its bytes, encoding and place in its source (``REPLAYED_SOURCE``
    and ``healthflow-`` attributes), so its position, which orders a user's messages of one arrival time, is what it
    was (a Pub/Sub message's publish time and id; not an acknowledgement handle, long gone)."""
    source = {key: value for key, value in record["source"].items()
              if key in REPLAYED_SOURCE or key.startswith("healthflow-")}
    return RawMessage(record["original"], source, encoding=record["source"].get("encoding", "avro"))


def replay_ingest(root: str, targets: Sequence[Target], state_url: str) -> ReplayResult:
    """Run ingest dead letters through the normalize pipeline again.

    The run writes its own dead letters to a scratch root first; only after it succeeded are the
    replayed records removed and the new ones moved in. A crash leaves the old records in place
    (a later replay repeats the work, idempotently): nothing is lost.
    """
    records = select(root, ingest=True)
    result = ReplayResult()
    if not records:
        return result
    messages = [replayed_message(record) for record in records]
    scratch = f"{root.rstrip('/')}/{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}/"
    result.ingest = run_batch(NormalizeJob(MessagesSource(messages), targets, scratch, state_url=state_url))
    # Move the run's new dead letters in first, then drop the replayed records they do not replace:
    # a crash at any point leaves every failure on disk (at worst twice), never none.
    renewed = set()
    for record in read_dead_letters(scratch):
        write_dead_letter(root, record)
        renewed.add(record["dead_letter_id"])
    for record in records:
        if record["dead_letter_id"] not in renewed:
            delete_dead_letter(root, record)
    scratch_files = [m.path for m in FileSystems.match([f"{scratch}**"])[0].metadata_list]
    if scratch_files:  # object stores have no folders: delete the files themselves
        FileSystems.delete(scratch_files)
    with contextlib.suppress(OSError):  # a local scratch folder, now empty
        FileSystems.delete([scratch.rstrip("/")])
    return result
