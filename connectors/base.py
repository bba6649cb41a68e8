"""The provider framework: a provider is one folder under ``connectors/`` that declares how its
payloads split into documents and registers one small mapper per raw kind.

A mapper is a pure function ``document -> Terra record dict`` (or an iterable of them, or
``Fragment``s, or ``Deletion``s when the provider says a record is gone). It raises ``MappingError``
for input it cannot map; the pipeline turns that into a dead letter that keeps the original bytes.
Mappers never do I/O.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connectors.timeutil import parse_iso
from schemas import MODEL_TYPES
from schemas.serde import compact as compact  # mappers import it from here

TERRA_USER_NAMESPACE = uuid.UUID("6f0d3f3e-4b8e-5c1a-9a57-0c4f3b9f4e21")


class MappingError(ValueError):
    """The payload cannot be mapped (missing or invalid field). Permanent: goes to dead letters."""


class UnknownKind(MappingError):
    """The provider sent a kind healthflow does not map (yet)."""


@dataclass(frozen=True)
class Fragment:
    """One normalized record (or part of one) for a single user.

    Several fragments with the same (user, type, natural key) in one batch merge into one event,
    newest ``version_ms`` winning field by field: Garmin epochs fill in the day's Daily, a WHOOP
    recovery completes its sleep.

    ``part`` names the share of an interval this fragment's samples hold, in the sample lists its provider declares
    (``Provider.interval_samples``): Garmin sends one epoch per activity type per 15-minute slice. Samples of
    different parts at one instant are kept apart in the record (an update of one part replaces that part alone) and
    combined when the record is delivered.

    ``replaces``: the fragment is the whole record as the provider has it now (a WHOOP sleep fetched with its
    recovery, or with none left): newer than the stored record, it replaces it, so fields it lacks are cleared;
    older, it only fills gaps like any stale fragment. Without ``version_ms`` its version is its arrival time.
    """

    type: str
    data: dict[str, Any]
    provider_user_id: str | None = None
    version_ms: int | None = None
    part: str | None = None
    replaces: bool = False


@dataclass(frozen=True)
class Deletion:
    """The provider says a record no longer exists: delivered as a tombstone event to every destination.

    ``natural_key`` is the record's upsert key within (user, ``type``), as ``natural_key()`` gives it: the
    ``summary_id`` of an activity or sleep, the day (``YYYY-MM-DD``) of a day-scoped record. ``version_ms``
    orders it against the record's data versions (newest wins, as for fragments).
    """

    type: str
    natural_key: str
    provider_user_id: str | None = None
    version_ms: int | None = None


@functools.lru_cache(maxsize=1 << 16)
def terra_user_id(provider: str, provider_user_id: str) -> str:
    """Stable healthflow user id (a UUID, as Terra's) for one provider connection."""
    return str(uuid.uuid5(TERRA_USER_NAMESPACE, f"{provider.lower()}:{provider_user_id}"))


def natural_key(model_type: str, data: dict[str, Any]) -> str:
    """The upsert key of a record within (user, type), as Terra defines it."""
    metadata = data.get("metadata") or {}
    if model_type in ("activity", "sleep"):
        key = metadata.get("summary_id")
        if not key:
            raise MappingError(f"{model_type} record has no metadata.summary_id")
        return str(key)
    if model_type == "athlete":
        return "profile"
    start = metadata.get("start_time")
    if not start or len(start) < 10:
        raise MappingError(f"{model_type} record has no metadata.start_time")
    return start[:10]


Mapper = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class IntervalSamples:
    """Sample lists of one model that a provider's mappers emit one interval (and one ``Fragment.part`` of it) at a
    time, each sample at its interval's start: the record state keeps them so, and an update of an interval replaces
    it; the delivered record has them as ``transforms.interval_samples.emitted`` makes them.

    ``amounts`` (dotted paths: steps, metres, kcal over the interval) are delivered as Terra's running totals since
    the record's start, each at its interval's end (``seconds`` after its start; 0 for intervals of varying length,
    whose samples the mapper places at their end); the parts of one interval add up.
    ``levels`` (MET, activity level over the interval) stay at the interval's start; of its parts, the highest.
    """

    seconds: int
    amounts: tuple[str, ...] = ()
    levels: tuple[str, ...] = ()

    @functools.cached_property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        """Every declared list's path, split into its keys."""
        return tuple(tuple(path.split(".")) for path in (*self.amounts, *self.levels))


@dataclass(frozen=True)
class KindSpec:
    name: str
    models: tuple[str, ...]
    mapper: Mapper
    doc: str
    context: tuple[str, ...] = ()  # document fields the provider's answer lacks, attached by the poll hook


@dataclass
class Provider:
    """Declarative description of one provider's raw format.

    ``envelope`` says how a payload holds documents: ``"keyed"`` (Garmin: ``{kind: [docs]}``),
    or the name of the list field (``"data"`` for Oura, ``"records"`` for WHOOP), plus ``list_fields`` for a provider
    that names its lists per endpoint (Polar's ``nights``, ``recharges``); a payload
    that is a single document, or a bare JSON array of documents, is accepted too (for ``"keyed"``, when the raw
    event names its kind: a pull answer). ``user_field``
    names the document field holding the provider's user id (``None``: the id comes with the raw event, as for Oura).

    A document belongs to one user (``owner_of``): every record a mapper makes of it is that user's, and the
    pipeline sends the document to that user's merge before mapping it. A provider whose records name their own
    user (``records_name_their_user``: Polar's page documents link to theirs) has its messages mapped before the
    shuffle instead.

    With ``compacts``, the framework compacts every record the mappers make (``compact``: absent == null), so a
    mapper returns its record as built, ``None`` and empty parts included; without it (a mapper that adds an empty
    object Terra requires after compacting: Fitbit's meals), records are taken as the mapper returns them.

    ``interval_samples`` (model → ``IntervalSamples``) declares the sample lists its mappers emit as per-interval
    amounts and levels rather than as Terra delivers them.
    """

    slug: str
    terra_name: str
    envelope: str
    user_field: str | None = None
    list_fields: tuple[str, ...] = ()
    doc: str = ""
    records_name_their_user: bool = False
    compacts: bool = False
    interval_samples: dict[str, IntervalSamples] = field(default_factory=dict)
    kinds: dict[str, KindSpec] = field(default_factory=dict)
    manifest: Any = None  # connectors.manifest.Manifest, attached by the registry from manifest.yaml

    def kind(self, name: str, *models: str, doc: str = "", context: tuple[str, ...] = ()) -> Callable[[Mapper], Mapper]:
        """Register the mapper for raw kind ``name`` producing records of ``models``.

        ``context`` names the fields the mapper needs that the provider's own document lacks (a WHOOP recovery's
        ``sleep``): a kind the provider is polled or notified for must then have a poll hook that ``attaches`` them,
        or the registry refuses to start.

        No ``models``: a kind the provider sends that healthflow knowingly does not map (Terra's model has no field
        for it). Its documents are acknowledged and counted (``ignored:<provider>:<kind>``), never dead-lettered as
        an unknown kind; the mapper (which returns nothing) documents why."""
        unknown = set(models) - set(MODEL_TYPES)
        if unknown:
            raise ValueError(f"{self.slug}.{name}: unknown model types {sorted(unknown)}")

        def register(fn: Mapper) -> Mapper:
            self.kinds[name] = KindSpec(name, models, fn, doc or (fn.__doc__ or "").strip(), tuple(context))
            return fn

        return register

    def ignores(self, kind: str) -> bool:
        """``kind`` is one healthflow knowingly does not map (registered with no models)."""
        spec = self.kinds.get(kind)
        return spec is not None and not spec.models

    def documents(self, payload: Any, kind: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Split a decoded payload into ``(kind, document)`` pairs."""
        if self.envelope == "keyed":
            keyed_body = isinstance(payload, dict) and all(isinstance(docs, list) for docs in payload.values())
            if kind and (isinstance(payload, list) or (isinstance(payload, dict) and not keyed_body)):
                # a pull answer (a bare array of that kind) or a single document, its kind named by the raw event
                for doc in payload if isinstance(payload, list) else [payload]:
                    yield kind, doc
                return
            if not isinstance(payload, dict):
                raise MappingError(f"{self.slug} payload must be a JSON object keyed by summary type (or name its "
                                   "kind with the raw event)")
            for key, docs in payload.items():
                if kind and key != kind:
                    raise MappingError(f"payload holds {key!r} but the raw event says kind {kind!r}")
                if not isinstance(docs, list):
                    raise MappingError(f"{self.slug} {key!r} must be a list of summaries")
                for doc in docs:
                    yield key, doc
            return
        if not kind:
            raise MappingError(f"{self.slug} payloads do not name their kind; give one of: {', '.join(self.kinds)}")
        if isinstance(payload, list):  # some APIs answer with a bare JSON array of documents
            docs = payload
        else:
            key = next((name for name in (self.envelope, *self.list_fields)
                        if isinstance(payload, dict) and name in payload), None)
            docs = [payload] if key is None else payload[key]
        if not isinstance(docs, list):
            raise MappingError(f"{self.slug} {key!r} must be a list")
        for doc in docs:
            yield kind, doc

    def normalize(self, payload: Any, kind: str | None = None, user_id: str | None = None) -> Iterator[Fragment]:
        """Map every document of a payload; raises MappingError on the first one that cannot be mapped."""
        for doc_kind, doc in self.documents(payload, kind):
            yield from self.normalize_document(doc_kind, doc, user_id)

    def owner_of(self, kind: str, doc: Any, user_id: str | None = None) -> str:
        """The provider user id a document belongs to (``user_field``, else ``user_id``); MappingError for a kind
        that is not mapped, a document that is not an object, or no user at all."""
        spec = self.kinds.get(kind)
        if spec is None:
            raise UnknownKind(f"{self.slug} kind {kind!r} is not mapped; mapped kinds: {', '.join(self.kinds)}")
        if not isinstance(doc, dict):
            raise MappingError(f"{self.slug} {kind} document must be a JSON object, got {type(doc).__name__}")
        doc_user = doc.get(self.user_field) if self.user_field else None
        owner = str(doc_user) if doc_user is not None else user_id
        if owner is None:
            raise MappingError(f"{self.slug} {kind} document has no user id; pass the user with the raw event")
        return owner

    def normalize_document(self, kind: str, doc: Any, user_id: str | None = None,
                           compacted: bool = True) -> list[Fragment | Deletion]:
        """Map one document of ``owner_of(kind, doc, user_id)``; every fragment is that user's (or, with
        ``records_name_their_user``, the user it names).

        A ``compacts`` provider's records are compacted here, unless ``compacted=False``: then they are as the
        mappers made them, for a caller that compacts them as it validates them (``schemas.serde.conform_record``)."""
        owner = self.owner_of(kind, doc, user_id)
        spec = self.kinds[kind]
        try:
            produced = spec.mapper(doc)
        except MappingError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
            raise MappingError(f"{self.slug} {kind}: {type(exc).__name__}: {exc}") from exc
        compacting = self.compacts and compacted
        fragments = [_owned(item, owner, compacting) for item in _as_fragments(produced, spec, owner)]
        if not self.records_name_their_user:
            for fragment in fragments:
                if fragment.provider_user_id is not owner and str(fragment.provider_user_id) != owner:
                    raise MappingError(f"{self.slug} {kind}: the mapper made a record of user "
                                       f"{fragment.provider_user_id!r} from a document of user {owner!r}")
        return fragments


def _owned(item: Fragment | Deletion, owner: str, compacting: bool) -> Fragment | Deletion:
    """``item`` with its user (``owner`` unless it names one), its data compacted when ``compacting``."""
    if isinstance(item, Deletion):
        return item if item.provider_user_id else Deletion(item.type, item.natural_key, owner, item.version_ms)
    if item.provider_user_id and not compacting:
        return item  # a frozen Fragment as it is
    return Fragment(item.type, compact(item.data) if compacting else item.data, item.provider_user_id or owner,
                    item.version_ms, item.part, item.replaces)


def _as_fragments(produced: Any, spec: KindSpec, owner: str) -> Iterable[Fragment | Deletion]:
    """What a mapper produced as Fragments (and Deletions); a record (a dict) is ``owner``'s."""
    if produced is None:
        return []
    if type(produced) is Fragment:  # what most mappers return: one fragment
        return [produced]
    items = produced if isinstance(produced, list | tuple) or hasattr(produced, "__next__") else [produced]
    out = []
    for item in items:
        if isinstance(item, Fragment | Deletion):
            out.append(item)
        elif len(spec.models) == 1:
            out.append(Fragment(spec.models[0], item, owner))
        else:
            raise TypeError(f"{spec.name} maps to several models and must yield Fragment objects")
    return out


def timestamp_field(doc: dict[str, Any], name: str, path: str | None = None) -> datetime:
    """An ISO-8601 field that must carry its UTC offset; MappingError naming the field otherwise."""
    text, path = doc.get(name), path or name
    if not isinstance(text, str):
        raise MappingError(f"{path} must be an ISO-8601 timestamp, got {text!r}")
    try:
        return parse_iso(text)
    except ValueError as exc:
        raise MappingError(f"{path}: {exc}") from exc
