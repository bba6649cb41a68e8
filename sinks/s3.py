"""S3 sink (boto3): Terra's cloud-storage layout, one JSON object per record, plus optional Parquet batches.

JSON (format ``"json"``): object ``<prefix>/<version>/<type>/<user_id>-<start_time>.json`` (athlete: ``profile``),
body = ``event.body()``, ``ContentType: application/json``, user metadata ``event-id`` and ``ordering-timestamp-ms``.
Parquet (format ``"parquet"``): per ``write`` call one file per event type, named from its event ids
(``sinks.parquet``).

Guarantees:
- Idempotent: names are deterministic; a redelivery rewrites the same object, never a second copy. An object that
  already holds the same ``event-id`` is not rewritten.
- Newest wins (``guard_stale=True``): before a PUT the object is HEADed; an event older than the stored object
  (lower ``ordering_timestamp_ms`` than its metadata) does not overwrite it and is reported delivered (superseded).
  Equal timestamps: the later write wins. Objects without our metadata count as older.
  With ``conditional_writes=True`` (default) the PUT carries ``If-Match: <HEAD ETag>`` (or ``If-None-Match: *`` when
  there was no object), so a writer that slipped in between HEAD and PUT makes the PUT fail (412) and the check is
  redone: no race is left. With ``conditional_writes=False`` (stores without S3 conditional writes) a newer version
  written between our HEAD and PUT can still be overwritten by an older event (last writer wins in that window).
  HEAD needs ``s3:GetObject`` and ``s3:ListBucket`` (without it S3 answers 403 for missing keys); with
  ``guard_stale=False`` only ``s3:PutObject`` is needed and the store is plain last-writer-wins.
- Within a batch, events mapping to one object: only the newest is written, the others are reported delivered with it.
- Concurrency: a run of data events writes its JSON objects up to ``concurrency`` at once (default 8;
  ``sinks.concurrent_writes``: one at a time until one is written, no thread at all with ``concurrency=1`` or two
  objects or fewer), each object's HEAD/PUT sequence above in one thread; a run of tombstones waits for every write
  before it, and the writes after it wait for it. A failure that stops the batch lets no further PUT start; the
  result is what writing one object after another would have reported (an object already in flight past the one
  that stopped the batch is reported not tried even when it was written: a redelivery finds it ``unchanged``).
  The client keeps up to ``max(10, concurrency)`` connections.
- A tombstone (``event.deleted``) removes the record's JSON object(s) (``sinks.object_store.deleted_objects``: by its
  ``start_time`` if the body names its ``summary_id`` (activity, sleep), every object of the user's day, or, for an
  activity or sleep never seen, the user's objects of that type whose body names its ``summary_id``), unless the stored
  object is newer than the tombstone (``guard_stale``). A run of tombstones is applied together: one listing per (user,
  type) where a name must be searched, one HEAD (GET where the body must be read) per object, DeleteObjects in chunks of
  1000, each object with the ETag read when ``conditional_writes`` (an object rewritten in between is refused by S3 and
  checked again: no race is left). Deleting what is gone is fine. Parquet batches are append-only: a tombstone is a row
  there with ``deleted`` true (readers keeping the newest row per record drop the record). A batch's data and tombstones
  apply in their order.
- Permissions: ``s3:PutObject``; ``s3:GetObject`` and ``s3:ListBucket`` unless ``guard_stale=False``; for tombstones
  ``s3:DeleteObject`` (DeleteObjects checks it per object), ``s3:ListBucket`` and ``s3:GetObject`` (to find and compare
  the objects). A tombstone the identity may not apply (access denied) is a ``PermanentError`` of that tombstone: it
  is dead-lettered with a reason naming the permission, and the run goes on.
- An event is delivered only when every configured format succeeded for it.
- Failures: unreachable endpoint, timeouts, throttling, 5xx -> ``RetryableError`` (an unreachable endpoint stops the
  batch: the rest is reported retryable without being tried); wrong credentials, access denied, missing bucket, wrong
  region -> ``FatalError`` saying what to fix (stops the batch); other client errors and unusable names (no
  ``metadata.start_time``, ``/`` or ``..`` in a name part) -> ``PermanentError`` for the events concerned.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.base import Sink, SinkResult
from sinks.concurrent_writes import DEFAULT_CONCURRENCY, ConcurrentWrites, checked_concurrency
from sinks.object_store import deleted_objects, holds_record, safe_part, terra_object_parts
from sinks.parquet import parquet_bytes, parquet_key

FORMATS = frozenset({"json", "parquet"})
META_EVENT_ID = "event-id"
META_ORDERING = "ordering-timestamp-ms"
CONFLICT_RETRIES = 5
DEFAULT_POOL_CONNECTIONS = 10  # botocore's default

_RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "ServiceUnavailable",
    "InternalError", "InternalFailure", "RequestTimeout", "RequestTimeoutException", "OperationAborted",
    "ConditionalRequestConflict", "KmsThrottled", "503", "500", "429",
})
_FATAL_HINTS = {
    "AccessDenied": "grant the sink's identity the needed permission (S3: s3:PutObject, plus s3:GetObject and "
                    "s3:ListBucket unless guard_stale=False, and s3:DeleteObject for tombstones, which are "
                    "dead-lettered without it; SQS: sqs:SendMessage)",
    "AccessDeniedException": "grant the sink's identity the needed permission",
    "AllAccessDisabled": "access to the bucket is disabled; use another bucket",
    "NoSuchBucket": "create the bucket or fix the bucket name",
    "InvalidBucketName": "fix the bucket name",
    "InvalidAccessKeyId": "the access key does not exist: fix AWS_ACCESS_KEY_ID / the configured credentials",
    "InvalidClientTokenId": "the access key does not exist: fix the configured credentials",
    "UnrecognizedClientException": "the credentials are not recognized: fix the configured credentials",
    "SignatureDoesNotMatch": "the secret key does not match the access key: fix AWS_SECRET_ACCESS_KEY",
    "ExpiredToken": "the session token expired: refresh the credentials",
    "ExpiredTokenException": "the session token expired: refresh the credentials",
    "InvalidToken": "the session token is invalid: fix the credentials",
    "AuthorizationHeaderMalformed": "the configured region does not match the bucket's region: fix region",
    "PermanentRedirect": "the bucket is in another region or needs another endpoint: fix region/endpoint_url",
    "RequestTimeTooSkewed": "the worker clock is off by more than 15 minutes: fix the clock (NTP)",
    "NotImplemented": "the store does not implement this request (e.g. conditional writes): adjust the sink options",
    "AWS.SimpleQueueService.NonExistentQueue": "the queue does not exist: create it or fix queue_url",
    "QueueDoesNotExist": "the queue does not exist: create it or fix queue_url",
    "InvalidSecurity": "the queue requires HTTPS: use an https endpoint",
    "KmsAccessDenied": "grant kms:GenerateDataKey and kms:Decrypt on the queue's KMS key",
    "KmsDisabled": "the queue's KMS key is disabled",
    "KmsNotFound": "the queue's KMS key does not exist",
    "KmsInvalidState": "the queue's KMS key is not usable",
    "KmsOptInRequired": "the account is not subscribed to KMS",
}


class EndpointUnreachable(RetryableError):
    """No connection to the service (connect error/timeout): retry later; the rest of the batch is not tried."""


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``""`` for other exceptions)."""
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)


