"""Raw messages → normalized events: decode → parse → split by user → map → validate → merge per user.

Every stage routes what it cannot handle to the ``dead_letter`` output with the original bytes,
the source coordinates and the reason; nothing is dropped, and nothing one message holds stops the
pipeline. Fragments of one record (same user, type and natural key) merge into a single event,
newest first, on top of the record state: across the whole run for bounded input, as they arrive
(one user at a time, in keyed state) for unbounded input.

A message is only parsed and split by user before the shuffle; each user's documents are mapped
where they merge. What crosses the shuffle is the raw bytes as read, packed per user and compressed
(``pack_parts``: about a fifth of the input, where the records they become are three times it), so
the shuffle costs little, and mapping spreads over workers by user whatever the input's shape (one
file, one partition). A message of several users is mapped once, before the shuffle. What the split proved of a
message travels with it (``UserDocuments.checked``, ``orjson_read``): where it is mapped it is read again without
repeating the input bounds checks or the choice of JSON reader.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import logging
import operator
import pickle
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import BooleanCoder
from apache_beam.transforms import userstate
from apache_beam.utils.windowed_value import WindowedValue

from connectors import get_provider
from connectors.base import Deletion, Fragment, IntervalSamples, MappingError, Provider, natural_key, terra_user_id
from core import json_codec
from core.dead_letters import dead_letter
from core.errors import FatalError, RetryableError, wait_out
from core.events import DAY_KEY, NormalizedEvent
from core.raw import RawMessage
from schemas.serde import SchemaMismatch, conform_record, decode, validate_record
from transforms.acks import Acks, join_acks, root_acks, split_acks
from transforms.bounds import (
    MAX_ID_CHARS,
    MAX_STRING_CHARS,
    OutOfBounds,
    check_document,
    check_epoch_ms,
    check_text,
    may_be_out_of_bounds,
)
from transforms.bundles import GroupWithinBundle
from transforms.interval_samples import PART, emitted, mark_part, mark_parts, sample_instant
from transforms.outputs import DEAD_LETTER, ENDED, TALLY, DeadLetterOut, Tally
from transforms.plausibility import Implausible, check_record
from transforms.record_state import open_state, state_row, stored_deletion, stored_marks
from transforms.reuse import acquire, release
from transforms.users import UserDirectory

log = logging.getLogger(__name__)


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
    deleted: bool = False  # the provider deleted the record (a ``Deletion``): ``data`` is empty
    unversioned: bool = False  # a deletion without the provider's version: ``version_ms`` is its arrival time
    dropped: tuple[tuple[str, int], ...] = ()  # what the plausibility check took out (``transforms.plausibility``)
    replaces: bool = False  # the whole record: replaces (not merges into) an older one (``Fragment.replaces``)
    rows: int = 0  # how many rows (documents) ``data`` joins (``map_documents``): each sample folds alone; 0: none

    @property
    def fragment_count(self) -> int:
        """How many mapped fragments this stands for (a run of rows: each row's)."""
        return self.rows or 1


JsonLoads = Callable[..., Any]  # (text, parse_constant=None) → value: ``json_codec.loads`` or one giving its values


def decode_raw(message: RawMessage, loads: JsonLoads = json_codec.loads) -> RawEvent:
    """Decode a raw message (``loads`` reads a JSON one); raises SchemaMismatch (permanent) if it is no RawEvent."""
    if message.encoding == "avro":
        value = decode("raw_event", message.data)
        received = value["received_at"]
        received_ms = int(received.timestamp() * 1000) if hasattr(received, "timestamp") else int(received)
        return RawEvent(value["idempotency_key"], value["provider"], value["kind"], value["user_id"], received_ms,
                        value["payload"])
    try:
        value = loads(message.data)
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
    """A dead letter produced while normalizing (see ``transforms.dead_letters``)."""

    stage: str
    record: dict[str, Any]


def normalize_message(message: RawMessage) -> Iterator[Keyed | Failed]:
    """Decode, parse, map and validate one raw message: a Keyed per record, a Failed per problem.

    A payload holding several documents is handled document by document: one bad document is
    dead-lettered (with the whole original message and its document index) without losing the rest.
    """
    read = read_documents(message)
    if isinstance(read, Failed):
        yield read
        return
    raw, provider, documents = read
    yield from map_documents(message, raw, provider, documents, range(len(documents)))


Documents = tuple[RawEvent, Provider, list[tuple[str, Any]]]


def read_documents(message: RawMessage, checked: bool = False, loads: JsonLoads = json_codec.loads,
                   ) -> Documents | Failed:
    """Decode a raw message and split its payload into ``(kind, document)`` pairs; a Failed when it cannot be.

    ``checked``: the message was read before and its raw event's fields passed ``_check_raw`` (``split_by_user``:
    ``UserDocuments.checked``), so they are not checked again. ``loads`` reads its JSON (the raw event's, the
    payload)."""
    try:
        raw = decode_raw(message, loads)
        if not checked:
            _check_raw(raw)
    except (SchemaMismatch, OutOfBounds) as exc:
        return _failed("decode", exc, message)
    try:
        provider = get_provider(raw.provider)
        documents = list(provider.documents(loads(raw.payload, parse_constant=_reject_constant), raw.kind))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:  # unknown provider, bad JSON
        return _failed("parse", exc, message, raw)
    return raw, provider, documents


class OrjsonReads:
    """``json_codec.loads`` that notes whether orjson read every text it was given (``json_codec.read``): then
    ``json_codec.loads_read_by_orjson`` reads them again to the same values."""

    def __init__(self) -> None:
        self.all = True

    def __call__(self, text: bytes | str, parse_constant: Callable[[str], Any] | None = None) -> Any:
        value, by_orjson = json_codec.read(text, parse_constant)
        self.all = self.all and by_orjson
        return value


def split_by_user(message: RawMessage, tally: Tally | None = None, loads: JsonLoads = json_codec.loads,
                  ) -> tuple[dict[str, list[Any]], list[Failed], bool]:
    """A message's documents per healthflow user id, what cannot be attributed to anyone (or the whole message),
    and whether the message was mapped here. A document of a kind the provider ignores (``Provider.ignores``) is
    no user's: it is counted on ``tally`` as ``ignored:<provider>:<kind>`` and goes no further.

    Per user: the indexes of its documents, to be mapped where that user merges; or, for a message whose
    documents belong to several users or whose records name their own user (``Provider.records_name_their_user``),
    its records, mapped here once (so a message of many users is parsed once, not once per user). ``loads`` reads
    the message's JSON (``OrjsonReads``: noting how).
    """
    read = read_documents(message, loads=loads)
    if isinstance(read, Failed):
        return {}, [read], False
    raw, provider, documents = read
    kept = []
    for index, (kind, _) in enumerate(documents):
        if provider.ignores(kind):
            if tally is not None:
                tally.add(f"ignored:{provider.slug}:{kind}")
        else:
            kept.append(index)
    by_user: dict[str, list[int]] = {}
    failed = []
    suspect = None
    if not provider.records_name_their_user:
        suspect = may_be_out_of_bounds(raw.payload)
        for index in kept:
            kind, doc = documents[index]
            try:
                if suspect:
                    check_document(doc)
            except OutOfBounds as exc:
                failed.append(_failed("validate", exc, message, raw, kind, index))
                continue
            try:
                owner = provider.owner_of(kind, doc, raw.user_id)
                check_text("provider user id", owner)
            except MappingError as exc:
                failed.append(_failed("normalize", exc, message, raw, kind, index))
                continue
            by_user.setdefault(terra_user_id(raw.provider, owner), []).append(index)
        if len(by_user) <= 1:
            return by_user, failed, False
    records: dict[str, list[Any]] = {}
    failed = []
    for item in map_documents(message, raw, provider, documents, kept, suspect, join_rows=False):
        if isinstance(item, Failed):
            failed.append(item)
        else:
            records.setdefault(item.user["user_id"], []).append(item)
    return records, failed, True


def map_documents(message: RawMessage, raw: RawEvent, provider: Provider, documents: list[tuple[str, Any]],
                  indexes: Iterable[int], suspect: bool | None = None, join_rows: bool = True,
                  tally: Tally | None = None) -> Iterator[Keyed | Failed]:
    """Map and validate the documents at ``indexes``: a Keyed per record, a Failed per document that cannot be (or,
    for implausible records, one Failed per document naming them, its other records keyed).

    Each document is bounds-checked first (``check_document``) when ``suspect``: ``may_be_out_of_bounds`` of the
    payload, scanned here when None. False only for documents already checked (``UserDocuments.checked``).

    Consecutive documents that are rows of one record (``_row_shape``: Oura heart-rate rows, Garmin epochs, a page of
    weigh-ins) are validated together when ``join_rows``, as one Keyed whose ``rows`` each fold alone in the merge,
    as they would one after another: the same record, counts and dead letters, in the same order, for a fraction of
    the work. A run that does not validate whole is validated row by row, so each document's outcome is its own.
    ``join_rows`` is False where the Keyed cross a shuffle (``split_by_user``): a worker of an earlier version, which
    would take joined rows for one series (``unpack_parts``), may merge them. ``tally`` counts the rows joined
    (``rows_joined``) and those of runs validated row by row (``rows_one_by_one``)."""
    prefix = f"{raw.received_at_ms:013d}:{message.position}"
    if suspect is None:
        suspect = may_be_out_of_bounds(raw.payload)
    reference = message.source.get("healthflow-reference")
    run: list[tuple[str, int, Fragment]] = []  # the (kind, index, row) of consecutive documents of one shape
    shape: tuple[Any, ...] | None = None
    for index in indexes:
        kind, doc = documents[index]
        fragments = _mapped_document(message, raw, provider, kind, index, doc, suspect)
        if isinstance(fragments, Failed):  # its dead letter after those of the run before it, as one by one
            yield from _keyed_run(message, raw, provider, run, prefix, reference, tally)
            run, shape = [], None
            yield fragments
            continue
        row = _row_shape(fragments[0]) if join_rows and len(fragments) == 1 else None
        if row is None or row != shape:
            yield from _keyed_run(message, raw, provider, run, prefix, reference, tally)
            run, shape = [], row
        if row is None:
            yield from _keyed_document(message, raw, provider, kind, index, fragments, prefix, reference)
        else:
            run.append((kind, index, fragments[0]))
    yield from _keyed_run(message, raw, provider, run, prefix, reference, tally)


def _mapped_document(message: RawMessage, raw: RawEvent, provider: Provider, kind: str, index: int, doc: Any,
                     suspect: bool) -> list[Fragment | Deletion] | Failed:
    """A document's fragments as its mapper makes them (``_keyed`` compacts them), or its Failed: ``validate`` when
    it is out of bounds (checked when ``suspect``), ``normalize`` for whatever its mapper raises."""
    try:
        if suspect:
            check_document(doc)
    except OutOfBounds as exc:
        return _failed("validate", exc, message, raw, kind, index)
    try:
        return provider.normalize_document(kind, doc, raw.user_id, compacted=False)
    except Exception as exc:  # MappingError, or whatever else a mapper raises: this document alone fails
        return _failed("normalize", exc, message, raw, kind, index)


def _keyed_document(message: RawMessage, raw: RawEvent, provider: Provider, kind: str, index: int,
                    fragments: Sequence[Fragment | Deletion], prefix: str, reference: str | None,
                    ) -> Iterator[Keyed | Failed]:
    """One document's fragments keyed (``_keyed``); a Failed for the document when one cannot be, or naming its
    implausible records (its others keyed)."""
    keyed, implausible = [], []
    try:
        for n, fragment in enumerate(fragments):
            try:
                keyed.append(_keyed(raw, provider, fragment, f"{prefix}:{index:05d}:{n:03d}", reference))
            except Implausible as exc:  # this record alone: the document's other records are delivered
                implausible.append(str(exc))
    except (SchemaMismatch, MappingError, RecursionError) as exc:
        yield _failed("validate", exc, message, raw, kind, index)
        return
    if implausible:
        yield _failed("plausibility", Implausible("; ".join(implausible)), message, raw, kind, index)
    yield from keyed


def _keyed_run(message: RawMessage, raw: RawEvent, provider: Provider, run: list[tuple[str, int, Fragment]],
               prefix: str, reference: str | None, tally: Tally | None = None) -> Iterator[Keyed | Failed]:
    """A run of rows of one record (``_row_shape``) keyed as one Keyed of ``rows``, each row's samples of its own part
    (``mark_parts``); a run of one, or one that does not validate whole with a sample per row in each interval list,
    document by document (``_keyed_document``). ``tally``: see ``map_documents``."""
    if len(run) > 1:
        first, (_, last, _) = run[0][2], run[-1]
        joined = Fragment(first.type, _joined_rows([row.data for _, _, row in run]), first.provider_user_id,
                          first.version_ms)
        try:  # sequenced as its last row: no fragment of the record falls between its rows (they are consecutive)
            keyed = _keyed(raw, provider, joined, f"{prefix}:{last:05d}:000", reference)
        except Exception:  # each row is validated alone below, and fails as it would have
            keyed = None
        parts = [row.part for _, _, row in run]
        spec = provider.interval_samples.get(first.type)
        if keyed is not None and (spec is None or all(part is None for part in parts)
                                  or mark_parts(keyed.data, spec, parts)):
            if tally is not None:
                tally.add("rows_joined", len(run))
            yield dataclasses.replace(keyed, rows=len(run))
            return
        if tally is not None:
            tally.add("rows_one_by_one", len(run))
    for kind, index, row in run:
        yield from _keyed_document(message, raw, provider, kind, index, [row], prefix, reference)


def _row_shape(fragment: Fragment | Deletion) -> tuple[Any, ...] | None:
    """What a run of rows of one record shares, for a fragment that is a row: a record holding metadata (scalars)
    and blocks whose every list holds one flat sample (scalars, with its time), nothing else, of no ``replaces``;
    None for any other fragment. Rows of the same shape (the same type, account, version, metadata, blocks and time
    keys; of any part) fold, sample by sample, as the one record of their samples does."""
    if type(fragment) is not Fragment or fragment.replaces:
        return None
    data = fragment.data
    metadata = data.get("metadata") if type(data) is dict else None
    if type(metadata) is not dict or len(data) < 2:
        return None
    for value in metadata.values():
        if type(value) not in _SCALARS:
            return None
    blocks = []
    for key, value in data.items():
        if key != "metadata":
            block = _row_block(value)
            if block is None:
                return None
            blocks.append((key, block))
    return (fragment.type, fragment.provider_user_id, fragment.version_ms,
            tuple((key, type(value), value) for key, value in metadata.items()), tuple(blocks))


def _row_block(value: Any) -> Any:
    """The shape of a block of a row (its keys down to lists of one flat sample each, and each sample's time key), or
    None when ``value`` is no such block."""
    if type(value) is list:
        if len(value) != 1 or type(value[0]) is not dict:
            return None
        sample = value[0]
        time_key = _time_key(sample)  # as the merge reads the sample's time
        if not sample.get(time_key):
            return None
        for item in sample.values():
            if type(item) not in _SCALARS:
                return None
        return time_key
    if type(value) is not dict or not value:
        return None
    blocks = []
    for key, item in value.items():
        block = _row_block(item)
        if block is None:
            return None
        blocks.append((key, block))
    return tuple(blocks)


def _joined_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of rows of the same shape (``_row_shape``): their metadata, and at each list the rows' samples in
    order."""
    joined: dict[str, Any] = {}
    for key, value in rows[0].items():
        joined[key] = value if key == "metadata" else _joined_block([row[key] for row in rows])
    return joined


def _joined_block(blocks: list[Any]) -> Any:
    """The rows' blocks at one key (of one shape) as one: each list the rows' samples, in order."""
    if type(blocks[0]) is list:
        return [block[0] for block in blocks]
    return {key: _joined_block([block[key] for block in blocks]) for key in blocks[0]}


def _check_raw(raw: RawEvent) -> None:
    """The raw event's own fields within bounds (``transforms.bounds``)."""
    check_epoch_ms("received_at", raw.received_at_ms)
    for name in ("provider", "kind", "user_id", "idempotency_key"):
        check_text(name, getattr(raw, name), MAX_STRING_CHARS if name == "idempotency_key" else MAX_ID_CHARS)


def _reject_constant(name: str) -> None:
    raise ValueError(f"payload holds {name}, which is not a JSON number")


def _keyed(raw: RawEvent, provider: Provider, fragment: Fragment | Deletion, sequence: str,
           reference: str | None = None) -> Keyed:
    """A mapped record validated (and compacted, for a ``compacts`` provider: ``normalize_document(compacted=False)``
    left that to this one pass), checked for plausibility (what is impossible taken out, or Implausible) and keyed, or
    a deletion keyed; an id a store cannot hold is OutOfBounds."""
    if isinstance(fragment, Deletion):
        check_text("provider user id", str(fragment.provider_user_id))
        if fragment.type not in provider_models(provider):
            raise MappingError(f"{provider.slug}: a deletion of {fragment.type!r}, which this provider does not map")
        check_text(f"{fragment.type} natural key", fragment.natural_key)
        if not fragment.natural_key:
            raise MappingError(f"{provider.slug}: a deletion of {fragment.type} names no natural key")
        if fragment.type not in ("activity", "sleep", "athlete") and not DAY_KEY.fullmatch(fragment.natural_key):
            raise MappingError(f"{provider.slug}: a deletion of {fragment.type} must name its day (YYYY-MM-DD), "
                               f"got {fragment.natural_key!r}")
        user = {"user_id": terra_user_id(raw.provider, fragment.provider_user_id), "provider": provider.terra_name}
        return Keyed(fragment.type, fragment.natural_key, {}, fragment.version_ms or raw.received_at_ms, sequence,
                     user, raw.idempotency_key, raw.provider.lower(), str(fragment.provider_user_id), reference,
                     deleted=True, unversioned=not fragment.version_ms)
    data = (conform_record if provider.compacts else validate_record)(fragment.type, fragment.data)
    data, dropped = check_record(fragment.type, data)
    spec = provider.interval_samples.get(fragment.type)
    if fragment.part is not None and spec is not None:  # validated as Terra's; the part is the record state's
        mark_part(data, spec, fragment.part)
    user = {"user_id": _account_user_id(raw.provider, fragment.provider_user_id), "provider": provider.terra_name}
    key = natural_key(fragment.type, data)
    _check_natural_key(fragment.type, key)
    return Keyed(fragment.type, key, data,
                 fragment.version_ms or raw.received_at_ms, sequence, user, raw.idempotency_key,
                 raw.provider.lower(), str(fragment.provider_user_id), reference, dropped=tuple(dropped.items()),
                 replaces=fragment.replaces)


@functools.lru_cache(maxsize=1 << 16, typed=True)
def _account_user_id(provider_slug: str, provider_user_id: Any) -> str:
    """``terra_user_id`` of an account whose provider user id is within bounds (``check_text``: OutOfBounds if not);
    remembered, as a user's fragments name the same account (a failed check is not, and fails again)."""
    check_text("provider user id", str(provider_user_id))
    return terra_user_id(provider_slug, provider_user_id)


@functools.lru_cache(maxsize=1 << 16, typed=True)
def _check_natural_key(model_type: str, key: str) -> None:
    """``check_text`` of a record's natural key (OutOfBounds if a store cannot hold it); a key that passed is
    remembered, as a user's fragments name the same few days and records."""
    check_text(f"{model_type} natural key", key)


def provider_models(provider: Provider) -> set[str]:
    """The model types ``provider``'s kinds produce."""
    return {model for spec in provider.kinds.values() for model in spec.models}


def _failed(stage: str, error: BaseException, message: RawMessage, raw: RawEvent | None = None,
            kind: str | None = None, index: int | None = None, user: str | None = None) -> Failed:
    """``user``: the healthflow user whose part of the message failed, when the message holds several users' records
    (each part is then a dead letter of its own, not one overwriting the other)."""
    source = dict(message.source, encoding=message.encoding)
    if raw is not None:
        source["idempotency_key"] = raw.idempotency_key
    if index is not None:
        source["document_index"] = index
    if user is not None:
        source["user"] = user
    return Failed(stage, dead_letter(
        stage=stage, error=error, original=message.data, source=source,
        provider=raw.provider if raw else None, kind=kind or (raw.kind if raw else None),
        user_id=raw.user_id if raw else None))


@dataclass(frozen=True)
class UserDocuments:
    """One raw message's documents of one user (indexes into its documents), on the way to that user's merge;
    or that user's ``records`` when the message was mapped before the shuffle (``split_by_user``).

    ``failed_before`` counts the message's documents already dead-lettered; ``only_part`` says whether this is the
    message's only part (then its outcome is tallied where it is mapped). ``checked``: the message's raw event and
    the documents at ``documents`` passed the input bounds (``transforms.bounds``) where it was split, so where they
    are mapped they are not checked again (False: they are). ``orjson_read``: orjson read the message's JSON where it
    was split (``OrjsonReads``), so where it is mapped ``orjson.loads`` alone reads it again, to the same values.
    """

    message: RawMessage
    documents: tuple[int, ...]
    acks: Acks = ()
    failed_before: int = 0
    only_part: bool = True
    records: tuple[Keyed, ...] | None = None
    checked: bool = False
    orjson_read: bool = False


def pack_parts(parts: Sequence[UserDocuments]) -> bytes:
    """What crosses the shuffle: one user's parts, compressed together (a user's messages look alike, so this is
    about a fifth of their size). A runner holding shuffled data in memory (Beam's local runner holds all of it,
    decoded, and copies it twice) then holds little."""
    fields = [(p.message.data, p.message.source, p.message.encoding, p.message.ack, p.documents, p.acks,
               p.failed_before, p.only_part, p.records, p.checked, p.orjson_read) for p in parts]
    return zlib.compress(pickle.dumps(fields, pickle.HIGHEST_PROTOCOL), 1)


def unpack_parts(packed: bytes) -> list[UserDocuments]:
    """``pack_parts``'s parts. A part packed before ``checked`` and ``orjson_read`` were (in flight across an update of
    a streaming job) gets their defaults: it is checked and read where it is mapped as it was then. Fields after the
    eleven known here (a later version's, in flight across a rollback) are left out: such a field may only ever be a
    hint whose absence is the safe default, as these two are."""
    return [UserDocuments(RawMessage(*fields[:4]), *fields[4:PACKED_FIELDS])
            for fields in pickle.loads(zlib.decompress(packed))]


PACKED_FIELDS = 11  # a part's fields in a pack: the message's four, then UserDocuments' after ``message``


@dataclass(frozen=True)
class UserFragments:
    """One raw message's records for one user, with the message (for dead letters) and its acks."""

    fragments: tuple[Keyed, ...]
    message: RawMessage
    acks: Acks = ()


@dataclass(frozen=True)
class UserEvents:
    """A user's merged events in their order, with the acks of the messages they came from."""

    events: tuple[NormalizedEvent, ...]
    acks: Acks = ()


class SplitByUser(GroupWithinBundle):
    """RawMessage → (user key, packed UserDocuments) per user, plus ``dead_letter`` and ``ended`` outputs.

    Only decodes, parses and attributes documents to users; mapping happens after the shuffle
    (``MergePerUser``). A user's parts among the last ``messages_per_pack`` messages of a bundle travel
    packed together (``pack_parts``). Nothing a payload holds can stop the pipeline: whatever a stage
    raises dead-letters the message with its bytes and the reason.
    """

    def __init__(self, messages_per_pack: int = 256) -> None:
        super().__init__(messages_per_pack)

    def setup(self) -> None:
        tune_gc_for_mapping()

    def start_bundle(self) -> None:
        super().start_bundle()
        self.tally = Tally()

    def process(self, message: RawMessage, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator[Any]:
        self.tally.add("raw_in")
        reads = OrjsonReads()
        try:
            by_user, failed, mapped = split_by_user(message, self.tally, reads)
        except Exception as exc:
            by_user, failed, mapped = {}, [_failed("normalize", exc, message)], False
        acks = root_acks(message.ack)
        shares = split_acks(acks, len(failed) + len(by_user))
        yield from _dead_letters(failed, shares, self.tally)
        for (user, found), share in zip(by_user.items(), shares[len(failed):], strict=True):
            self.gather(user, (UserDocuments(message, () if mapped else tuple(found), share, len(failed),
                                             len(by_user) == 1, tuple(found) if mapped else None, checked=not mapped,
                                             orjson_read=not mapped and reads.all),), window, timestamp)
        yield from self.gathered()  # one message
        if not by_user and not failed and acks:
            yield pvalue.TaggedOutput(ENDED, acks)
        # Every raw message ends in exactly one outcome (the summary checks they add up): here when it has no
        # user part or several ("split"), where its one part is mapped otherwise.
        if not by_user:
            self.tally.add(_raw_outcome(False, bool(failed)))
        elif len(by_user) > 1:
            self.tally.add("raw_split")

    def grouped(self, values: list[UserDocuments]) -> bytes:
        return pack_parts(values)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self.flush()
        yield from self.tally.flush()


def _dead_letters(failed: list[Failed], shares: list[Acks], tally: Tally) -> Iterator[pvalue.TaggedOutput]:
    """Each failure as a dead letter carrying its share of the message's acks (the first ``len(failed)`` shares)."""
    for item, share in zip(failed, shares, strict=False):
        tally.add(f"dead_letter:{item.stage}")
        yield pvalue.TaggedOutput(DEAD_LETTER, DeadLetterOut(item.record, share))


def _raw_outcome(records: bool, failures: bool) -> str:
    """The one outcome a raw message ends in: ``raw_ok``, ``raw_partial``, ``raw_dead`` or ``raw_empty``."""
    return "raw_" + ("partial" if records and failures else "ok" if records else "dead" if failures else "empty")


def deep_merge(older: Any, newer: Any) -> Any:
    """Merge two versions of a record, ``newer`` winning field by field (see ``RecordMerge``); neither is changed."""
    holder = {"": older}
    RecordMerge().fold(holder, {"": newer})
    return holder[""]


class RecordMerge:
    """Folds versions of one record into one, ``newer`` winning field by field, in place.

    Nothing it is given changes: a dict or list it was given is copied the first time something must change in it;
    the copy is then its own and changes in place. So folding n fragments into a record costs what the fragments
    hold, not n copies of the record; and whether a fold changed the record is known as it goes, with no deep
    compare of before and after.

    Sample lists (lists of dicts with a ``timestamp`` or ``measurement_time``) merge by that time; other lists are
    replaced whole. A newer sample list is authoritative for the span it covers: older samples inside that span go
    (a final hypnogram replaces the tentative one), except that a sample at the same instant is merged field by
    field (a fat reading completes the weight taken at that moment); older samples outside the span stay (a new
    epoch adds to the day). A sample's identity is its instant and its part (``PART``: ``Fragment.part``, say a Garmin
    epoch's activity type; none for most): a newer list replaces (or merges into) the samples of its own parts alone,
    so the parts of one interval stay side by side. Samples compare by instant, whatever offset they are written in; a
    merged list is in time order (ties keep their order, older samples first). A sample list of its own keeps its
    samples' instants, so adding a fragment's samples to a day's is a bisect, not a re-parse of the whole list.
    """

    def __init__(self) -> None:
        self.samples_outside_window = 0  # samples of a UTC day left out of a local day (``fold_record``)
        self._owned: dict[int, Any] = {}  # id → a container of its own (held, so that no other object gets its id)
        self._instants: dict[int, tuple[str, list[int]]] = {}  # its sample lists: (time key, instants in order)
        self.fill_only: frozenset[str] = frozenset()  # interval lists ``fill`` unites rather than replaces by span
        self.row_ids: frozenset[int] = frozenset()  # ids of the samples ``fill`` keeps inside a newer list's span
        self.each_sample = False  # newer's sample lists are rows (``Keyed.rows``): each of their samples folds alone

    def record(self, data: dict[str, Any]) -> dict[str, Any]:
        """A record of its own to fold into, starting as ``data``."""
        return self._own(data)

    def fold(self, target: dict[str, Any], newer: dict[str, Any], keep: Container[str] = ()) -> bool:
        """Merge ``newer`` into ``target`` (a record of its own), except the keys in ``keep``; whether it changed."""
        changed = False
        owned, instants = self._owned, self._instants
        for key, value in newer.items():
            if key in keep:
                continue
            if self.each_sample and type(value) is list and len(value) > 1:  # rows: as each row's list would fold
                changed = self._fold_rows(target, key, value) or changed
                continue
            old = target.get(key, _ABSENT)
            if old is _ABSENT:
                if self.each_sample and type(value) is dict:  # rows: a block they bring folds in as theirs would
                    target[key] = old = self._own({})
                    self.fold(old, value)
                else:
                    target[key] = value
                changed = True
            elif type(value) in _SCALARS:  # the usual field: newer's value wins
                target[key] = value
                changed = changed or old != value
            elif isinstance(value, dict) and isinstance(old, dict):
                if id(old) not in owned:
                    target[key] = old = self._own(old)
                changed = self.fold(old, value) or changed
            elif isinstance(value, list) and isinstance(old, list) and _sample_list(value) and (
                    id(old) in instants or _sample_list(old)):  # ours are sample lists
                if key in self.fill_only:
                    changed = self._union_samples(target, key, old, value) or changed
                else:
                    changed = self._fold_samples(target, key, old, value) or changed
            else:
                target[key] = value
                changed = changed or old != value
        return changed

    def _fold_rows(self, target: dict[str, Any], key: str, rows: list[Any]) -> bool:
        """``fold(target, {key: [row]})`` for each of ``rows`` in turn (``each_sample``); a sample folding into a sample
        list of ours goes straight to ``_fold_samples``, as ``fold`` would send it."""
        changed = False
        for item in rows:
            old = target.get(key)
            if id(old) in self._instants and key not in self.fill_only and _sample_list((item,)):
                changed = self._fold_samples(target, key, old, [item]) or changed
            else:
                changed = self.fold(target, {key: [item]}) or changed
        return changed

    def fold_record(self, record: dict[str, Any], newer: dict[str, Any], joined: bool = False) -> bool:
        """``fold``, except that a day window in the user's local time is never replaced by the same day written in
        UTC or without an offset (Oura heart-rate rows, Garmin userMetrics). ``joined``: ``newer`` is rows of the record
        joined (``Keyed.rows``), and folds as they would one after another: each sample of its lists alone.

        Where a day labelled UTC (timestamp_localization 0) meets the same day key labelled local, the record is the
        local day and keeps only the UTC side's samples inside it (an Oura row at 02:00Z on the 11th is the 10th at
        -05:00: not a sample of the local 11th); those outside are counted in ``samples_outside_window``."""
        if joined:  # one pass for all: the rows share their metadata, so the day-window choice is the same for each
            self.each_sample = True
            try:
                return self.fold_record(record, newer)
            finally:
                self.each_sample = False
        old_meta, new_meta = record.get("metadata") or {}, newer.get("metadata") or {}
        old_local, new_local = _local_day(old_meta), _local_day(new_meta)
        if new_local and _utc_day(old_meta):  # the local window replaces the UTC one: the stored samples must fit it
            kept, dropped = _within(record, *_bounds(new_meta))
            if dropped:
                record.clear()  # a record of its own: what lost every sample goes
                record.update(kept)
                self.samples_outside_window += dropped
        if not (old_local and not new_local):
            return self.fold(record, newer)
        if _utc_day(new_meta):
            newer, dropped = _within(newer, *_bounds(old_meta))
            self.samples_outside_window += dropped
        kept = tuple(key for key in ("start_time", "end_time", "timestamp_localization") if key in old_meta)
        if not isinstance(newer.get("metadata"), dict):
            changed = self.fold(record, newer)
            for key in kept:  # a record whose metadata is not an object: fails here, as it always has
                record["metadata"][key] = old_meta[key]
            return changed
        changed = self.fold(record, newer, keep=("metadata",))
        record["metadata"] = metadata = self._own(record["metadata"])
        return self.fold(metadata, newer["metadata"], keep=kept) or changed

    def fill(self, older: dict[str, Any], record: dict[str, Any], intervals: Collection[str] = (),
             row_ids: Collection[int] = ()) -> bool:
        """``fold_record(older, record)`` where ``older`` (a record of its own, folded from stale fragments) only fills
        what ``record`` lacks: ``record``'s fields win. Of an interval sample list (``intervals``: the names of the
        lists a provider emits one interval at a time) every sample of ``older`` whose (instant, part) ``record``
        lacks is kept (a late interval inside the span ``record`` covers is a gap, not replaced); ``record``'s sample
        wins at the same (instant, part), filled with the fields it lacks; a sample of no part covers its whole
        instant. Any other sample list of ``record`` is newer for the span it covers, as in ``fold`` (a restaged
        hypnogram is not mixed with the samples it replaced), except for the samples of ``older`` that came from rows
        (``row_ids``: their ids; a one-sample fragment displaces nothing when it arrives newer, nor is it displaced when
        it arrives older): each stays where ``record`` has no sample at its instant. Whether ``older`` changed."""
        self.fill_only, self.row_ids = frozenset(intervals), frozenset(row_ids)
        try:
            return self.fold_record(older, record)
        finally:
            self.fill_only, self.row_ids = frozenset(), frozenset()

    def _union_samples(self, parent: dict[str, Any], key: str, older: list[Any], newer: list[dict[str, Any]]) -> bool:
        """``fill``'s sample lists: ``newer``'s samples (merged onto the ``older`` sample at the same instant and part),
        with the ``older`` samples at an (instant, part) ``newer`` lacks; in time order, ties older first."""
        time_key = _time_key(newer[0])
        newer_at = [(sample_instant(item[time_key]), item.get(PART)) for item in newer]
        covered = set(newer_at)
        whole = {at for at, part in newer_at if part is None}  # a sample of no part: the whole interval
        anywhere = {at for at, _ in newer_at}
        older_at = {}
        gaps = []
        for item in older:
            at, part = sample_instant(item[time_key]), item.get(PART)
            if (at, part) in covered:
                older_at[(at, part)] = item
            elif at not in whole and (part is not None or at not in anywhere):
                gaps.append((at, item))
        merged = [(at_part[0], _merged_sample(older_at[at_part], item) if at_part in older_at else item)
                  for at_part, item in zip(newer_at, newer, strict=True)]
        result = sorted(gaps + merged, key=operator.itemgetter(0))
        samples = [item for _, item in result]
        self._owned[id(samples)] = samples
        self._instants[id(samples)] = (time_key, [at for at, _ in result])
        parent[key] = samples
        return samples != older

    def _own(self, value: Any) -> Any:
        if id(value) in self._owned:
            return value
        copy = dict(value) if isinstance(value, dict) else list(value)
        self._owned[id(copy)] = copy
        return copy

    def _fold_samples(self, parent: dict[str, Any], key: str, old: list[Any], newer: list[dict[str, Any]]) -> bool:
        time_key = _time_key(newer[0])
        span = [sample_instant(item[time_key]) for item in newer]
        known = self._instants.get(id(old))
        reordered = False
        if known is not None and known[0] == time_key:  # in time order: it is one of ours
            samples, instants = old, known[1]
        else:
            instants = [sample_instant(item[time_key]) for item in old]
            samples = self._own(old)
            reordered = not _in_order(instants)
        if reordered:  # a list that is not in time order yet (a mapper's): in order, ties as they were
            order = sorted(range(len(instants)), key=instants.__getitem__)
            samples[:] = [samples[n] for n in order]
            instants = [instants[n] for n in order]
        if len(newer) == 1:  # one sample (an Oura heart-rate row, a Garmin epoch): no span to sort
            return self._fold_sample(parent, key, (samples, instants, time_key), newer[0], span[0]) or reordered
        low, high = bisect.bisect_left(instants, min(span)), bisect.bisect_right(instants, max(span))
        if PART in newer[0]:  # a part of an interval (a mapper's fragment is of one part): other parts stay
            parts = {item.get(PART) for item in newer}
            if _other_parts(samples[low:high], parts):
                return self._fold_parts(parent, key, (samples, instants, low, high), newer, span, parts) or reordered
        older_at = dict(zip(instants[low:high], samples[low:high], strict=True))
        merged = [_merged_sample(older_at[at], item) if at in older_at else item
                  for at, item in zip(span, newer, strict=True)]
        if not _in_order(span):
            order = sorted(range(len(span)), key=span.__getitem__)
            merged, span = [merged[n] for n in order], [span[n] for n in order]
        if self.row_ids:  # ``fill``: the older rows in the span stay where ``newer`` has no sample at their instant
            at_newer = set(span)
            kept = [(at, item) for at, item in zip(instants[low:high], samples[low:high], strict=True)
                    if id(item) in self.row_ids and at not in at_newer]
            if kept:
                pairs = sorted([*kept, *zip(span, merged, strict=True)], key=operator.itemgetter(0))
                merged, span = [item for _, item in pairs], [at for at, _ in pairs]
        # a list out of order cannot equal the list in order it became (its samples' times differ somewhere)
        changed = reordered or samples[low:high] != merged
        samples[low:high], instants[low:high] = merged, span
        self._instants[id(samples)] = (time_key, instants)
        parent[key] = samples
        return changed

    def _fold_sample(self, parent: dict[str, Any], key: str, place: tuple[list[Any], list[int], str],
                     sample: dict[str, Any], at: int) -> bool:
        """``_fold_samples`` of a one-sample list (``sample``, at instant ``at``) into ``place`` (samples of its own
        in time order, their instants, its time key): merged onto the last older sample at its instant (the others
        there go; of another part, they stay), or inserted where its instant belongs. Whether the samples changed."""
        samples, instants, time_key = place
        low = bisect.bisect_left(instants, at)
        high = bisect.bisect_right(instants, at, low)
        if high == low:  # a new instant: nothing to merge onto, and nothing of another part to keep
            samples.insert(low, sample)
            instants.insert(low, at)
            changed = True
        else:
            if PART in sample:  # a part of an interval: other parts at its instant stay
                parts = {sample.get(PART)}
                if _other_parts(samples[low:high], parts):
                    return self._fold_parts(parent, key, (samples, instants, low, high), [sample], [at], parts)
            merged = [_merged_sample(samples[high - 1], sample)]
            changed = samples[low:high] != merged
            samples[low:high], instants[low:high] = merged, [at]
        self._instants[id(samples)] = (time_key, instants)
        parent[key] = samples
        return changed

    def _fold_parts(self, parent: dict[str, Any], key: str, place: tuple[list[Any], list[int], int, int],
                    newer: list[dict[str, Any]], span: list[int], parts: set[Any]) -> bool:
        """``_fold_samples`` where the older samples in the span include parts (``Fragment.part``) that ``newer`` does
        not hold: those stay; a sample at the same instant and part merges, the others in the span go (a sample of no
        part too: the whole interval, as a record stored before it had parts). Ties in time: the samples that stay
        first."""
        samples, instants, low, high = place
        if len(newer) == 1:  # one sample (a Garmin epoch): the slice's other parts, then it
            (part,), sample = parts, newer[0]
            kept = [item for item in samples[low:high] if PART in item and item[PART] != part]
            same = [item for item in samples[low:high] if item.get(PART) == part]
            merged = _merged_sample(same[-1], sample) if same else sample
            changed = len(kept) + len(same) != high - low or len(same) != 1 or same[0] != merged
            samples[low:high], instants[low:high] = [*kept, merged], [span[0]] * (len(kept) + 1)
            self._instants[id(samples)] = (_time_key(sample), instants)
            parent[key] = samples
            return changed
        older = list(zip(instants[low:high], samples[low:high], strict=True))
        kept = [(at, item) for at, item in older if item.get(PART) not in parts and PART in item]
        older_at = {(at, item.get(PART)): item for at, item in older if item.get(PART) in parts}
        newer_keys = [(at, item.get(PART)) for at, item in zip(span, newer, strict=True)]
        merged = [(at_part[0], _merged_sample(older_at[at_part], item) if at_part in older_at else item)
                  for at_part, item in zip(newer_keys, newer, strict=True)]
        changed = (len(kept) + len(older_at) != len(older) or bool(set(older_at) - set(newer_keys))
                   or any(at_part not in older_at or older_at[at_part] != item
                          for at_part, (_, item) in zip(newer_keys, merged, strict=True)))
        result = sorted(kept + merged, key=operator.itemgetter(0))
        samples[low:high], instants[low:high] = [item for _, item in result], [at for at, _ in result]
        self._instants[id(samples)] = (_time_key(newer[0]), instants)
        parent[key] = samples
        return changed


_ABSENT = object()
_SCALARS = frozenset({str, int, float, bool, type(None)})  # a JSON value that is neither an object nor an array


def _merged_sample(older: Any, newer: dict[str, Any]) -> Any:
    """``deep_merge`` of two samples at the same instant, without its machinery for the usual flat samples."""
    if not isinstance(older, dict):
        return deep_merge(older, newer)
    for key, value in newer.items():
        if type(value) not in _SCALARS and isinstance(value, dict | list) and key in older:
            return deep_merge(older, newer)
    return {**older, **newer}


def _other_parts(samples: list[Any], parts: set[Any]) -> bool:
    """Whether ``samples`` hold a sample of a part (``Fragment.part``) not among ``parts``."""
    return any(PART in item and item[PART] not in parts for item in samples)


def _in_order(times: list[int]) -> bool:
    return all(map(operator.le, times, itertools.islice(times, 1, None)))


def _time_key(item: dict[str, Any]) -> str:
    return "timestamp" if "timestamp" in item else "measurement_time"


def _sample_list(items: list[Any]) -> bool:
    if not items:
        return False
    for item in items:
        if not isinstance(item, dict) or not (item.get("timestamp") or item.get("measurement_time")):
            return False
    return True


def _has_offset(text: str | None) -> bool:
    return bool(text) and len(text) > 26


def _local_day(meta: dict[str, Any]) -> bool:
    """A window in the user's local time with a real offset."""
    return meta.get("timestamp_localization") == 1 and _has_offset(meta.get("start_time"))


def _utc_day(meta: dict[str, Any]) -> bool:
    """A window labelled UTC (timestamp_localization 0) written with its offset."""
    return meta.get("timestamp_localization") == 0 and _has_offset(meta.get("start_time")) and _has_offset(
        meta.get("end_time"))


def _bounds(meta: dict[str, Any]) -> tuple[int, int]:
    return sample_instant(meta["start_time"]), sample_instant(meta["end_time"])


def _within(value: Any, start: int, end: int) -> tuple[Any, int]:
    """``value`` with the samples of its sample lists outside ``[start, end)`` left out (a copy along the way to a
    change; ``value`` itself when nothing is outside), and how many were left out. A list (or block) that loses every
    sample is left out with them, not kept empty: folded, it would replace the samples it meets."""
    if isinstance(value, list) and _sample_list(value):
        time_key = _time_key(value[0])
        inside = [item for item in value if start <= sample_instant(item[time_key]) < end]
        return (value, 0) if len(inside) == len(value) else (inside, len(value) - len(inside))
    if not isinstance(value, dict):
        return value, 0
    changed, dropped = {}, 0
    for key, item in value.items():
        if key == "metadata":
            continue
        kept, count = _within(item, start, end)
        if count:
            changed[key], dropped = kept, dropped + count
    if not dropped:
        return value, 0
    return {key: changed.get(key, item) for key, item in value.items()
            if key not in changed or changed[key]}, dropped


Stored = dict[tuple[str, str], tuple[dict[str, Any], int]]  # (type, natural key) → (record, version_ms)


def merge_user_events(user_id: str, fragments: Iterable[Keyed], stored: Stored | None = None,
                      on_dropped: Callable[[str, int], None] | None = None) -> list[NormalizedEvent]:
    """The events of ``merge_user_records``."""
    return [event for event, _ in merge_user_records(user_id, fragments, stored, on_dropped)]


def merge_user_records(user_id: str, fragments: Iterable[Keyed], stored: Stored | None = None,
                       on_dropped: Callable[[str, int], None] | None = None,
                       ) -> list[tuple[NormalizedEvent, dict[str, Any] | None]]:
    """One event per (type, natural key) of a user, in the user's stream order (by sequence), each with the merged
    record the record state keeps for it when that is not the event's data (``None``: it is).

    A provider's ``interval_samples`` are kept in the record as mapped (one sample per interval and part) and
    delivered as ``transforms.interval_samples.emitted`` makes them (running totals, parts combined): the event's data
    and id are of the delivered copy, the state keeps the record the next fragments merge into.

    Fragments fold oldest → newest by (provider version, arrival sequence) on top of the stored
    record, if any; a fragment older than the stored version only fills what the stored record
    lacks (``RecordMerge.fill``: fields; samples at an (instant, part) it lacks of an interval list, or of a row (a
    fragment whose sample lists hold one sample each: an Oura heart-rate row, a Withings weigh-in; or rows joined,
    ``Keyed.rows``), even inside the span the stored samples cover; of a series, only outside that span), unless it
    is not newer than the deletion the record was re-created after (its ``generation``) or than the fragment that
    last replaced the record (``replaced``, kept in the state row): then it is dropped. Each event carries the whole
    merged record (destinations overwrite by key), and an ordering timestamp that grows whenever the
    record's content does, so no destination guard ever takes a richer record for a stale copy: a record left
    different from the stored one at the version destinations hold moves one past it, once per merge and not once per
    fragment (a message's rows share its arrival time: a record versioned one past per row would take the next
    message, arriving a few ms later, for stale). Neither the fragments nor the stored records change.

    Deletions fold in the same order: a deletion makes the record a tombstone (delivered as a tombstone event),
    versioned after the live record it deletes (``max(its version, the record's + 1)``; an unversioned deletion's
    version is its arrival time, so it too comes after whatever is stored; one not newer than the stored record's
    generation is that deletion redelivered, and changes nothing). At equal versions the deletion wins,
    whatever the arrival order: data not newer than a deletion is stale and the record stays deleted. Data newer than
    it re-creates the record from nothing (never merged onto the deleted one), with the deletion's version as its
    ``generation`` (mixed into its events' ids). A versioned deletion older than the stored record changes nothing.

    A fragment that ``replaces`` (``connectors.base.Fragment.replaces``) and is not stale starts the record afresh:
    the fields it lacks are cleared (fragments after it merge into it as usual). At an equal version the ordering
    timestamp moves only if the record the merge leaves differs from the stored one (a redelivered message, or a
    replacement with what was there, moves nothing).

    ``on_dropped(name, count)`` is told what the merge left out (``samples_outside_window``: see
    ``RecordMerge.fold_record``).
    """
    dropped = 0
    groups: dict[tuple[str, str], list[Keyed]] = {}
    for fragment in fragments:
        groups.setdefault((fragment.type, fragment.natural_key), []).append(fragment)
    events: list[tuple[NormalizedEvent, dict[str, Any] | None]] = []
    for (model_type, key), versions in groups.items():
        versions.sort(key=lambda f: (f.version_ms, f.sequence))
        data, version = (stored or {}).get((model_type, key), ({}, 0))
        held = version  # the version destinations hold of this record
        deleted = stored_deletion(data)
        data, generation, replaced = stored_marks(data)
        start_time = deleted.get("start_time") if deleted is not None else _start_time(data)
        if deleted is not None:
            data = {}
        merge = RecordMerge()
        record = merge.record(data)
        stale = {id(f) for f in versions if _stale(f, version, deleted is not None, generation)}
        # older than the stored record: fill gaps; not newer than the deletion the record was re-created after, or
        # than the fragment that replaced it (what it cleared stays gone), or older than a deletion: nothing
        gaps_after = max(generation or 0, replaced or 0)
        # a stale fragment that replaces (a whole record of its own: a WHOOP cycle) fills nothing into a newer one
        stale_data = [f for f in versions
                      if id(f) in stale and not f.deleted and not f.replaces and f.version_ms > gaps_after]
        newest = versions[-1]
        spec = _interval_spec(newest.provider, model_type)
        if stale_data and deleted is None:
            filled = merge.record({})
            for fragment in stale_data:
                merge.fold_record(filled, fragment.data, joined=bool(fragment.rows))
            intervals = {path[-1] for path in spec.paths} if spec is not None else ()
            row_ids = {id(sample) for fragment in stale_data
                       for sample in _row_samples(fragment.data, joined=bool(fragment.rows))}
            merge.fill(filled, data, intervals, row_ids)
            if filled != data:  # they added fields: the merged record is newer than what destinations hold
                record, version = filled, version + 1
        for fragment in versions:
            if id(fragment) in stale:
                continue
            if fragment.deleted:
                if deleted is None:  # a live record (or none): the tombstone comes after it
                    start_time = _start_time(record) or start_time
                    version = max(fragment.version_ms, version + 1)
                elif not fragment.unversioned:
                    version = max(version, fragment.version_ms)
                deleted = {}
                continue
            if deleted is not None:
                if fragment.version_ms <= version:  # not newer than the deletion: it stays deleted
                    continue
                dropped += merge.samples_outside_window
                deleted, merge, generation = None, RecordMerge(), version  # re-created: a fresh record
                record = merge.record({})
            if fragment.replaces:
                replaced = max(replaced or 0, fragment.version_ms)
                if record:  # the whole record, newer: what it lacks is gone
                    dropped += merge.samples_outside_window
                    merge = RecordMerge()
                    record = merge.record({})
            merge.fold_record(record, fragment.data, joined=bool(fragment.rows))
            version = max(version, fragment.version_ms)
        if deleted is None and version == held and record != data:  # new content at the version held: one past it
            version += 1
        dropped += merge.samples_outside_window
        reference = next((f.reference for f in reversed(versions) if f.reference), None)
        sequence = max(f.sequence for f in versions)
        if deleted is not None:
            events.append((NormalizedEvent.tombstone(
                type=model_type, user=newest.user, natural_key=key, ordering_timestamp_ms=version, sequence=sequence,
                raw_idempotency_key=newest.raw_idempotency_key, start_time=start_time, reference=reference), None))
            continue
        delivered = emitted(record, spec) if spec is not None else record
        events.append((NormalizedEvent.create(
            type=model_type, user=newest.user, data=delivered, natural_key=key, ordering_timestamp_ms=version,
            sequence=sequence, raw_idempotency_key=newest.raw_idempotency_key,
            reference=reference, generation=generation, replaced=replaced), None if delivered is record else record))
    events.sort(key=lambda pair: pair[0].sequence)
    if dropped and on_dropped is not None:
        on_dropped("samples_outside_window", dropped)
    return events


def _row_samples(record: dict[str, Any], joined: bool = False) -> list[dict[str, Any]]:
    """The samples of a row (a record whose every sample list holds one sample: an Oura heart-rate row, a Withings
    weigh-in, which a fold never lets displace the samples around it); none for a record holding no sample list, or
    a longer one, unless ``joined`` (the record is rows joined, ``Keyed.rows``: every sample is a row's)."""
    samples: list[dict[str, Any]] = []

    def visit(value: dict[str, Any]) -> bool:
        for item in value.values():
            if isinstance(item, dict):
                if not visit(item):
                    return False
            elif isinstance(item, list) and _sample_list(item):
                if len(item) != 1 and not joined:
                    return False
                samples.extend(item)
        return True

    return samples if visit(record) else []


def _interval_spec(slug: str, model_type: str) -> IntervalSamples | None:
    """What provider ``slug`` declares of ``model_type``'s interval sample lists (None: nothing, or no provider)."""
    if not slug:
        return None
    try:
        return get_provider(slug).interval_samples.get(model_type)
    except KeyError:
        return None


def _stale(fragment: Keyed, stored_version: int, stored_deleted: bool, generation: int | None = None) -> bool:
    """Whether ``fragment`` is older than what the state holds: data older than a stored record (it only fills
    gaps), data not newer than a stored deletion, a versioned deletion older than the stored version, an unversioned
    deletion not newer than the deletion the stored record was re-created after (``generation``: its redelivery)."""
    if fragment.deleted:
        if fragment.unversioned:
            return generation is not None and fragment.version_ms <= generation
        return fragment.version_ms < stored_version
    return fragment.version_ms <= stored_version if stored_deleted else fragment.version_ms < stored_version


def _start_time(record: dict[str, Any]) -> str | None:
    start = (record.get("metadata") or {}).get("start_time") if isinstance(record, dict) else None
    return start if isinstance(start, str) and start else None


def normalize_in_memory(messages: Iterable[RawMessage]) -> tuple[list[NormalizedEvent], list[Failed]]:
    """The normalize step without Beam or record state: events per user in order, and the failures.

    For the ``normalize`` command, benchmarks and tests; the pipeline does the same with GroupByKey.
    """
    by_user: dict[str, list[Keyed]] = {}
    failures: list[Failed] = []
    with _mapping_gc():
        for message in messages:
            for item in normalize_message(message):
                if isinstance(item, Failed):
                    failures.append(item)
                else:
                    by_user.setdefault(item.user["user_id"], []).append(item)
        return [e for user, keyed in by_user.items() for e in merge_user_events(user, keyed)], failures


MAPPING_GC_THRESHOLD = 50_000  # allocations between young-generation collections while mapping (CPython's: 700)


def tune_gc_for_mapping() -> None:
    """Fit the garbage collector to a process that maps records (a worker: the mapping DoFns' ``setup``); once.

    Mapping makes millions of small dicts and lists that die young, freed by reference counting when dropped;
    cycles are rare. CPython collects its young generation every 700 net allocations, scanning objects that die
    anyway: ~15 % of the mapper loop's CPU. Every 50,000 it is ~1 %, and cyclic garbage still goes (a few MB
    later). ``gc.freeze()`` first sets what is loaded by then (modules, schemas, generated validators) aside, so
    the full collections that still run scan only the work's objects. Peak RSS stays as it was (bench/memory.py).
    """
    young, middle, old = gc.get_threshold()
    if young < MAPPING_GC_THRESHOLD:
        gc.freeze()
        gc.set_threshold(MAPPING_GC_THRESHOLD, middle, old)


@contextlib.contextmanager
def _mapping_gc() -> Iterator[None]:
    """``tune_gc_for_mapping``'s threshold while an in-memory run lasts, then the caller's (without ``gc.freeze``:
    a function call must not keep its caller's garbage for good)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(MAPPING_GC_THRESHOLD, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _opened_store(state: Any) -> Any:
    state.open()
    return state


class MergePerUser(beam.DoFn):
    """(user key, [UserDocuments…]) → (user id, UserEvents): each user's documents mapped and validated (what
    cannot be is dead-lettered, stage ``normalize``/``validate``), then merged with, and saved to, the record state.

    Users are buffered and flushed together (one state read and one write per flush). State is
    saved before delivery: a run that dies after saving re-reads its input and re-emits the same
    merged records, so delivery stays at least once. A user whose merge or save fails for a reason
    of its own is dead-lettered (stage ``merge``/``state``) and the others go on; a store that is
    unavailable is waited for (``STORE_PATIENCE_S``), never taken for bad data: a failure of the store itself
    (RetryableError, FatalError) is never dead-lettered.
    """

    STORE_PATIENCE_S: float | None = 300.0  # bounded input: a run fails (and commits nothing) after this long

    def __init__(self, state_url: str, users_per_flush: int = 200) -> None:
        self.state_url, self.users_per_flush = state_url, users_per_flush

    def setup(self) -> None:
        tune_gc_for_mapping()
        self.state = acquire("record-state", self.state_url, lambda: self._patiently(
            lambda: _opened_store(open_state(self.state_url))))
        self.users = acquire("user-directory", self.state_url, lambda: self._patiently(
            lambda: UserDirectory(self.state_url).open()))

    def teardown(self) -> None:
        release("record-state", self.state_url, self.state)
        release("user-directory", self.state_url, self.users)

    def start_bundle(self) -> None:
        self.pending: list[tuple[str, list[UserFragments], Any, Any]] = []
        self.tally = Tally()

    def process(self, element: tuple[str, Iterable[bytes]], window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator[Any]:
        user_key, packs = element
        mapped = []
        for part in (part for packed in packs for part in unpack_parts(packed)):
            fragments, outputs = self._map(part)
            yield from outputs
            if fragments is not None:
                mapped.append(fragments)
        if mapped:
            self.pending.append((user_key, mapped, window, timestamp))
        if len(self.pending) >= self.users_per_flush:
            yield from self._flush()

    def _map(self, part: UserDocuments) -> tuple[UserFragments | None, list[Any]]:
        """Map and validate one part's documents: its fragments (None when none) and its dead letters or end."""
        message = part.message
        try:
            if part.records is not None:  # mapped before the shuffle
                items: list[Keyed | Failed] = list(part.records)
            else:
                read = read_documents(message, part.checked,
                                      json_codec.loads_read_by_orjson if part.orjson_read else json_codec.loads)
                items = [read] if isinstance(read, Failed) else list(map_documents(
                    message, *read, part.documents, False if part.checked else None, tally=self.tally))
        except Exception as exc:
            items = [_failed("normalize", exc, message)]
        failed = [item for item in items if isinstance(item, Failed)]
        keyed = tuple(item for item in items if isinstance(item, Keyed))
        shares = split_acks(part.acks, len(failed) + (1 if keyed else 0))
        outputs: list[Any] = list(_dead_letters(failed, shares, self.tally))
        if not keyed and not failed and part.acks:
            outputs.append(pvalue.TaggedOutput(ENDED, part.acks))
        if part.only_part:
            self.tally.add(_raw_outcome(bool(keyed), bool(failed or part.failed_before)))
        self.tally.add("fragments", sum(fragment.fragment_count for fragment in keyed))
        for name, count in (item for fragment in keyed for item in fragment.dropped):
            self.tally.add(f"plausibility:{name}", count)
        return (UserFragments(keyed, message, shares[-1]) if keyed else None), outputs

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._flush()
        yield from self.tally.flush()

    def _patiently(self, action: Any) -> Any:
        """Run ``action``, waiting out a store that is unavailable (the store reconnects by itself) for up to
        STORE_PATIENCE_S (None: as long as it takes); FatalError is raised at once."""
        return wait_out(action, "record state", self.STORE_PATIENCE_S, log=log)

    def _resolve(self, fragments: list[Keyed]) -> tuple[str, list[Keyed]]:
        """Give an account's fragments the user of its connection, when it has one."""
        first = fragments[0]
        user = self._patiently(lambda: self.users.resolve(first.provider, first.provider_user_id,
                                                          first.user["provider"]))
        if user is None:
            return first.user["user_id"], fragments
        return user["user_id"], [dataclasses.replace(f, user=user) for f in fragments]

    def _flush(self) -> Iterator[Any]:
        pending, self.pending = self.pending, []
        if not pending:
            return
        grouped: dict[tuple[str, Any], tuple[list[UserFragments], Any]] = {}
        for user_key, parts, window, timestamp in pending:  # one merge per user and window, in arrival order
            found = grouped.setdefault((user_key, window), ([], timestamp))
            found[0].extend(parts)
            if timestamp > found[1]:
                grouped[(user_key, window)] = (found[0], timestamp)
        failed: list[tuple[str, BaseException, list[UserFragments], Any, Any]] = []
        users = []
        for (_, window), (parts, timestamp) in grouped.items():
            try:
                users.append((self._resolve([f for part in parts for f in part.fragments]), parts, window, timestamp))
            except (RetryableError, FatalError):
                raise
            except Exception as exc:  # this account cannot be looked up (a value the store refuses): its own failure
                failed.append(("resolve", exc, parts, window, timestamp))
        loaded, unloadable = self._isolating(users, lambda batch: self._load(
            sorted({(user, f.type, f.natural_key) for (user, frags), *_ in batch for f in frags})))
        failed.extend(("state", exc, parts, window, timestamp) for exc, (_, parts, window, timestamp) in unloadable)
        stored_by_user: dict[str, Stored] = {}
        for found in loaded:
            for (user, model_type, key), value in found.items():
                stored_by_user.setdefault(user, {})[(model_type, key)] = value
        merged = []
        for (user_id, fragments), parts, window, timestamp in users:
            if any(parts is item[1] for _, item in unloadable):
                continue
            left_out: Counter[str] = Counter()
            try:
                events = merge_user_records(user_id, fragments, stored_by_user.get(user_id),
                                            lambda name, count, left_out=left_out: left_out.update({name: count}))
            except Exception as exc:  # this user's records cannot merge: theirs alone fail
                failed.append(("merge", exc, parts, window, timestamp))
                continue
            merged.append((user_id, events, parts, window, timestamp, left_out))
        _, unsaved = self._isolating(merged, lambda batch: self._save([events for _, events, *_ in batch]))
        failed.extend(("state", exc, parts, window, timestamp) for exc, (_, _, parts, window, timestamp, _) in unsaved)
        merged = [item for item in merged if not any(item is bad for _, bad in unsaved)]
        for user_id, records, parts, window, timestamp, left_out in merged:
            # what the merge left out, tallied once saved (a user merged again one message at a time is tallied then)
            for name, count in left_out.items():
                self.tally.add(f"plausibility:{name}", count)
            events = [event for event, _ in records]
            self.tally.add("superseded", sum(f.fragment_count for p in parts for f in p.fragments) - len(events))
            for event in events:
                self.tally.add(f"normalized:{event.provider.lower()}:{event.type}")
                if event.deleted:  # of which tombstones
                    self.tally.add(f"tombstones:{event.provider.lower()}:{event.type}")
            acks = join_acks(p.acks for p in parts)
            yield WindowedValue((user_id, UserEvents(tuple(events), acks)), timestamp, [window])
        for stage, exc, parts, window, timestamp in failed:
            if len(parts) > 1:  # find the message at fault: this user's messages again, one at a time, in order
                for part in parts:
                    self.pending = [(f"alone:{id(part)}", [part], window, timestamp)]
                    yield from self._flush()
                continue
            for part in parts:
                self.tally.add(f"dead_letter:{stage}")
                record = _failed(stage, exc, part.message, user=part.fragments[0].user["user_id"]).record
                yield pvalue.TaggedOutput(DEAD_LETTER, WindowedValue(DeadLetterOut(record, part.acks), timestamp,
                                                                      [window]))

    def _isolating(self, items: list[Any], action: Any) -> tuple[list[Any], list[tuple[BaseException, Any]]]:
        """``action(items)`` (waiting out an unavailable store); when it fails for a reason of the data, ``action``
        item by item, so one user's bad value fails that user alone. Returns (results, [(error, item)])."""
        if not items:
            return [], []
        try:
            return [self._patiently(lambda: action(items))], []
        except (RetryableError, FatalError):
            raise
        except Exception:  # some item's data: find which
            results, failures = [], []
            for item in items:
                try:
                    results.append(self._patiently(lambda item=item: action([item])))
                except (RetryableError, FatalError):
                    raise
                except Exception as exc:
                    failures.append((exc, item))
            return results, failures

    def _load(self, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], tuple[dict[str, Any], int]]:
        return self.state.load(keys) if keys else {}

    def _save(self, merged: list[list[tuple[NormalizedEvent, dict[str, Any] | None]]]) -> None:
        self.state.save(((e.user_id, e.type, e.natural_key), state_row(e, record), e.ordering_timestamp_ms)
                        for records in merged for e, record in records)


