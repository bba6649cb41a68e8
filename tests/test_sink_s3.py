"""S3Sink against a real moto_server process, with boto3 exactly as against AWS."""

from __future__ import annotations

import io
import json
import pickle
import threading
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from core.errors import FatalError, PermanentError, RetryableError
from core.events import NormalizedEvent
from sinks.base import SinkResult
from sinks.s3 import META_EVENT_ID, META_ORDERING, EndpointUnreachable, S3Sink, object_key

try:  # `python -m pytest` puts the repo root on sys.path, plain `pytest` puts tests/ there
    from tests.servers.moto import MOTO_REGION, free_port, moto_endpoint
except ModuleNotFoundError:
    from servers.moto import MOTO_REGION, free_port, moto_endpoint  # noqa: F401 - pytest fixture

PREFIX = "terra"


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name=MOTO_REGION)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"hf-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def make_sink(endpoint: str, bucket: str, **options: Any) -> S3Sink:
    sink = S3Sink("s3-test", bucket, prefix=PREFIX, endpoint_url=endpoint, region=MOTO_REGION, **options)
    sink.open()
    return sink


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def body(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def delivered_all(result: SinkResult, events: list[NormalizedEvent]) -> None:
    assert not result.failures, result.failures
    assert result.delivered == [e.event_id for e in events]


def test_json_layout_is_idempotent_and_updates_in_place(moto_endpoint: str, s3: Any, bucket: str,
                                                        make_sink_event: Callable[..., NormalizedEvent]) -> None:
    events = [make_sink_event("u1", "2026-03-12"), make_sink_event("u1", "2026-03-13"),
              make_sink_event("u2", "2026-03-12", type="daily"), make_sink_event("u2", type="athlete")]
    sink = make_sink(moto_endpoint, bucket)
    delivered_all(sink.write(events), events)
    delivered_all(sink.write(events), events)  # forced redelivery
    update = make_sink_event("u1", "2026-03-12", version=2, ordering_timestamp_ms=2_000)
    delivered_all(sink.write([update]), [update])

    version = events[0].version
    assert keys(s3, bucket) == sorted([
        f"{PREFIX}/{version}/sleep/u1-2026-03-12T22:00:00.000000+00:00.json",
        f"{PREFIX}/{version}/sleep/u1-2026-03-13T22:00:00.000000+00:00.json",
        f"{PREFIX}/{version}/daily/u2-2026-03-12T22:00:00.000000+00:00.json",
        f"{PREFIX}/{version}/athlete/u2-profile.json",
    ])
    for event in [update, *events[1:]]:
        key = object_key(PREFIX, event)
        assert body(s3, bucket, key) == event.body()
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ContentType"] == "application/json"
        assert head["Metadata"] == {META_EVENT_ID: event.event_id, META_ORDERING: str(event.ordering_timestamp_ms)}


def test_stale_redelivery_does_not_overwrite_newer_object(moto_endpoint: str, s3: Any, bucket: str,
                                                          make_sink_event: Callable[..., NormalizedEvent]) -> None:
    old = make_sink_event("u1", version=1, ordering_timestamp_ms=1_000)
    new = make_sink_event("u1", version=2, ordering_timestamp_ms=2_000)
    sink = make_sink(moto_endpoint, bucket)
    delivered_all(sink.write([new]), [new])
    delivered_all(sink.write([old]), [old])  # superseded: reported delivered, not written
    assert body(s3, bucket, object_key(PREFIX, new)) == new.body()
    assert sink.put_json(object_key(PREFIX, old), old) == "superseded"
    assert sink.put_json(object_key(PREFIX, new), new) == "unchanged"

    # within one batch the newest wins whatever the order
    other = [make_sink_event("u2", version=3, ordering_timestamp_ms=3_000),
             make_sink_event("u2", version=1, ordering_timestamp_ms=1_000)]
    delivered_all(sink.write(other), other)
    assert body(s3, bucket, object_key(PREFIX, other[0])) == other[0].body()


@pytest.mark.parametrize("conditional_writes", [True, False])
def test_conditional_write_closes_head_put_race(moto_endpoint: str, s3: Any, bucket: str, conditional_writes: bool,
                                                make_sink_event: Callable[..., NormalizedEvent]) -> None:
    """A newer version written between the sink's HEAD and PUT: If-Match makes the stale PUT fail and re-check."""
    old = make_sink_event("u1", version=1, ordering_timestamp_ms=1_000)
    newer = make_sink_event("u1", version=2, ordering_timestamp_ms=2_000)
    key = object_key(PREFIX, old)
    sink = make_sink(moto_endpoint, bucket, conditional_writes=conditional_writes)
    concurrent = make_sink(moto_endpoint, bucket)
    raced: list[bool] = []

    def race(**_: Any) -> None:
        if not raced:
            raced.append(True)
            assert concurrent.put_json(key, newer) == "written"

    heads: list[bool] = []
    sink._client.meta.events.register("before-call.s3.PutObject", race)
    sink._client.meta.events.register("before-call.s3.HeadObject", lambda **_: heads.append(True))
    delivered_all(sink.write([old]), [old])
    assert raced
    assert len(heads) == (2 if conditional_writes else 1)  # the 412 made the sink check again
    expected = newer if conditional_writes else old  # without conditional writes the documented race remains
    assert body(s3, bucket, key) == expected.body()


def test_parquet_names_are_deterministic_across_retries(moto_endpoint: str, s3: Any, bucket: str,
                                                        make_sink_event: Callable[..., NormalizedEvent]) -> None:
    batch = [make_sink_event(f"u{u}", f"2026-03-1{d}", type=t) for u in range(3) for d in (2, 3)
             for t in ("sleep", "daily")]
    sink = make_sink(moto_endpoint, bucket, formats=("json", "parquet"))
    delivered_all(sink.write(batch), batch)
    first = keys(s3, bucket, f"{PREFIX}/parquet/")
    delivered_all(sink.write(list(reversed(batch))), list(reversed(batch)))  # retried batch, other order
    assert keys(s3, bucket, f"{PREFIX}/parquet/") == first
    assert len(first) == 2
    assert {k.split("/")[2] for k in first} == {"sleep", "daily"}
    assert all(k.split("/")[3] == "date=2026-03-12" for k in first)
    assert len(keys(s3, bucket, f"{PREFIX}/{batch[0].version}/")) == len(batch)

    for key in first:
        table = pq.read_table(io.BytesIO(body(s3, bucket, key)))
        event_type = key.split("/")[2]
        expected = {e.event_id: e for e in batch if e.type == event_type}
        assert table.num_rows == len(expected) == 6
        assert table.column_names == ["event_id", "user_id", "provider", "type", "natural_key", "start_time",
                                      "end_time", "ordering_timestamp_ms", "record", "deleted"]
        for row in table.to_pylist():
            event = expected[row["event_id"]]
            assert (row["user_id"], row["provider"], row["type"]) == (event.user_id, event.provider, event.type)
            assert row["start_time"] == event.data["metadata"]["start_time"]
            assert row["ordering_timestamp_ms"] == event.ordering_timestamp_ms


def test_missing_bucket_is_fatal(moto_endpoint: str, make_sink_event: Callable[..., NormalizedEvent]) -> None:
    events = [make_sink_event("u1"), make_sink_event("u2")]
    for formats in (("json",), ("parquet",)):
        result = make_sink(moto_endpoint, f"missing-{uuid.uuid4().hex[:8]}", formats=formats).write(events)
        assert result.delivered == []
        assert [f.event.event_id for f in result.failures] == [e.event_id for e in events]
        assert all(isinstance(f.error, FatalError) for f in result.failures)
        assert "NoSuchBucket" in str(result.failures[0].error)


def test_unusable_name_is_permanent_for_that_event_only(moto_endpoint: str, bucket: str,
                                                        make_sink_event: Callable[..., NormalizedEvent]) -> None:
    good = make_sink_event("u1")
    no_start = NormalizedEvent.create(type="sleep", user={"user_id": "u2", "provider": "OURA"}, data={"metadata": {}},
                                      natural_key="x", ordering_timestamp_ms=1, sequence="0")
    bad_user = make_sink_event("../etc")
    result = make_sink(moto_endpoint, bucket).write([good, no_start, bad_user])
    assert result.delivered == [good.event_id]
    assert [f.event for f in result.failures] == [no_start, bad_user]
    assert all(isinstance(f.error, PermanentError) for f in result.failures)


def test_unreachable_endpoint_is_retryable_and_stops_the_batch(make_sink_event: Callable[..., NormalizedEvent],
                                                               moto_endpoint: str) -> None:
    events = [make_sink_event("u1"), make_sink_event("u2"), make_sink_event("u3")]
    sink = make_sink(f"http://127.0.0.1:{free_port()}", "bucket", max_attempts=1, connect_timeout_s=1)
    result = sink.write(events)
    assert result.delivered == []
    assert len(result.failures) == 3
    assert all(isinstance(f.error, EndpointUnreachable | RetryableError) for f in result.failures)
    assert "not tried" in str(result.failures[-1].error)


def test_sink_pickles_without_its_client(moto_endpoint: str, bucket: str,
                                         make_sink_event: Callable[..., NormalizedEvent]) -> None:
    sink = make_sink(moto_endpoint, bucket)
    copy = pickle.loads(pickle.dumps(sink))
    assert copy._client is None
    event = make_sink_event()
    delivered_all(copy.write([event]), [event])
    copy.close()
    sink.close()


def test_bad_config_is_fatal() -> None:
    with pytest.raises(FatalError):
        S3Sink("s3", "s3://bucket")
    with pytest.raises(FatalError):
        S3Sink("s3", "bucket", formats=("csv",))


def test_a_tombstone_removes_the_json_object_and_is_a_parquet_row(moto_endpoint: str, s3: Any, bucket: str,
                                                                  make_sink_event: Callable[..., NormalizedEvent],
                                                                  ) -> None:
    sink = make_sink(moto_endpoint, bucket, formats=["json", "parquet"])
    gone = make_sink_event("u1", "2026-03-10", type="activity")
    newer = make_sink_event("u1", "2026-03-11", type="activity", ordering_timestamp_ms=9_000)
    sink.write([gone, newer])
    never_seen = NormalizedEvent.tombstone(type="activity", user=gone.user, natural_key="u1-2026-03-10",
                                           ordering_timestamp_ms=2_000, sequence="1")  # found by its summary_id
    stale = NormalizedEvent.tombstone(type="activity", user=newer.user, natural_key=newer.natural_key,
                                      ordering_timestamp_ms=8_000, sequence="2",
                                      start_time=newer.data["metadata"]["start_time"])

    result = sink.write([never_seen, stale])
    again = sink.write([never_seen])

    assert result.delivered == [never_seen.event_id, stale.event_id] and again.delivered == [never_seen.event_id]
    json_keys = [k for k in keys(s3, bucket) if k.endswith(".json")]
    assert json_keys == ["terra/2022-03-16/activity/u1-2026-03-11T22:00:00.000000+00:00.json"]  # newer data stays
    rows = [row for key in keys(s3, bucket) if key.endswith(".parquet")  # readers dedupe on event_id
            for row in pq.read_table(io.BytesIO(body(s3, bucket, key))).to_pylist() if row["deleted"]]
    assert sorted({(r["natural_key"], r["ordering_timestamp_ms"], json.loads(r["record"])["natural_key"])
                   for r in rows}) == [("2026-03-11", 8_000, "2026-03-11"), ("u1-2026-03-10", 2_000, "u1-2026-03-10")]


def _unknown_start(event: NormalizedEvent, ordering_timestamp_ms: int = 2_000) -> NormalizedEvent:
    return NormalizedEvent.tombstone(type=event.type, user=event.user, natural_key=event.data["metadata"]["summary_id"],
                                     ordering_timestamp_ms=ordering_timestamp_ms, sequence="9")


def test_a_run_of_tombstones_lists_and_reads_once_and_deletes_in_one_request(
        moto_endpoint: str, s3: Any, bucket: str, make_sink_event: Callable[..., NormalizedEvent]) -> None:
    sink = make_sink(moto_endpoint, bucket)
    sessions = [make_sink_event("u1", f"2026-03-1{day}", type="activity") for day in range(4)]
    days = [make_sink_event("u1", f"2026-03-1{day}", type="daily") for day in range(2)]
    delivered_all(sink.write([*sessions, *days]), [*sessions, *days])
    calls: list[str] = []
    for operation in ("ListObjectsV2", "HeadObject", "GetObject", "DeleteObject", "DeleteObjects"):
        sink._client.meta.events.register(f"before-call.s3.{operation}",
                                          lambda operation=operation, **_: calls.append(operation))
    tombstones = [*map(_unknown_start, sessions[:3]), *(NormalizedEvent.tombstone(
        type="daily", user=d.user, natural_key=d.natural_key, ordering_timestamp_ms=2_000, sequence="9") for d in days)]

    delivered_all(sink.write(tombstones), tombstones)

    assert sorted(calls) == sorted(["ListObjectsV2", "ListObjectsV2", *["GetObject"] * 4, "HeadObject",
                                    "HeadObject", "DeleteObjects"])  # a listing per (user, type), one read per object
    assert keys(s3, bucket) == ["terra/2022-03-16/activity/u1-2026-03-13T22:00:00.000000+00:00.json"]


def test_a_tombstone_the_identity_may_not_apply_is_dead_lettered_not_fatal(
        moto_endpoint: str, s3: Any, bucket: str, make_sink_event: Callable[..., NormalizedEvent]) -> None:
    sink = make_sink(moto_endpoint, bucket)
    session, later = make_sink_event("u1", "2026-03-10", type="activity"), make_sink_event("u1", "2026-03-11")
    sink.write([session])
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    tombstone = NormalizedEvent.tombstone(type="activity", user=session.user,
                                          natural_key=session.data["metadata"]["summary_id"],
                                          ordering_timestamp_ms=2_000, sequence="9",
                                          start_time=session.data["metadata"]["start_time"])

    result = sink.write([tombstone, later])  # the data after it still goes

    assert result.delivered == [later.event_id]
    [failure] = result.failures
    assert isinstance(failure.error, PermanentError) and "s3:DeleteObject" in str(failure.error)
    assert object_key(PREFIX, session) in keys(s3, bucket)


def test_an_object_rewritten_between_read_and_delete_is_checked_again(
        moto_endpoint: str, s3: Any, bucket: str, make_sink_event: Callable[..., NormalizedEvent]) -> None:
    """DeleteObjects carries each ETag read; S3 refuses (PreconditionFailed) an object rewritten since. moto ignores
    the ETag, so the first answer is S3's, given here: the sink reads again and keeps the newer object."""
    sink = make_sink(moto_endpoint, bucket)
    session = make_sink_event("u1", "2026-03-10", type="activity")
    sink.write([session])
    key = object_key(PREFIX, session)
    etag = s3.head_object(Bucket=bucket, Key=key)["ETag"]
    newer = make_sink_event("u1", "2026-03-10", type="activity", version=2, ordering_timestamp_ms=3_000)
    sent: list[Any] = []

    def concurrent_rewrite(**_: Any) -> Any:
        if len(sent) == 1:
            assert make_sink(moto_endpoint, bucket).put_json(key, newer) == "written"
            return (type("Http", (), {"status_code": 200, "headers": {}})(),
                    {"Errors": [{"Key": key, "Code": "PreconditionFailed", "Message": "At least one of the "
                                 "pre-conditions you specified did not hold"}]})
        return None

    sink._client.meta.events.register("before-parameter-build.s3.DeleteObjects",
                                      lambda params, **_: sent.append(params["Delete"]["Objects"]))
    sink._client.meta.events.register("before-call.s3.DeleteObjects", concurrent_rewrite)
    tombstone = NormalizedEvent.tombstone(type="activity", user=session.user,
                                          natural_key=session.data["metadata"]["summary_id"],
                                          ordering_timestamp_ms=2_000, sequence="9",
                                          start_time=session.data["metadata"]["start_time"])

    delivered_all(sink.write([tombstone]), [tombstone])

    assert sent == [[{"Key": key, "ETag": etag}]]  # checked again: newer than the tombstone, so not deleted
    assert body(s3, bucket, key) == newer.body()


# --- concurrent writes ---------------------------------------------------------------------------------------------
def _record_requests(sink: S3Sink, calls: list[tuple[str, str, str]]) -> None:
    """Note (operation, key, thread name) of each HEAD and PUT the sink's client sends, as it is built."""
    for operation in ("HeadObject", "PutObject"):
        sink._client.meta.events.register(
            f"before-parameter-build.s3.{operation}",
            lambda params, operation=operation, **_: calls.append((operation, params["Key"],
                                                                   threading.current_thread().name)))


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def test_puts_of_different_keys_overlap_and_each_keys_head_and_put_stay_in_order(
        moto_endpoint: str, s3: Any, bucket: str, make_sink_event: Callable[..., NormalizedEvent]) -> None:
    """After the first object, the next four PUTs meet at a barrier before any is sent: one PUT at a time would break
    it (and fail those objects)."""
    sink = make_sink(moto_endpoint, bucket, concurrency=4)
    assert sink._client.meta.config.max_pool_connections == 10
    events = [make_sink_event(f"u{n}") for n in range(5)]
    calls: list[tuple[str, str, str]] = []
    _record_requests(sink, calls)
    barrier = threading.Barrier(4, timeout=20)
    puts: list[str] = []

    def meet(params: dict[str, Any], **_: Any) -> None:
        puts.append(params["Key"])
        if len(puts) > 1:
            barrier.wait()

    sink._client.meta.events.register("before-parameter-build.s3.PutObject", meet)
    delivered_all(sink.write(events), events)
    sink.close()

    assert not barrier.broken and len({thread for *_, thread in calls}) == 4
    for event in events:
        key = object_key(PREFIX, event)
        assert body(s3, bucket, key) == event.body()
        [(head, head_thread), (put, put_thread)] = [(op, thread) for op, k, thread in calls if k == key]
        assert (head, put) == ("HeadObject", "PutObject") and head_thread == put_thread  # one key, one thread
    assert make_sink(moto_endpoint, bucket, concurrency=16)._client.meta.config.max_pool_connections == 16


@pytest.mark.parametrize(("code", "status", "error", "stops"), [("AccessDenied", 403, FatalError, True),
                                                                ("InvalidArgument", 400, PermanentError, False)])
def test_a_failed_put_is_reported_as_when_written_one_at_a_time(
        moto_endpoint: str, s3: Any, code: str, status: int, error: type[Exception], stops: bool,
        make_sink_event: Callable[..., NormalizedEvent]) -> None:
    """The third object's PUT fails: a FatalError stops the batch (the objects after it are reported not tried, with
    it, even if written meanwhile), a PermanentError is that object's alone; the same with 1 and 8 at once."""
    events = [make_sink_event(f"u{n}") for n in range(8)]
    refused = object_key(PREFIX, events[2])
    reported = []
    for concurrency in (1, 8):
        name = f"hf-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=name)
        sink = make_sink(moto_endpoint, name, concurrency=concurrency)

        def refuse(params: dict[str, Any], **_: Any) -> None:
            if params["Key"] == refused:
                raise _client_error(code, status)

        sink._client.meta.events.register("before-parameter-build.s3.PutObject", refuse)
        result = sink.write(events)
        sink.close()
        reported.append((result.delivered, [(f.event.event_id, type(f.error)) for f in result.failures]))
        written = keys(s3, name)
        assert refused not in written and {object_key(PREFIX, e) for e in events[:2]} <= set(written)
    assert reported[0] == reported[1]
    delivered, failures = reported[0]
    if stops:
        assert delivered == [e.event_id for e in events[:2]]
        assert failures == [(e.event_id, error) for e in events[2:]]
    else:
        assert delivered == [e.event_id for i, e in enumerate(events) if i != 2]
        assert failures == [(events[2].event_id, error)]


def test_a_missing_bucket_sees_one_put_per_batch(moto_endpoint: str,
                                                  make_sink_event: Callable[..., NormalizedEvent]) -> None:
    sink = make_sink(moto_endpoint, f"missing-{uuid.uuid4().hex[:8]}", concurrency=8)
    calls: list[tuple[str, str, str]] = []
    _record_requests(sink, calls)
    events = [make_sink_event(f"u{n}") for n in range(6)]

    result = sink.write(events)

    assert result.delivered == [] and all(isinstance(f.error, FatalError) for f in result.failures)
    assert [op for op, *_ in calls] == ["HeadObject", "PutObject"]  # one at a time until one is written


def test_objects_written_at_once_are_those_written_one_at_a_time(
        moto_endpoint: str, s3: Any, make_sink_event: Callable[..., NormalizedEvent]) -> None:
    first = [make_sink_event(f"u{n % 5}", f"2026-03-{10 + n // 5}", type=("sleep", "daily", "activity")[n % 3])
             for n in range(30)]
    stale = make_sink_event("u0", "2026-03-10", type="sleep", version=7, ordering_timestamp_ms=500)
    second = [
        *(make_sink_event(f"u{n}", "2026-03-20", version=v, ordering_timestamp_ms=t)  # newest wins within the batch
          for n in range(4) for v, t in ((1, 2_000), (2, 3_000), (3, 1_000))),
        stale,  # older than the stored object: superseded, reported delivered
        make_sink_event("../x"),  # unusable name
        NormalizedEvent.tombstone(type="daily", user=first[1].user, natural_key=first[1].natural_key,
                                  ordering_timestamp_ms=2_000, sequence="9"),
        *(make_sink_event(f"u{n}", "2026-03-21") for n in range(12)),
        make_sink_event("u1", "2026-03-10", type="daily", version=5, ordering_timestamp_ms=9_000),  # re-created
    ]
    outcomes = []
    for concurrency in (1, 8):
        name = f"hf-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=name)
        sink = make_sink(moto_endpoint, name, concurrency=concurrency)
        results = [sink.write(first), sink.write(second)]
        sink.close()
        stored = {}
        for key in keys(s3, name):
            found = s3.get_object(Bucket=name, Key=key)
            stored[key] = (found["Body"].read(), found["Metadata"], found["ContentType"])
        outcomes.append(([(r.delivered, [(f.event.event_id, type(f.error)) for f in r.failures]) for r in results],
                         stored))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][1]) == 30 + 4 + 12 and len(outcomes[0][0][1][1]) == 1


@pytest.mark.parametrize("concurrency", [0, 65, "8", True])
def test_a_bad_concurrency_is_fatal_and_names_the_fix(concurrency: Any) -> None:
    with pytest.raises(FatalError, match=r"s3 sink 's3': concurrency must be a whole number from 1 to 64"):
        S3Sink("s3", "bucket", concurrency=concurrency)