def classify_aws_error(exc: BaseException, what: str) -> Exception:
    """Map a boto3/botocore exception raised while doing ``what`` to Retryable/Permanent/FatalError."""
    from botocore import exceptions as bex

    if isinstance(exc, RetryableError | PermanentError | FatalError):
        return exc
    if isinstance(exc, bex.ClientError):
        code, status = error_code(exc), http_status(exc)
        message = (exc.response.get("Error") or {}).get("Message") or ""
        detail = f"{what} failed: {code or status} (HTTP {status}) {message}".rstrip()
        if code in _FATAL_HINTS:
            return FatalError(f"{detail}; {_FATAL_HINTS[code]}")
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return RetryableError(detail)
        if status == 403:
            return FatalError(f"{detail}; access denied: check credentials and permissions")
        return PermanentError(detail)
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError | bex.NoRegionError):
        return FatalError(f"{what} failed: {exc}; configure AWS credentials and region for the workers")
    if isinstance(exc, bex.ParamValidationError):
        return PermanentError(f"{what} failed: invalid request: {exc}")
    if isinstance(exc, bex.ConnectionError) and not isinstance(exc, bex.ReadTimeoutError):
        return EndpointUnreachable(f"{what} failed: cannot reach the endpoint: {exc}")
    return RetryableError(f"{what} failed: {exc}")  # read timeouts, closed connections, other botocore errors