class MergePerUserStateful(MergePerUser):
    """``MergePerUser`` for unbounded input: keyed state makes the runner merge one user at a time. A streaming job
    waits out a store outage for as long as it lasts, then resumes where it was."""

    STORE_PATIENCE_S = None

    SERIAL = userstate.ReadModifyWriteStateSpec("serial", BooleanCoder())

    def process(self, element: tuple[str, bytes], window=beam.DoFn.WindowParam,  # type: ignore[override]
                timestamp=beam.DoFn.TimestampParam, serial=beam.DoFn.StateParam(SERIAL)) -> Iterator[Any]:
        user_key, part = element
        return super().process((user_key, [part]), window, timestamp)


class Normalize(beam.PTransform):
    """PCollection[RawMessage] → (PCollection[(user_id, UserEvents)], dead letters, ended acks, tallies).

    Bounded input merges each user's records of the whole run at once (GroupByKey); unbounded
    input merges as records arrive, one user at a time (keyed state), with no window or trigger to
    wait for. Dead letters keep the raw bytes.
    """

    def __init__(self, state_url: str) -> None:
        super().__init__()
        self.state_url = state_url

    def expand(self, messages):
        keyed, dead, ended, raw_tallies = messages | "SplitByUser" >> beam.ParDo(SplitByUser()).with_output_types(
            tuple[str, bytes]).with_outputs(DEAD_LETTER, ENDED, TALLY, main="keyed")
        if keyed.is_bounded:
            merged = (keyed
                      | "GroupByUser" >> beam.GroupByKey()
                      | "MergePerUser" >> beam.ParDo(MergePerUser(self.state_url)).with_outputs(
                          DEAD_LETTER, ENDED, TALLY, main="events"))
        else:
            merged = keyed | "MergePerUser" >> beam.ParDo(MergePerUserStateful(self.state_url)).with_input_types(
                tuple[str, bytes]).with_output_types(tuple[str, Any]).with_outputs(
                DEAD_LETTER, ENDED, TALLY, main="events")
        dead_letters = (dead, merged[DEAD_LETTER]) | "IngestDeadLetters" >> beam.Flatten()
        ended = (ended, merged[ENDED]) | "IngestEnded" >> beam.Flatten()
        tallies = (raw_tallies, merged[TALLY]) | "IngestTallies" >> beam.Flatten()
        return merged.events, dead_letters, ended, tallies
