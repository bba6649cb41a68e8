"""SQS sink (boto3): one message per event on a FIFO queue, per-user order, deduplicated by event id.

Message body = ``event.body()`` (Terra's webhook envelope; a tombstone's ``{type, user, deleted: [key], version}``, with
the String attribute ``deleted`` = ``true``). Attributes (String): ``event_id``, ``type``, ``user_id``,
``provider``; (Number) ``ordering_timestamp_ms``. FIFO fields: ``MessageGroupId`` = user id (hashed when it is not a
valid group id), ``MessageDeduplicationId`` = event id.

Guarantees:
- At least once; a redelivery within SQS's 5-minute deduplication window is dropped by SQS (same dedup id). Later
  redeliveries arrive again: consumers dedupe on the ``event_id`` attribute.
- Per-user order on FIFO queues: a ``SendMessageBatch`` call (<= 10 entries, <= ``max_message_bytes`` in total) holds
  at most one event per user, and a user's next event is sent only after the previous one succeeded. When one of a
  user's events fails, that user's later events of the same ``write`` are not sent and are reported
  ``RetryableError("blocked behind ...")``. Non-FIFO queues are refused unless ``fifo_required=False`` (then no
  group/dedup ids are sent, ``ordered`` is False and SQS may reorder and duplicate).
- Size: body + attributes over ``max_message_bytes`` (SQS: 256 KiB) -> ``PermanentError`` unless ``large_payload_s3``
  is set: then the body is uploaded to ``s3://<bucket>/<prefix>/sqs-payloads/<version>/<type>/<event_id>.json``
  (deterministic key, so retries overwrite) and the message is Terra's pointer ``{"status": "success", "type":
  "s3_payload", "url": <presigned GET>, "expires_in": ..., "user_id", "event_id", "payload_type"}``. The URL expires
  after ``expires_in`` seconds (and with the signing credentials): consumers must read it promptly.
- Failures: per-entry ``Failed`` results -> ``PermanentError`` when ``SenderFault`` else ``RetryableError``; a whole
  call rejected as invalid is retried entry by entry so only the offending event fails; whole-call transient errors
  (unreachable, throttled, 5xx) and ``FatalError`` (credentials, access, missing queue, KMS) stop the batch: the
  rest is reported with the same class without being sent.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.base import Sink, SinkResult
from sinks.large_payloads import LargePayloadS3, PayloadStore
from sinks.s3 import classify_aws_error, make_client

MAX_BATCH_ENTRIES = 10
SQS_MAX_MESSAGE_BYTES = 256 * 1024
_GROUP_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # SQS: 1-128 printable ASCII characters
_REGION_IN_URL = re.compile(r"^sqs[.-]([a-z0-9-]+)\.amazonaws\.com")


@dataclass
class _Entry:
    index: int
    event: NormalizedEvent
    request: dict[str, Any] = field(default_factory=dict)
    size: int = 0


def message_group_id(user_id: str) -> str:
    """The user id when SQS accepts it as a group id, else a stable hash of it."""
    if _GROUP_ID.match(user_id):
        return user_id
    return "user-sha256-" + hashlib.sha256(user_id.encode()).hexdigest()


def is_fifo_url(queue_url: str) -> bool:
    return urlparse(queue_url).path.rstrip("/").endswith(".fifo")


class SqsSink(Sink):
    """Sends each event to ``queue_url`` (see module docstring for ordering, dedup and size rules)."""

    ordered = True

    def __init__(self, name: str, queue_url: str, endpoint_url: str | None = None, region: str | None = None,
                 fifo_required: bool = True, large_payload_s3: LargePayloadS3 | None = None,
                 max_message_bytes: int = SQS_MAX_MESSAGE_BYTES, max_attempts: int = 3,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0) -> None:
        super().__init__(name)
        parsed = urlparse(queue_url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc or not parsed.path.strip("/"):
            raise FatalError(f"sqs sink {name!r}: queue_url must be the queue's URL "
                             f"(https://sqs.<region>.amazonaws.com/<account>/<name>), got {queue_url!r}")
        self.fifo = is_fifo_url(queue_url)
        if fifo_required and not self.fifo:
            raise FatalError(
                f"sqs sink {name!r}: {queue_url} is a standard queue; per-user ordering and deduplication need a FIFO "
                "queue (name ending in '.fifo', MessageGroupId = user id, MessageDeduplicationId = event id). "
                "Standard queues may reorder and duplicate messages: use a FIFO queue or pass fifo_required=False")
        if max_message_bytes <= 0 or max_attempts < 1:
            raise FatalError(f"sqs sink {name!r}: max_message_bytes and max_attempts must be positive")
        self.ordered = self.fifo
        self.queue_url = queue_url
        self.endpoint_url = endpoint_url
        match = _REGION_IN_URL.match(parsed.netloc)
        self.region = region or (match.group(1) if match else None)
        self.large_payload_s3 = large_payload_s3
        self._payloads = PayloadStore(large_payload_s3, "sqs-payloads", max_attempts, connect_timeout_s,
                                      read_timeout_s) if large_payload_s3 else None
        self.max_message_bytes = max_message_bytes
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._sqs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sqs"] = None  # clients never travel with the pickled config
        return state

    def open(self) -> None:
        if self._sqs is None:
            self._sqs = make_client("sqs", self.endpoint_url, self.region, self.max_attempts,
                                    self.connect_timeout_s, self.read_timeout_s)
        if self._payloads is not None:
            self._payloads.open(self.region)

    def close(self) -> None:
        if self._sqs is not None:
            self._sqs.close()
        self._sqs = None
        if self._payloads is not None:
            self._payloads.close()

    # -- message building ---------------------------------------------------------------------------------------------
    def attributes(self, event: NormalizedEvent) -> dict[str, dict[str, str]]:
        values = {"event_id": event.event_id, "type": event.type, "user_id": event.user_id,
                  "provider": event.user.get("provider")}
        attrs = {k: {"DataType": "String", "StringValue": str(v)} for k, v in values.items() if v}
        attrs["ordering_timestamp_ms"] = {"DataType": "Number", "StringValue": str(event.ordering_timestamp_ms)}
        if event.deleted:
            attrs["deleted"] = {"DataType": "String", "StringValue": "true"}
        return attrs

    def _request(self, index: int, event: NormalizedEvent, body: str) -> _Entry:
        attrs = self.attributes(event)
        request: dict[str, Any] = {"Id": str(index), "MessageBody": body, "MessageAttributes": attrs}
        if self.fifo:
            request["MessageGroupId"] = message_group_id(event.user_id)
            request["MessageDeduplicationId"] = event.event_id
        size = len(body.encode()) + sum(len(k.encode()) + len(a["DataType"]) + len(a["StringValue"].encode())
                                        for k, a in attrs.items())
        return _Entry(index, event, request, size)

    def prepare(self, index: int, event: NormalizedEvent) -> _Entry:
        """The SendMessageBatch entry of ``event``; uploads an oversized body when ``large_payload_s3`` is set."""
        entry = self._request(index, event, event.body().decode("utf-8"))
        if entry.size <= self.max_message_bytes:
            return entry
        if self.large_payload_s3 is None:
            raise PermanentError(f"message of {entry.size} bytes is too large for SQS (max {self.max_message_bytes}); "
                                 "use an S3 pointer: configure large_payload_s3")
        entry = self._request(index, event, self._upload_pointer(event))
        if entry.size > self.max_message_bytes:
            raise PermanentError(f"pointer message of {entry.size} bytes exceeds {self.max_message_bytes}")
        return entry

    def payload_key(self, event: NormalizedEvent) -> str:
        assert self._payloads is not None
        return self._payloads.key(event)

    def _upload_pointer(self, event: NormalizedEvent) -> str:
        assert self._payloads is not None
        return self._payloads.pointer(event).decode()

    # -- sending ------------------------------------------------------------------------------------------------------
    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        self.open()
        run = _Run(self, events)
        for index, event in enumerate(events):
            lane = run.lane(event, index)
            if run.halted is not None:
                run.result.fail_all([event], run.rest_error())
            elif lane in run.blocked:
                run.fail_blocked(lane, event)
            else:
                try:
                    entry = self.prepare(index, event)
                except FatalError as exc:
                    run.result.fail_all([event], exc)
                    run.halted = exc
                except (RetryableError, PermanentError) as exc:  # incl. S3 unreachable: SQS may still work
                    run.result.fail_all([event], exc)
                    run.blocked[lane] = (event.event_id, exc)
                else:
                    run.lanes.setdefault(lane, deque()).append(entry)
        while run.halted is None:
            batch = run.next_batch()
            if not batch:
                break
            self._send(run, batch)
        if run.halted is not None:
            for lane in list(run.lanes):
                while run.lanes[lane]:
                    run.result.fail_all([run.lanes[lane].popleft().event], run.rest_error())
        return run.result

    def _send(self, run: _Run, batch: list[_Entry]) -> None:
        try:
            response = self._sqs.send_message_batch(QueueUrl=self.queue_url, Entries=[e.request for e in batch])
        except Exception as exc:
            error = classify_aws_error(exc, f"SendMessageBatch to {self.queue_url}")
            if isinstance(error, PermanentError) and len(batch) > 1:
                for entry in batch:  # one invalid entry rejects the whole call: find it
                    if run.halted is not None:
                        run.result.fail_all([entry.event], run.rest_error())
                    else:
                        self._send(run, [entry])
                return
            if isinstance(error, PermanentError):
                run.failed(batch[0], error)
                return
            for entry in batch:
                run.result.fail_all([entry.event], error)
            run.halted = error
            return
        by_id = {e.request["Id"]: e for e in batch}
        for ok in response.get("Successful", []):
            entry = by_id.pop(ok["Id"], None)
            if entry is not None:
                run.result.delivered.append(entry.event.event_id)
        for failed in response.get("Failed", []):
            entry = by_id.pop(failed["Id"], None)
            if entry is None:
                continue
            detail = f"SQS rejected {entry.event.event_id}: {failed.get('Code')}: {failed.get('Message', '')}"
            run.failed(entry, PermanentError(detail) if failed.get("SenderFault") else RetryableError(detail))
        for entry in by_id.values():
            run.failed(entry, RetryableError(f"SQS returned no result for {entry.event.event_id}"))


class _Run:
    """Bookkeeping of one ``write`` call: pending entries per lane (user on FIFO), blocked lanes, halt error."""

    def __init__(self, sink: SqsSink, events: Sequence[NormalizedEvent]) -> None:
        self.sink = sink
        self.result = SinkResult()
        self.lanes: dict[str, deque[_Entry]] = {}
        self.blocked: dict[str, tuple[str, BaseException]] = {}
        self.halted: BaseException | None = None

    def lane(self, event: NormalizedEvent, index: int) -> str:
        return message_group_id(event.user_id) if self.sink.fifo else str(index)

    def rest_error(self) -> BaseException:
        assert self.halted is not None
        if isinstance(self.halted, FatalError):
            return self.halted
        return type(self.halted)(f"not sent: stopped by an earlier error in this batch: {self.halted}")

    def next_batch(self) -> list[_Entry]:
        """Up to 10 entries within the size limit, at most one per lane, each lane's oldest pending first."""
        batch: list[_Entry] = []
        size = 0
        for queue in self.lanes.values():
            if len(batch) == MAX_BATCH_ENTRIES:
                break
            if queue and size + queue[0].size <= self.sink.max_message_bytes:
                entry = queue.popleft()
                batch.append(entry)
                size += entry.size
        return batch

    def failed(self, entry: _Entry, error: BaseException) -> None:
        """Report ``entry`` failed and block the rest of its lane."""
        self.result.fail_all([entry.event], error)
        lane = self.lane(entry.event, entry.index)
        self.blocked[lane] = (entry.event.event_id, error)
        for pending in self.lanes.pop(lane, deque()):
            self.fail_blocked(lane, pending.event)

    def fail_blocked(self, lane: str, event: NormalizedEvent) -> None:
        blocked_id, cause = self.blocked[lane]
        retry_after = cause.retry_after if isinstance(cause, RetryableError) else None
        self.result.fail_all([event], RetryableError(
            f"blocked behind earlier failure of {blocked_id} for user {event.user_id}: {cause}", retry_after))