def make_client(service: str, endpoint_url: str | None, region: str | None, max_attempts: int,
                connect_timeout_s: float, read_timeout_s: float,
                max_pool_connections: int = DEFAULT_POOL_CONNECTIONS) -> Any:
    """A boto3 client with bounded botocore retries and timeouts (credentials from the default chain), keeping up to
    ``max_pool_connections`` connections (at least one per thread using it at once)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                    connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                    max_pool_connections=max_pool_connections)
    return boto3.session.Session().client(service, endpoint_url=endpoint_url, region_name=region, config=config)


def object_key(prefix: str, event: NormalizedEvent) -> str:
    """Terra's key ``<prefix>/<version>/<type>/<user_id>-<start_time>.json``; PermanentError when unusable."""
    return "/".join(p for p in [prefix.strip("/"), *terra_object_parts(event)] if p)


@dataclass(frozen=True)
class _Stored:
    etag: str
    event_id: str | None
    ordering_timestamp_ms: int | None


_SEVERITY = {FatalError: 3, PermanentError: 2}
_Fail = Callable[[Iterable[int], BaseException], None]  # records an error for batch positions (most severe wins)


def _severity(exc: BaseException) -> int:
    return next((rank for cls, rank in _SEVERITY.items() if isinstance(exc, cls)), 1)


