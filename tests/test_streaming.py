"""The streaming job: one long-running pipeline from an ingestion topic (Pub/Sub, Kafka) to destinations.

Run on the local streaming runner with real components: the gRPC Pub/Sub test server, the Tansu broker,
SQLite/PostgreSQL destinations and a webhook receiver on loopback. Every message must be acknowledged
(or its offset committed) only after its events reached every destination or a dead letter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from servers.pubsub_server import PubSubTestServer

from connectors.base import terra_user_id
from core.dead_letters import read_dead_letters
from core.events import NormalizedEvent
from core.raw import RawMessage, RawPayload
from pipelines.launch import make_pipeline
from pipelines.normalize import FileSource, KafkaSource, NormalizeJob, PubSubSource, build_from, run_batch
from pipelines.streaming import run_streaming
from reliability.mechanics import sqlite_rows as sql_rows
from schemas.serde import encode_raw
from sinks.base import SinkResult
from sinks.policy import RetryPolicy, Target
from sinks.sql import SqlSink
from sinks.webhook import WebhookSink
from transforms.deliver import delivery_shard
from transforms.sources import committed_offsets

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay_s=0.2, max_delay_s=0.5)
PROJECT = "projects/healthflow-test"


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def write_jsonl(path: Path, payloads: list[RawPayload]) -> None:
    with path.open("w") as handle:
        for payload in payloads:
            handle.write(json.dumps({"provider": payload.provider, "kind": payload.kind, "user_id": payload.user_id,
                                     "received_at": payload.received_at_ms or 1, "payload": payload.payload.decode(),
                                     "idempotency_key": payload.idempotency_key()}) + "\n")


@pytest.fixture(scope="module")
def pubsub():
    with PubSubTestServer(pull_wait_s=0.2) as server:
        yield server


@pytest.fixture
def subscription(pubsub, monkeypatch, request) -> str:
    import uuid

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub.host)
    name = uuid.uuid4().hex[:8]
    topic, sub = f"{PROJECT}/topics/raw-{name}", f"{PROJECT}/subscriptions/normalize-{name}"
    pubsub.create_topic(topic)
    pubsub.create_subscription(sub, topic, ack_deadline_seconds=getattr(request, "param", 30))
    return sub


def publish_pubsub(host: str, subscription: str, payloads: list[RawPayload | bytes], pace_s: float = 0.0) -> None:
    from google.cloud import pubsub_v1

    topic = subscription.replace("/subscriptions/normalize-", "/topics/raw-")
    client = pubsub_v1.PublisherClient()
    for payload in payloads:
        data = payload if isinstance(payload, bytes) else encode_raw(payload)
        client.publish(topic, data).result(timeout=10)
        if pace_s:
            time.sleep(pace_s)


def normalize_job(source, tmp_path: Path, sinks=None, name: str = "out") -> NormalizeJob:
    sinks = sinks or [SqlSink("sql", f"sqlite:///{tmp_path / f'{name}.db'}")]
    return NormalizeJob(source, sinks, str(tmp_path / f"dlq-{name}"),
                        state_url=f"sqlite:///{tmp_path / f'state-{name}.db'}", retry=FAST_RETRY)


def batch_reference(tmp_path: Path, payloads: list[RawPayload]) -> dict:
    write_jsonl(tmp_path / "raw.jsonl", payloads)
    run_batch(normalize_job(FileSource(str(tmp_path / "raw.jsonl")), tmp_path, name="batch"))
    return sql_rows(tmp_path / "batch.db")


def test_pubsub_stream_delivers_what_batch_delivers_and_acknowledges_after_delivery(
        pubsub, subscription, tmp_path, simulated_payloads):
    expected = batch_reference(tmp_path, simulated_payloads)
    job = run_streaming(normalize_job(PubSubSource(subscription), tmp_path), redeliver_every_s=None)
    try:
        publish_pubsub(pubsub.host, subscription, simulated_payloads)
        wait_for(lambda: sql_rows(tmp_path / "out.db") == expected, what="the streamed rows to equal the batch rows")
        wait_for(lambda: pubsub.outstanding(subscription) == 0, what="every message to be acknowledged")
    finally:
        job.stop()
    def outcome(root: str) -> list[tuple]:
        return sorted((d["stage"], d["error_class"], d["provider"], d["kind"]) for d in read_dead_letters(root))

    assert outcome(str(tmp_path / "dlq-out")) == outcome(str(tmp_path / "dlq-batch"))  # the same failures


def test_kafka_stream_commits_offsets_only_past_delivered_messages(broker, topic, tmp_path, simulated_payloads):
    from connectors.publish import publish

    expected = batch_reference(tmp_path, simulated_payloads)
    job = run_streaming(normalize_job(KafkaSource(broker.bootstrap, topic, "stream"), tmp_path),
                        redeliver_every_s=None)
    try:
        published = publish(broker.bootstrap, topic, simulated_payloads)
        wait_for(lambda: sql_rows(tmp_path / "out.db") == expected, what="the streamed rows to equal the batch rows")
        wait_for(lambda: sum(committed_offsets(broker.bootstrap, topic, "stream").values()) == published,
                 what="the group's offsets to reach the end")
    finally:
        job.stop()


def hostile_payloads() -> list[bytes]:
    """Records that crashed stages before: a 300 kB time zone, a timestamp out of range, broken JSON and bytes."""
    withings = {"status": 0, "body": {"timezone": "X" * 300_000, "measuregrps": [
        {"grpid": 1, "date": 1710000000, "category": 1, "measures": [{"type": 1, "value": 70000, "unit": -3}]}]}}
    garmin = {"dailies": [{"userId": "g-hostile", "summaryId": "s1", "calendarDate": "2024-03-11",
                           "startTimeInSeconds": 10**15, "startTimeOffsetInSeconds": 0, "durationInSeconds": 86400,
                           "steps": 5}]}
    return [encode_raw(RawPayload("withings", json.dumps(withings).encode(), "measure", "w-hostile")),
            encode_raw(RawPayload("garmin", json.dumps(garmin).encode(), "dailies")),
            encode_raw(RawPayload("garmin", b"{not json", "dailies")),
            b"not an avro raw event at all"]


def test_no_record_stops_the_stream(pubsub, subscription, tmp_path, simulated_payloads):
    good = simulated_payloads[:40]
    expected = batch_reference(tmp_path, good)
    hostile = hostile_payloads()
    job = run_streaming(normalize_job(PubSubSource(subscription), tmp_path), redeliver_every_s=None)
    try:
        publish_pubsub(pubsub.host, subscription, [*hostile, *good])
        wait_for(lambda: expected.items() <= sql_rows(tmp_path / "out.db").items(),
                 what="the good records behind the hostile ones")
        wait_for(lambda: pubsub.outstanding(subscription) == 0, what="every message, hostile ones too, acknowledged")
        assert job.result.state == "RUNNING"
    finally:
        job.stop()
    dead = {d["original"]: d for d in read_dead_letters(str(tmp_path / "dlq-out"))}
    assert hostile[2] in dead and hostile[3] in dead  # broken JSON, not a raw event: kept byte for byte
    assert dead[hostile[3]]["stage"] == "decode" and dead[hostile[2]]["stage"] == "parse"
    assert all(d["error_message"] for d in dead.values())


def test_a_failing_webhook_holds_back_that_users_later_events_only(pubsub, subscription, tmp_path, webhook_secret):
    from pipelines.webhook_receiver import WebhookReceiver

    def sleep_payload(user: str, day: int, steps: int) -> RawPayload:
        body = {"dailies": [{"userId": user, "summaryId": f"{user}-{day}", "calendarDate": f"2024-03-{day:02d}",
                             "startTimeInSeconds": 1710028800 + 86400 * (day - 11), "startTimeOffsetInSeconds": 0,
                             "durationInSeconds": 86400, "steps": steps}]}
        return RawPayload("garmin", json.dumps(body).encode(), "dailies")

    with WebhookReceiver(webhook_secret) as receiver:
        sink = WebhookSink("hook", receiver.url, webhook_secret)
        job = run_streaming(normalize_job(PubSubSource(subscription), tmp_path, sinks=[sink]), redeliver_every_s=None)
        try:
            receiver.fail_next(2, 503)  # the first user's first event is refused twice, then taken
            publish_pubsub(pubsub.host, subscription, [sleep_payload("a", 11, 1)])
            wait_for(lambda: receiver.injected_failures >= 1, what="the first refusal")
            publish_pubsub(pubsub.host, subscription, [sleep_payload("a", 12, 2), sleep_payload("b", 11, 3)])
            wait_for(lambda: receiver.unique == 3, what="all three events")
            wait_for(lambda: pubsub.outstanding(subscription) == 0, what="acknowledgements")
        finally:
            job.stop()
        days = [receiver.events[i]["data"][0]["metadata"]["start_time"][:10]
                for i in receiver.order_for(terra_user_id("garmin", "a"))]
        assert days == ["2024-03-11", "2024-03-12"]  # held back behind the retried one, never overtaking it
        assert receiver.injected_failures == 2 and receiver.duplicates == 0


def test_test_stream_runs_the_same_graph(tmp_path, simulated_payloads):
    expected = batch_reference(tmp_path, simulated_payloads[:60])
    stream = BeamTestStream()
    for number, payload in enumerate(simulated_payloads[:60]):
        stream = stream.add_elements([RawMessage(encode_raw(payload), {"path": "stream", "line": number})])
        if number % 20 == 19:
            stream = stream.advance_processing_time(1)
    stream = stream.advance_watermark_to_infinity()
    pipeline = make_pipeline(streaming=True)
    build_from(pipeline | stream, normalize_job(FileSource("unused"), tmp_path, name="ts"), streaming=True)
    pipeline.run().wait_until_finish()
    assert sql_rows(tmp_path / "ts.db") == expected


@pytest.mark.parametrize("subscription", [2], indirect=True)  # a 2 s ack deadline
def test_messages_held_longer_than_the_ack_deadline_are_not_delivered_again(pubsub, subscription, tmp_path,
                                                                            webhook_secret):
    from pipelines.demo_data import garmin_daily
    from pipelines.webhook_receiver import WebhookReceiver

    with WebhookReceiver(webhook_secret) as receiver:
        job = run_streaming(normalize_job(PubSubSource(subscription), tmp_path,
                                          sinks=[WebhookSink("hook", receiver.url, webhook_secret)]),
                            redeliver_every_s=None)
        try:
            receiver.stall_next(2, 3.0)  # 6 s at the webhook: three ack deadlines
            publish_pubsub(pubsub.host, subscription, [garmin_daily("held", f"2024-03-{day}") for day in (11, 12, 13)])
            wait_for(lambda: receiver.unique == 3, what="the three events")
            wait_for(lambda: pubsub.outstanding(subscription) == 0, what="acknowledgements")
            time.sleep(2.5)  # a copy Pub/Sub delivered again would arrive by now
        finally:
            job.stop()
        assert receiver.duplicates == 0  # leases were extended while the events waited



def test_a_failing_destination_does_not_delay_another(pubsub, subscription, tmp_path, webhook_secret):
    from pipelines.demo_data import garmin_daily
    from pipelines.webhook_receiver import WebhookReceiver

    patient = RetryPolicy(max_attempts=4, initial_delay_s=1.5, max_delay_s=3.0, jitter=0.0)
    with WebhookReceiver(webhook_secret) as receiver:
        sinks = [Target(WebhookSink("hook", receiver.url, webhook_secret), patient),
                 Target(SqlSink("sql", f"sqlite:///{tmp_path / 'out.db'}"), patient)]
        job = run_streaming(normalize_job(PubSubSource(subscription), tmp_path, sinks=sinks), redeliver_every_s=None)
        try:
            publish_pubsub(pubsub.host, subscription, [garmin_daily("warm-up")])
            wait_for(lambda: receiver.unique == 1 and len(sql_rows(tmp_path / "out.db")) == 1, what="warm-up")
            receiver.fail_next(2, 503)  # the webhook refuses twice: retried after 1.5 s, then 3 s, on timers
            started = time.monotonic()
            publish_pubsub(pubsub.host, subscription, [garmin_daily("refused")])
            wait_for(lambda: len(sql_rows(tmp_path / "out.db")) == 2, what="the SQL row", timeout_s=10)
            sql_after = time.monotonic() - started
            wait_for(lambda: receiver.unique == 2, what="the webhook event, third attempt", timeout_s=20)
            webhook_after = time.monotonic() - started
        finally:
            job.stop()
    assert sql_after < 1.5 < 4.5 <= webhook_after  # SQL did not wait for the webhook's retries


class RecordingSqlSink(SqlSink):
    """A real SQLite destination that also notes the users of each write (class-wide: the job writes through its
    own copies of the sink)."""

    writes: ClassVar[list[set[str]]] = []

    def write(self, events: Sequence[NormalizedEvent]) -> SinkResult:
        RecordingSqlSink.writes.append({event.user_id for event in events})
        return super().write(events)


@pytest.mark.parametrize("shards", [None, 3])
def test_users_that_arrive_together_share_each_write(tmp_path, simulated_payloads, shards):
    expected = batch_reference(tmp_path, simulated_payloads)
    RecordingSqlSink.writes.clear()
    messages = [RawMessage(encode_raw(p), {"path": "stream", "line": n}) for n, p in enumerate(simulated_payloads)]
    stream = BeamTestStream().add_elements(messages).advance_watermark_to_infinity()  # one bundle of every user
    job = normalize_job(FileSource("unused"), tmp_path, name="ts",
                        sinks=[RecordingSqlSink("sql", f"sqlite:///{tmp_path / 'ts.db'}")])
    job.delivery_shards = shards
    pipeline = make_pipeline(streaming=True)
    build_from(pipeline | stream, job, streaming=True)
    pipeline.run().wait_until_finish()
    assert sql_rows(tmp_path / "ts.db") == expected
    users = set().union(*RecordingSqlSink.writes)
    assert len(users) > 3
    assert len(RecordingSqlSink.writes) <= (shards or 1)  # one write per shard, not one per user
    assert max(len(write) for write in RecordingSqlSink.writes) > 1


def test_delivery_shards_are_stable():
    assert [delivery_shard(user, 64) for user in ("a", "garmin-1", "")] == ["3", "26", "0"]
    assert {delivery_shard(f"user-{n}", 1) for n in range(50)} == {"0"}


def test_a_refused_user_in_a_shared_write_holds_back_only_its_own_later_events(pubsub, subscription, tmp_path,
                                                                               webhook_secret):
    from pipelines.demo_data import garmin_daily
    from pipelines.webhook_receiver import WebhookReceiver

    patient = RetryPolicy(max_attempts=4, initial_delay_s=1.5, max_delay_s=3.0, jitter=0.0)
    publish_pubsub(pubsub.host, subscription, [garmin_daily(user, "2024-03-11") for user in ("a", "b", "c")])
    with WebhookReceiver(webhook_secret) as receiver:
        receiver.fail_next(1, 503)  # the write's first request is refused once, then taken on a timer
        job = run_streaming(normalize_job(PubSubSource(subscription), tmp_path,
                                          sinks=[Target(WebhookSink("hook", receiver.url, webhook_secret), patient)]),
                            redeliver_every_s=None)
        try:
            wait_for(lambda: receiver.injected_failures == 1 and receiver.unique == 2, what="the two others")
            publish_pubsub(pubsub.host, subscription, [garmin_daily(user, "2024-03-12") for user in ("a", "b", "c")])
            wait_for(lambda: receiver.unique == 6, what="all six events")
            wait_for(lambda: pubsub.outstanding(subscription) == 0, what="acknowledgements")
        finally:
            job.stop()
        for user in ("a", "b", "c"):
            days = [receiver.events[i]["data"][0]["metadata"]["start_time"][:10]
                    for i in receiver.order_for(terra_user_id("garmin", user))]
            assert days == ["2024-03-11", "2024-03-12"]  # the refused user's next day waited for its retry
        assert receiver.injected_failures == 1 and receiver.duplicates == 0


def test_the_local_runner_inspects_each_signature_once():
    import inspect

    from apache_beam.runners.common import DoFnSignature
    from apache_beam.transforms import core
    from apache_beam.typehints import decorators

    from pipelines.launch import _look_up_signatures_once
    from transforms.deliver import DeliverInOrder

    _look_up_signatures_once()
    first, second = (DeliverInOrder(Target(SqlSink("sql", "sqlite:///unused.db"))) for _ in range(2))
    assert core.get_signature is decorators.get_signature
    for bound in (first.process, first.on_retry, second.process, write_jsonl):
        assert decorators.get_signature(bound) == inspect.signature(bound)  # bound: without its self
    assert decorators.get_signature(first.process) is decorators.get_signature(second.process)  # looked up once
    assert DoFnSignature(first).is_stateful_dofn() and DoFnSignature(second).is_stateful_dofn()


@pytest.mark.parametrize("acks_per_flush", [5000, 4])
def test_a_bundles_acks_reach_the_tracker_together_per_stream_with_every_weight(acks_per_flush):
    from collections import Counter

    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp

    from core.raw import AckToken
    from transforms.acks import ROOT_WEIGHT, _ByStream, root_acks, split_acks

    tokens = [AckToken("offset", f"raw:{partition}", offset, offset - 1) for partition in (0, 1) for offset in range(3)]
    shares = [share for token in tokens for share in split_acks(root_acks(token), 3)]  # three branches each
    by_stream = _ByStream(acks_per_flush)
    by_stream.start_bundle()
    out = [*(o for acks in shares for o in by_stream.process(acks, GlobalWindow(), Timestamp(0))),
           *by_stream.finish_bundle()]
    if acks_per_flush > len(shares):
        assert sorted(o.value[0] for o in out) == ["raw:0", "raw:1"]  # one element per stream, not one per branch
    weights: Counter[tuple[str, int]] = Counter()
    for o in out:
        for token, weight in o.value[1]:
            assert token.stream == o.value[0]
            weights[(token.stream, token.position)] += weight
    assert weights == {(t.stream, t.position): ROOT_WEIGHT for t in tokens}


def _pulled(reader, count: int, within_s: float = 5.0) -> list:
    """What ``reader`` polls within ``within_s``, once it has ``count`` messages."""
    got, deadline = [], time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += reader.poll(10, 0.2)
    return got


def test_a_message_whose_acknowledgement_fails_is_delivered_again_not_leased_for_good(pubsub, subscription,
                                                                                      monkeypatch):
    """The subscription's ack deadline is 30 s: the message comes back within seconds only because the reader
    hands it back (a zero deadline) instead of extending its lease forever."""
    from google.api_core import exceptions

    from transforms.streams import LEASES, PubSubAcks, PubSubStream

    publish_pubsub(pubsub.host, subscription, [b"not acknowledged"])
    reader, acks = PubSubStream(subscription).reader(), PubSubAcks()
    try:
        (message,) = _pulled(reader, 1)
        acks.open()

        def unavailable(**_: object) -> None:
            raise exceptions.ServiceUnavailable("injected")

        monkeypatch.setattr(acks.client, "acknowledge", unavailable)
        acks.acknowledge(subscription, [message.ack.position])
        assert LEASES.held(reader) == []
        (again,) = _pulled(reader, 1)
        assert again.data == message.data and again.ack.position != message.ack.position
    finally:
        acks.close()
        reader.close()


def test_a_closed_reader_hands_back_what_it_pulled_and_no_later_reader_keeps_it(pubsub, subscription):
    """The next job in the same process gets the message at once, not after the 30 s ack deadline (nor never: its
    reader used to extend every lease of the subscription, the stopped job's too)."""
    from transforms.streams import PubSubStream

    publish_pubsub(pubsub.host, subscription, [b"pulled by a job that stopped"])
    first = PubSubStream(subscription).reader()
    try:
        (message,) = _pulled(first, 1)
    finally:
        first.close()  # its job stopped before acknowledging
    second = PubSubStream(subscription).reader()
    try:
        (again,) = _pulled(second, 1)
        assert again.data == message.data
    finally:
        second.close()


def test_a_reader_closes_at_once_when_pub_sub_is_away(monkeypatch):
    """Handing messages back is best effort: with Pub/Sub gone, stopping the job does not wait out the client's
    minute of retries (their ack deadline runs out instead)."""
    from transforms.streams import GIVE_BACK_TIMEOUT_S, PubSubStream

    server = PubSubTestServer(pull_wait_s=0.2).start()
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", server.host)
        topic, subscription = f"{PROJECT}/topics/raw-away", f"{PROJECT}/subscriptions/normalize-away"
        server.create_topic(topic)
        server.create_subscription(subscription, topic, ack_deadline_seconds=600)
        publish_pubsub(server.host, subscription, [b"in flight when Pub/Sub went"])
        reader = PubSubStream(subscription).reader()
        assert len(_pulled(reader, 1)) == 1
    finally:
        server.stop()
    started = time.monotonic()
    reader.close()
    assert time.monotonic() - started < 2 * GIVE_BACK_TIMEOUT_S
