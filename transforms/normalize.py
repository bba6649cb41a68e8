"""Raw messages → normalized events: decode → parse → normalize → validate → merge per user.

Every stage routes what it cannot handle to the ``dead_letter`` output with the original bytes,
the source coordinates and the reason; nothing is dropped. Fragments of one record (same user,
type and natural key) arriving in the same batch merge into a single event, newest first.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from connectors import get_provider
from connectors.base import Fragment, MappingError, natural_key, terra_user_id
from core.dead_letters import dead_letter
from core.events import NormalizedEvent
from core.raw import RawMessage
from schemas.serde import SchemaMismatch, decode, validate_record
from transforms.record_state import open_state
from transforms.users import UserDirectory

DEAD_LETTER = "dead_letter"
METRICS = "healthflow"


@dataclass(frozen=True)
class RawEvent:
    idempotency_key: str
    provider: str
    kind: str | None
    user_id: str | None
    received_at_ms: int
    payload: bytes


@dataclass(frozen=True)
class Keyed:
    """A validated fragment on its way to the per-user merge."""

    type: str
    natural_key: str
    data: dict[str, Any]
    version_ms: int
    sequence: str
    user: dict[str, Any]
    raw_idempotency_key: str
    provider: str = ""  # slug, with provider_user_id: the account, for resolving its connection
    provider_user_id: str = ""
    reference: str | None = None  # the backfill request this came from (delivered as terra-reference)


def decode_raw(message: RawMessage) -> RawEvent:
    """Decode a raw message; raises SchemaMismatch (permanent) when it is not a RawEvent."""
    if message.encoding == "avro":
        value = decode("raw_event", message.data)
        received = value["received_at"]
        received_ms = int(received.timestamp() * 1000) if hasattr(received, "timestamp") else int(received)
        return RawEvent(value["idempotency_key"], value["provider"], value["kind"], value["user_id"], received_ms,
                        value["payload"])
    try:
        value = json.loads(message.data)
        payload = value["payload"]
        payload_bytes = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        provider, kind, user = value["provider"], value.get("kind"), value.get("user_id")
        if not isinstance(provider, str) or not isinstance(kind, str | None) or not isinstance(user, str | int | None):
            raise TypeError("provider must be a string, kind and user_id strings or null")
        return RawEvent(str(value.get("idempotency_key") or message.position), provider, kind,
                        None if user is None else str(user), int(value.get("received_at") or 0), payload_bytes)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise SchemaMismatch(f"not a JSON raw event ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class Failed:
    """A dead letter produced while normalizing (see ``core.dead_letters``)."""

    stage: str
    record: dict[str, Any]


def normalize_message(message: RawMessage) -> Iterator[Keyed | Failed]:
    """Decode, parse, map and validate one raw message: a Keyed per record, a Failed per problem.

    A payload holding several documents is handled document by document: one bad document is
    dead-lettered (with the whole original message and its document index) without losing the rest.
    """
    try:
        raw = decode_raw(message)
    except SchemaMismatch as exc:
        yield _failed("decode", exc, message)
        return
    try:
        provider = get_provider(raw.provider)
        documents = list(provider.documents(json.loads(raw.payload, parse_constant=_reject_constant), raw.kind))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:  # unknown provider, bad JSON
        yield _failed("parse", exc, message, raw)
        return
    prefix = f"{raw.received_at_ms:013d}:{message.position}"
    for index, (kind, doc) in enumerate(documents):
        try:
            fragments = provider.normalize_document(kind, doc, raw.user_id)
        except MappingError as exc:
            yield _failed("normalize", exc, message, raw, kind, index)
            continue
        try:
            keyed = [_keyed(raw, provider.terra_name, f, f"{prefix}:{index:05d}:{n:03d}",
                            message.source.get("healthflow-reference")) for n, f in enumerate(fragments)]
        except (SchemaMismatch, MappingError, RecursionError) as exc:
            yield _failed("validate", exc, message, raw, kind, index)
            continue
        yield from keyed


def _reject_constant(name: str) -> None:
    raise ValueError(f"payload holds {name}, which is not a JSON number")


def _keyed(raw: RawEvent, terra_name: str, fragment: Fragment, sequence: str, reference: str | None = None) -> Keyed:
    data = validate_record(fragment.type, fragment.data)
    user = {"user_id": terra_user_id(raw.provider, fragment.provider_user_id), "provider": terra_name}
    return Keyed(fragment.type, natural_key(fragment.type, data), data,
                 fragment.version_ms or raw.received_at_ms, sequence, user, raw.idempotency_key,
                 raw.provider.lower(), str(fragment.provider_user_id), reference)


def _failed(stage: str, error: BaseException, message: RawMessage, raw: RawEvent | None = None,
            kind: str | None = None, index: int | None = None) -> Failed:
    source = dict(message.source, encoding=message.encoding)
    if raw is not None:
        source["idempotency_key"] = raw.idempotency_key
    if index is not None:
        source["document_index"] = index
    return Failed(stage, dead_letter(
        stage=stage, error=error, original=message.data, source=source,
        provider=raw.provider if raw else None, kind=kind or (raw.kind if raw else None),
        user_id=raw.user_id if raw else None))


class NormalizeRaw(beam.DoFn):
    """RawMessage → (terra user id, Keyed) per record, plus the ``dead_letter`` output."""

    def __init__(self) -> None:
        self.raw_in = Metrics.counter(METRICS, "raw_in")
        self.fragments = Metrics.counter(METRICS, "fragments")

    def process(self, message: RawMessage) -> Iterator[Any]:
        self.raw_in.inc()
        ok = failed = 0
        for item in normalize_message(message):
            if isinstance(item, Failed):
                failed += 1
                Metrics.counter(METRICS, f"dead_letter:{item.stage}").inc()
                yield pvalue.TaggedOutput(DEAD_LETTER, item.record)
            else:
                ok += 1
                self.fragments.inc()
                yield item.user["user_id"], item
        # Every raw message ends in exactly one outcome: the summary checks they add up.
        outcome = "partial" if ok and failed else "ok" if ok else "dead" if failed else "empty"
        Metrics.counter(METRICS, f"raw_{outcome}").inc()


def deep_merge(older: Any, newer: Any) -> Any:
    """Merge two versions of a record, ``newer`` winning field by field.

    Sample lists (dicts with a ``timestamp`` or ``measurement_time``) merge by that time, newer
    samples replacing older ones at the same time; other lists are replaced whole.
    """
    if isinstance(older, dict) and isinstance(newer, dict):
        merged = dict(older)
        for key, value in newer.items():
            merged[key] = deep_merge(older[key], value) if key in older else value
        return merged
    if isinstance(older, list) and isinstance(newer, list) and _sample_list(older) and _sample_list(newer):
        # A newer sample list is authoritative for the span it covers: older samples inside that span
        # go (a final hypnogram replaces the tentative one), except that a sample at the same instant
        # is merged field by field (a fat reading completes the weight taken at that moment); older
        # samples outside the span stay (a new epoch adds to the day). Samples compare by instant,
        # whatever offset they are written in.
        time_key = _time_key(newer[0])
        span = [_instant(item[time_key]) for item in newer]
        first, last = min(span), max(span)
        older_at = {_instant(item[time_key]): item for item in older}
        merged_newer = [deep_merge(older_at[at], item) if at in older_at else item
                        for at, item in zip(span, newer, strict=True)]
        kept = [item for item in older if not first <= _instant(item[time_key]) <= last]
        return sorted(kept + merged_newer, key=lambda item: _instant(item[time_key]))
    return newer


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _time_key(item: dict[str, Any]) -> str:
    return "timestamp" if "timestamp" in item else "measurement_time"


def _sample_list(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and (i.get("timestamp") or i.get("measurement_time")) for i in items)


def _merge_day_aware(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """deep_merge, except that a day window in the user's local time is never replaced by the
    same day written in UTC or without an offset (Oura heart-rate rows, Garmin userMetrics)."""
    merged = deep_merge(older, newer)
    old_meta, new_meta = older.get("metadata") or {}, newer.get("metadata") or {}
    if old_meta.get("timestamp_localization") == 1 and _has_offset(old_meta.get("start_time")) and (
            new_meta.get("timestamp_localization") != 1 or not _has_offset(new_meta.get("start_time"))):
        for key in ("start_time", "end_time", "timestamp_localization"):
            if key in old_meta:
                merged["metadata"][key] = old_meta[key]
    return merged


def _has_offset(text: str | None) -> bool:
    return bool(text) and len(text) > 26


Stored = dict[tuple[str, str], tuple[dict[str, Any], int]]  # (type, natural key) → (record, version_ms)


def merge_user_events(user_id: str, fragments: Iterable[Keyed], stored: Stored | None = None,
                      ) -> list[NormalizedEvent]:
    """One event per (type, natural key) of a user, in the user's stream order (by sequence).

    Fragments fold oldest → newest by (provider version, arrival sequence) on top of the stored
    record, if any; a fragment older than the stored version only fills fields the stored record
    lacks. Each event carries the whole merged record (destinations overwrite by key), and an
    ordering timestamp that grows whenever the record's content does, so no destination guard ever
    takes a richer record for a stale copy.
    """
    groups: dict[tuple[str, str], list[Keyed]] = {}
    for fragment in fragments:
        groups.setdefault((fragment.type, fragment.natural_key), []).append(fragment)
    events = []
    superseded = Metrics.counter(METRICS, "superseded")
    for (model_type, key), versions in groups.items():
        versions.sort(key=lambda f: (f.version_ms, f.sequence))
        data, version = (stored or {}).get((model_type, key), ({}, 0))
        stale = [f for f in versions if f.version_ms < version]
        if stale:  # older than the stored record: fold them oldest → newest, then the stored record on top
            older: dict[str, Any] = {}
            for fragment in stale:
                older = _merge_day_aware(older, fragment.data)
            filled = _merge_day_aware(older, data)
            if filled != data:  # they added fields: the merged record is newer than what destinations hold
                data, version = filled, version + 1
        for fragment in versions[len(stale):]:
            merged = _merge_day_aware(data, fragment.data)
            if fragment.version_ms > version:
                version = fragment.version_ms
            elif merged != data:  # same version, new content: make sure it is not taken for a stale copy
                version += 1
            data = merged
        superseded.inc(len(versions) - 1)
        newest = versions[-1]
        reference = next((f.reference for f in reversed(versions) if f.reference), None)
        events.append(NormalizedEvent.create(
            type=model_type, user=newest.user, data=data, natural_key=key, ordering_timestamp_ms=version,
            sequence=max(f.sequence for f in versions), raw_idempotency_key=newest.raw_idempotency_key,
            reference=reference))
    events.sort(key=lambda e: e.sequence)
    for event in events:
        Metrics.counter(METRICS, f"normalized:{event.provider.lower()}:{event.type}").inc()
    return events


def normalize_in_memory(messages: Iterable[RawMessage]) -> tuple[list[NormalizedEvent], list[Failed]]:
    """The normalize step without Beam or record state: events per user in order, and the failures.

    For the ``normalize`` command, benchmarks and tests; the pipeline does the same with GroupByKey.
    """
    by_user: dict[str, list[Keyed]] = {}
    failures: list[Failed] = []
    for message in messages:
        for item in normalize_message(message):
            if isinstance(item, Failed):
                failures.append(item)
            else:
                by_user.setdefault(item.user["user_id"], []).append(item)
    return [e for user, keyed in by_user.items() for e in merge_user_events(user, keyed)], failures


class MergeWithState(beam.DoFn):
    """(user, fragments) → (user, [events]) merged with, and saved to, the record state.

    Users are buffered and flushed together (one state read and one write per flush). State is
    saved before delivery: a run that dies after saving re-reads its input and re-emits the same
    merged records, so delivery stays at least once.
    """

    def __init__(self, state_url: str, users_per_flush: int = 200) -> None:
        self.state_url, self.users_per_flush = state_url, users_per_flush

    def setup(self) -> None:
        self.state = open_state(self.state_url)
        self.state.open()
        self.users = UserDirectory(self.state_url).open()

    def teardown(self) -> None:
        self.state.close()
        self.users.close()

    def start_bundle(self) -> None:
        self.pending: list[tuple[str, list[Keyed]]] = []

    def process(self, element: tuple[str, Iterable[Keyed]]) -> Iterator[tuple[str, list[NormalizedEvent]]]:
        user_id, fragments = element
        self.pending.append((user_id, list(fragments)))
        if len(self.pending) >= self.users_per_flush:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        for output in self._flush():
            yield GlobalWindows.windowed_value(output)

    def _resolve(self, user_id: str, fragments: list[Keyed]) -> tuple[str, list[Keyed]]:
        """Give an account's fragments the user of its connection, when it has one."""
        first = fragments[0]
        user = self.users.resolve(first.provider, first.provider_user_id, first.user["provider"])
        if user is None:
            return user_id, fragments
        return user["user_id"], [dataclasses.replace(f, user=user) for f in fragments]

    def _flush(self) -> Iterator[tuple[str, list[NormalizedEvent]]]:
        pending = [self._resolve(user, fragments) for user, fragments in self.pending]
        self.pending = []
        keys = sorted({(user, f.type, f.natural_key) for user, frags in pending for f in frags})
        stored_by_user: dict[str, Stored] = {}
        for (user, model_type, key), value in (self.state.load(keys) if keys else {}).items():
            stored_by_user.setdefault(user, {})[(model_type, key)] = value
        merged = [(user_id, merge_user_events(user_id, fragments, stored_by_user.get(user_id)))
                  for user_id, fragments in pending]
        self.state.save(((e.user_id, e.type, e.natural_key), e.data, e.ordering_timestamp_ms)
                        for _, events in merged for e in events)
        yield from merged


class Normalize(beam.PTransform):
    """PCollection[RawMessage] → (events: PCollection[(user_id, [NormalizedEvent…])], dead letters).

    Events of one user come as one ordered list per batch; dead letters keep the raw bytes.
    """

    def __init__(self, state_url: str) -> None:
        super().__init__()
        self.state_url = state_url

    def expand(self, messages):
        keyed, dead = messages | "NormalizeRaw" >> beam.ParDo(NormalizeRaw()).with_outputs(DEAD_LETTER, main="keyed")
        events = (keyed
                  | "GroupByUser" >> beam.GroupByKey()
                  | "MergeWithState" >> beam.ParDo(MergeWithState(self.state_url)))
        return events, dead