class S3Sink(Sink):
    """Writes events to ``s3://<bucket>/<prefix>`` as JSON objects and/or Parquet batches (see module docstring)."""

    ordered = True

    def __init__(self, name: str, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, formats: Sequence[str] = ("json",), guard_stale: bool = True,
                 conditional_writes: bool = True, max_attempts: int = 3, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 30.0, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        super().__init__(name)
        self.concurrency = checked_concurrency("s3", name, concurrency)
        if not bucket or "/" in bucket:
            raise FatalError(f"s3 sink {name!r}: bucket must be a bucket name (no 's3://', no '/'), got {bucket!r}")
        unknown = set(formats) - FORMATS
        if not formats or unknown:
            raise FatalError(f"s3 sink {name!r}: formats must be a non-empty subset of {sorted(FORMATS)}, "
                             f"got {list(formats)}")
        if max_attempts < 1:
            raise FatalError(f"s3 sink {name!r}: max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.formats = tuple(sorted(set(formats)))
        self.guard_stale = guard_stale
        self.conditional_writes = conditional_writes
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._client: Any = None
        self._writes = ConcurrentWrites(name, self.concurrency)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # clients never travel with the pickled config
        return state

    def open(self) -> None:
        if self._client is None:
            self._client = make_client("s3", self.endpoint_url, self.region, self.max_attempts,
                                       self.connect_timeout_s, self.read_timeout_s,
                                       max_pool_connections=max(DEFAULT_POOL_CONNECTIONS, self.concurrency))

    def close(self) -> None:
        self._writes.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        self.open()
        errors: dict[int, BaseException] = {}

        def fail(indices: Iterable[int], exc: BaseException) -> None:
            for i in indices:
                if i not in errors or _severity(exc) > _severity(errors[i]):
                    errors[i] = exc

        halted: BaseException | None = None
        if "json" in self.formats:
            halted = self._write_json(events, fail)
        if "parquet" in self.formats:
            if halted is None:
                self._write_parquet(events, fail)
            else:  # Parquet not tried: no event is complete
                fail(range(len(events)), _not_tried(halted))
        result = SinkResult()
        for index, event in enumerate(events):
            if index in errors:
                result.fail_all([event], errors[index])
            else:
                result.delivered.append(event.event_id)
        return result

    # -- JSON objects -------------------------------------------------------------------------------------------------
    def _write_json(self, events: Sequence[NormalizedEvent], fail: _Fail) -> BaseException | None:
        """Writes one object per key, removes tombstones' objects, in the batch's order; returns the error that stopped
        the batch (rest failed with it), if any."""
        runs = [(deleting, list(run)) for deleting, run in itertools.groupby(range(len(events)),
                                                                               key=lambda i: events[i].deleted)]
        for position, (deleting, indices) in enumerate(runs):
            halted = (self._delete_json if deleting else self._put_json_run)(events, indices, fail)
            if halted is not None:
                for _, rest in runs[position + 1:]:
                    fail(rest, _not_tried(halted))
                return halted
        return None

    def _delete_json(self, events: Sequence[NormalizedEvent], indices: list[int], fail: _Fail) -> BaseException | None:
        """Remove the objects of a run of tombstones (``delete_json``); returns the error that stopped the batch, if
        any. A tombstone the identity may not apply (access denied) is a PermanentError of its own: dead-lettered
        naming the permission, never a FatalError stopping the run."""
        planned: dict[int, NormalizedEvent] = {}
        for index in indices:
            try:
                deleted_objects(events[index])
            except PermanentError as exc:
                fail([index], exc)
            else:
                planned[index] = events[index]
        if not planned:
            return None
        try:
            failed = self.delete_json(list(planned.values()))
        except Exception as exc:
            error = _deletion_error(exc)
            fail(planned, error)
            return error if isinstance(error, FatalError | EndpointUnreachable) else None
        by_id = {event.event_id: index for index, event in planned.items()}
        for event_id, error in failed.items():
            fail([by_id[event_id]], error)
        return None

    def delete_json(self, tombstones: Sequence[NormalizedEvent]) -> dict[str, BaseException]:
        """Remove the objects of the records ``tombstones`` delete (``deleted_objects``), all at once: one listing of
        each (user, type)'s objects where a name must be searched, one HEAD of each object found (a GET where its body
        must name the record), DeleteObjects in chunks of 1000. An object newer than every tombstone naming it stays
        (``guard_stale``); with ``conditional_writes`` each delete carries the ETag read, so an object rewritten in
        between is not removed but checked again. Returns the tombstones whose objects could not be removed, with why
        (an error stopping them all is raised)."""
        planned = [(event, where, "/".join(p for p in [self.prefix, *where.folder] if p))
                   for event in tombstones for where in [deleted_objects(event)]]
        listed: dict[str, list[str]] = {}
        for event, where, base in planned:
            prefix = f"{base}/{event.user_id}-"
            if not where.exact and prefix not in listed:
                pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
                listed[prefix] = [o["Key"] for page in pages for o in page.get("Contents", [])
                                  if o["Key"].endswith(".json")]
        wanted: dict[str, list[tuple[NormalizedEvent, bool]]] = {}
        for event, where, base in planned:
            named = f"{base}/{where.name}"
            for key in [named] if where.exact else [k for k in listed[f"{base}/{event.user_id}-"]
                                                    if k.startswith(named)]:
                wanted.setdefault(key, []).append((event, where.confirm))
        failed: dict[str, BaseException] = {}
        pending = sorted(wanted)
        for _ in range(CONFLICT_RETRIES):
            doomed = {key: etag for key in pending if (etag := self._deletable(key, wanted[key])) is not None}
            changed = []
            for code, key, message in self._delete_objects(doomed):
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    changed.append(key)  # rewritten since we read it: check again
                    continue
                error = _deletion_error(_ObjectError(code, message), f"DELETE s3://{self.bucket}/{key}")
                failed.update((event.event_id, error) for event, _ in wanted[key])
            if not changed:
                return failed
            pending = changed
        error = RetryableError(f"DELETE s3://{self.bucket}: objects kept changing under concurrent writers "
                               f"({CONFLICT_RETRIES} conditional attempts)")
        failed.update((event.event_id, error) for key in pending for event, _ in wanted[key])
        return failed

    def _deletable(self, key: str, wanting: list[tuple[NormalizedEvent, bool]]) -> str | None:
        """The ETag to delete ``key`` with (``""``: unconditionally) when one of the tombstones ``wanting`` it applies:
        the object exists (when read), is not newer than the tombstone, and names its record (``confirm``); None to
        keep it."""
        if any(confirm for _, confirm in wanting):
            try:
                found = self._client.get_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if http_status(exc) == 404 or error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            body = found["Body"].read()
            stored = _stored(found)
        else:
            body, stored = b"", self._head(key, denied=PermanentError) if self.guard_stale else None
            if self.guard_stale and stored is None:
                return None  # nothing there
        for event, confirm in wanting:
            if self.guard_stale and stored is not None and stored.ordering_timestamp_ms is not None and \
                    stored.ordering_timestamp_ms > event.ordering_timestamp_ms:
                continue  # re-created after this deletion: newer data stays
            if confirm and not holds_record(body, event):
                continue
            return stored.etag if stored is not None and self.guard_stale and self.conditional_writes else ""
        return None

    def _delete_objects(self, doomed: dict[str, str]) -> list[tuple[str, str, str]]:
        """DeleteObjects in chunks of 1000 (with each ETag given); the (code, key, message) of each object not
        deleted."""
        errors = []
        keys = sorted(doomed)
        for start in range(0, len(keys), 1000):
            objects = [{"Key": key, **({"ETag": doomed[key]} if doomed[key] else {})}
                       for key in keys[start:start + 1000]]
            answer = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
            errors.extend((str(e.get("Code") or ""), str(e.get("Key")), str(e.get("Message") or ""))
                          for e in answer.get("Errors") or [])
        return errors

    def _put_json_run(self, events: Sequence[NormalizedEvent], run: list[int], fail: _Fail) -> BaseException | None:
        by_key: dict[str, list[int]] = {}
        for index in run:
            event = events[index]
            try:
                by_key.setdefault(object_key(self.prefix, event), []).append(index)
            except PermanentError as exc:
                fail([index], exc)
        groups = list(by_key.items())
        newest = [max(reversed(indices), key=lambda i: events[i].ordering_timestamp_ms)  # later wins ties
                  for _, indices in groups]
        outcomes = self._writes.run([functools.partial(self.put_json, key, events[index])
                                     for (key, _), index in zip(groups, newest, strict=True)], stops=_stops_batch)
        for position, ((_, indices), outcome) in enumerate(zip(groups, outcomes, strict=False)):
            if outcome is None:
                continue
            if isinstance(outcome, FatalError | EndpointUnreachable):
                fail(indices, outcome)
                for _, rest in groups[position + 1:]:
                    fail(rest, _not_tried(outcome))
                return outcome
            if not isinstance(outcome, RetryableError | PermanentError):
                raise outcome  # unexpected: fails the batch, as when raised here
            fail(indices, outcome)
        return None

    def put_json(self, key: str, event: NormalizedEvent) -> str:
        """Write ``event`` at ``key`` unless the stored object is the same or newer.

        Returns ``"written"``, ``"unchanged"`` (same event id stored) or ``"superseded"`` (newer version stored).
        """
        for _ in range(CONFLICT_RETRIES):
            stored = self._head(key) if self.guard_stale else None
            if stored is not None:
                if stored.event_id == event.event_id:
                    return "unchanged"
                if stored.ordering_timestamp_ms is not None and stored.ordering_timestamp_ms > \
                        event.ordering_timestamp_ms:
                    return "superseded"
            condition: dict[str, str] = {}
            if self.guard_stale and self.conditional_writes:
                condition = {"IfMatch": stored.etag} if stored is not None else {"IfNoneMatch": "*"}
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=event.body(), ContentType="application/json",
                    Metadata={META_EVENT_ID: event.event_id, META_ORDERING: str(event.ordering_timestamp_ms)},
                    **condition)
            except Exception as exc:
                if condition and (http_status(exc) in (409, 412) or error_code(exc) in (
                        "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")):
                    continue  # another writer changed the object since our HEAD: check again
                raise classify_aws_error(exc, f"PUT s3://{self.bucket}/{key}") from exc
            return "written"
        raise RetryableError(f"PUT s3://{self.bucket}/{key}: object kept changing under concurrent writers "
                             f"({CONFLICT_RETRIES} conditional attempts)")

    def _head(self, key: str, denied: type[Exception] = FatalError) -> _Stored | None:
        """The stored object's version (None: no object); 403 raises ``denied``."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            status = http_status(exc)
            if status == 404 or error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None  # also a missing bucket: the PUT then reports NoSuchBucket
            if status == 403:
                raise denied(f"HEAD s3://{self.bucket}/{key} denied (403): grant s3:GetObject and s3:ListBucket "
                             "(needed to compare versions), or set guard_stale=False") from exc
            raise classify_aws_error(exc, f"HEAD s3://{self.bucket}/{key}") from exc
        return _stored(head)

    # -- Parquet batches ----------------------------------------------------------------------------------------------
    def _write_parquet(self, events: Sequence[NormalizedEvent], fail: _Fail) -> None:
        by_type: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            try:
                by_type.setdefault(safe_part(event.type, event), []).append(index)
            except PermanentError as exc:
                fail([index], exc)
        groups = list(by_type.items())
        for position, (event_type, indices) in enumerate(groups):
            group = [events[i] for i in indices]
            key = parquet_key(self.prefix, event_type, group)
            try:
                body = parquet_bytes(group)
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                        ContentType="application/vnd.apache.parquet")
            except Exception as exc:
                error = classify_aws_error(exc, f"PUT s3://{self.bucket}/{key}")
                fail(indices, error)
                if isinstance(error, FatalError | EndpointUnreachable):
                    for _, rest in groups[position + 1:]:
                        fail(rest, _not_tried(error))
                    return


def _stored(answer: dict[str, Any]) -> _Stored:
    """The version a HEAD or GET answer describes (our metadata; an object without it counts as older)."""
    metadata = answer.get("Metadata") or {}
    try:
        ordering = int(metadata[META_ORDERING])
    except (KeyError, ValueError):
        ordering = None
    return _Stored(etag=answer.get("ETag", ""), event_id=metadata.get(META_EVENT_ID), ordering_timestamp_ms=ordering)


class _ObjectError(Exception):
    """One object's failure in a DeleteObjects answer, shaped as a ClientError for ``classify_aws_error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.response = {"Error": {"Code": code, "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": 403 if "AccessDenied" in code else 0}}


_DELETE_PERMISSIONS = ("the sink's identity may not apply tombstones: grant s3:DeleteObject (and s3:ListBucket, "
                       "s3:GetObject to find and compare the objects), or drop this destination's tombstones")


def _deletion_error(exc: BaseException, what: str = "applying tombstones") -> Exception:
    """``classify_aws_error`` for a tombstone, except that access denied is a PermanentError of the tombstone (it is
    dead-lettered, naming the permission) rather than a FatalError stopping the run. Wrong credentials, a missing
    bucket and the like stay fatal."""
    if isinstance(exc, PermanentError | RetryableError | FatalError):
        return exc
    code = error_code(exc)
    if code in ("AccessDenied", "AccessDeniedException") or (code in ("", "403") and http_status(exc) == 403):
        return PermanentError(f"{what}: access denied: {_DELETE_PERMISSIONS}")
    if isinstance(exc, _ObjectError):  # another per-object failure: retryable when S3 says so, else permanent
        return RetryableError(f"{what}: {exc}") if code in _RETRYABLE_CODES else PermanentError(f"{what}: {exc}")
    return classify_aws_error(exc, what)


def _stops_batch(exc: BaseException) -> bool:
    """Whether a PUT's error stops the batch: fatal, endpoint unreachable, or not classified (raised by ``write``)."""
    return isinstance(exc, FatalError | EndpointUnreachable) or not isinstance(exc, RetryableError | PermanentError)


def _not_tried(cause: BaseException) -> BaseException:
    """The error for the rest of a batch stopped by ``cause`` (same class, so it routes the same way)."""
    if isinstance(cause, FatalError):
        return cause
    return EndpointUnreachable(f"not tried: endpoint unreachable earlier in this batch: {cause}")
