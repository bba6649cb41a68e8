"""The normalized event: one Terra-shaped record for one user, as delivered to destinations."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from core.json_codec import dumps_canonical

DATA_MODEL_VERSION = "2022-03-16"  # the Terra data models' version (schemas/avro/models), sent with every event


def canonical_json(value: Any) -> bytes:
    """Deterministic compact JSON (sorted keys): equal content gives equal bytes and ids. Exactly
    ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`` (``core.json_codec``)."""
    return dumps_canonical(value)


@dataclass(frozen=True)
class NormalizedEvent:
    """A delivered event.

    ``event_id`` is derived from (user, type, natural key, content): a redelivery of the same
    record keeps its id (destinations dedupe on it), an update gets a new one. A record re-created after a deletion
    carries a ``generation`` (the version of the deletion it follows) in its id too, so it never reuses an id
    destinations saw before the deletion. ``sequence``
    orders one user's events; ``ordering_timestamp_ms`` tells destinations which version is newer.
    A tombstone (``deleted``, see ``tombstone``) says the provider deleted the record; its ``data`` is the record's key.
    """

    event_id: str
    type: str
    user: dict[str, Any]
    data: dict[str, Any]
    natural_key: str
    ordering_timestamp_ms: int
    sequence: str
    raw_idempotency_key: str | None = None
    version: str = DATA_MODEL_VERSION
    payload: dict[str, Any] | None = None  # a lifecycle event (auth, deauth, ...) is delivered as it is
    reference: str | None = None  # the historical request (backfill) it answers: Terra's terra-reference
    deleted: bool = False  # a tombstone: the provider deleted the record; ``data`` is its key (``deleted_key``)
    generation: int | None = None  # re-created after the deletion of this version (None: never deleted)
    replaced: int | None = None  # the version of the last fragment that replaced the whole record (record state only)

    @functools.cached_property
    def data_json(self) -> bytes:
        """``canonical_json(data)``, encoded once per event: the id, the body and the destinations share it."""
        return canonical_json(self.data)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("data_json", None)  # derived: recomputed where needed rather than shipped twice
        return state

    @property
    def is_lifecycle(self) -> bool:
        return self.payload is not None

    @property
    def user_id(self) -> str:
        return self.user["user_id"]

    @property
    def provider(self) -> str:
        return self.user["provider"]

    def envelope(self) -> dict[str, Any]:
        """Terra's webhook body: ``{type, user, data: [record], version}`` (athlete: ``athlete``);
        a tombstone's ``{type, user, deleted: [key], version}``; a lifecycle event's own body."""
        if self.payload is not None:
            return self.payload
        if self.deleted:
            return {"type": self.type, "user": self.user, "deleted": [self.data], "version": self.version}
        if self.type == "athlete":
            return {"type": self.type, "user": self.user, "athlete": self.data, "version": self.version}
        return {"type": self.type, "user": self.user, "data": [self.data], "version": self.version}

    def body(self) -> bytes:
        """The exact bytes sent to JSON destinations (and signed by webhooks): ``canonical_json(envelope())``,
        assembled around ``data_json`` (keys in sorted order, as canonical JSON writes them)."""
        if self.payload is not None:
            return canonical_json(self.payload)
        if self.deleted:
            return canonical_json(self.envelope())
        data = b"[" + self.data_json + b"]" if self.type != "athlete" else self.data_json
        return b"".join((b'{"athlete":' if self.type == "athlete" else b'{"data":', data,
                         b',"type":', canonical_json(self.type), b',"user":', canonical_json(self.user),
                         b',"version":', canonical_json(self.version), b"}"))

    def to_dict(self) -> dict[str, Any]:
        """The event's fields, without ``generation`` and ``replaced`` (only its id and the record state need them)."""
        value = asdict(self)
        del value["generation"], value["replaced"]
        return value

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> NormalizedEvent:
        return cls(**value)

    @classmethod
    def lifecycle(cls, event: dict[str, Any], at_ms: int) -> NormalizedEvent:
        """A connection lifecycle event (``auth``, ``deauth``, ``user_reauth``, ``access_revoked``, ...).

        Its id is derived from its content (a redelivery keeps it); it is keyed by its own id.
        """
        user = event.get("user") or event.get("new_user") or {"user_id": "", "provider": ""}
        event_id = f"evt_{hashlib.sha256(canonical_json(event)).hexdigest()[:32]}"
        return cls(event_id, str(event.get("type", "unknown")), dict(user), dict(event), event_id, at_ms,
                   f"{at_ms:013d}", None, DATA_MODEL_VERSION, dict(event))

    @classmethod
    def tombstone(cls, *, type: str, user: dict[str, Any], natural_key: str, ordering_timestamp_ms: int,
                  sequence: str, raw_idempotency_key: str | None = None, start_time: str | None = None,
                  reference: str | None = None) -> NormalizedEvent:
        """The event saying the record (user, ``type``, ``natural_key``) was deleted at ``ordering_timestamp_ms``.

        Its ``data`` is ``deleted_key(type, natural_key, start_time)``. Its id covers (user, type, natural key,
        ordering timestamp), not ``start_time``: the same deletion keeps its id, a later deletion of the same record
        (deleted, re-created, deleted again) gets a new one.
        """
        digest = hashlib.sha256(canonical_json(["deleted", user["user_id"], type, natural_key, ordering_timestamp_ms]))
        return cls(f"evt_{digest.hexdigest()[:32]}", type, user, deleted_key(type, natural_key, start_time),
                   natural_key, ordering_timestamp_ms, sequence, raw_idempotency_key, reference=reference, deleted=True)

    @classmethod
    def create(cls, *, type: str, user: dict[str, Any], data: dict[str, Any], natural_key: str,
               ordering_timestamp_ms: int, sequence: str, raw_idempotency_key: str | None = None,
               reference: str | None = None, generation: int | None = None,
               replaced: int | None = None) -> NormalizedEvent:
        """A data event. Its id covers canonical_json([user_id, type, natural_key, data]), and, for a record
        re-created after a deletion, ``generation`` as a fifth item: ids of records never deleted stay as they were.
        ``replaced`` (the record state's, never in the id) is the version of the last fragment that replaced it."""
        data_json = canonical_json(data)
        tail = b"]" if generation is None else b"," + canonical_json(generation) + b"]"
        digest = hashlib.sha256(canonical_json([user["user_id"], type, natural_key])[:-1] + b"," + data_json + tail)
        event = cls(f"evt_{digest.hexdigest()[:32]}", type, user, data, natural_key, ordering_timestamp_ms, sequence,
                    raw_idempotency_key, reference=reference, generation=generation, replaced=replaced)
        event.__dict__["data_json"] = data_json
        return event


DAY_SCOPED_KEY = "date"  # how a tombstone names the natural key of a day-scoped record (daily, body, ...)
DAY_KEY = re.compile(r"\d{4}-\d{2}-\d{2}")  # a day-scoped record's natural key (fullmatch): YYYY-MM-DD


def deleted_key(model_type: str, natural_key: str, start_time: str | None = None) -> dict[str, str]:
    """A deleted record's key, in Terra's terms: ``{"natural_key", "summary_id"}`` for activity and sleep,
    ``{"natural_key", "date"}`` (YYYY-MM-DD) for day-scoped models, plus the record's ``metadata.start_time`` when it
    is known (what Terra's object layout names objects by)."""
    key = {"natural_key": natural_key}
    if model_type in ("activity", "sleep"):
        key["summary_id"] = natural_key
    elif model_type != "athlete":
        key[DAY_SCOPED_KEY] = natural_key
    if start_time:
        key["start_time"] = start_time
    return key
