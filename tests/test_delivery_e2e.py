"""End to end through the real pipeline, to every destination type at once (built from a destinations config).

The delivery issue is done when, after a run with forced redeliveries, every destination holds exactly the
normalized events (no duplicates where the destination upserts or dedupes), each user's events arrive in order
where the destination promises it, a failing destination leaves the others complete, and replay restores it.

Everything runs on loopback: a WebhookReceiver, moto_server (S3, FIFO SQS), the embedded Kafka-protocol broker,
the in-process Pub/Sub test server, Postgres (127.0.0.1:5432/test, also as Supabase), MariaDB (127.0.0.1:3306/test),
SQLite and a local object store; the servers must be up (never skipped).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import secrets
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import grpc
import psycopg
import pyarrow.parquet as pq
import pymysql
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from core.dead_letters import read_dead_letters
from core.events import NormalizedEvent
from pipelines.embedded import MOTO_REGION, EmbeddedBroker
from pipelines.normalize import FileSource, NormalizeJob, RunSummary, run_batch
from pipelines.replay import replay_deliveries, select
from pipelines.webhook_receiver import WebhookReceiver
from sinks.config import parse_destinations
from sinks.policy import Target
from transforms.normalize import Failed, Keyed, merge_user_events, normalize_message
from transforms.sources import read_lines

try:  # pytest puts tests/ on sys.path while tests/ has no __init__.py ...
    from servers.pubsub_server import PubSubTestServer
except ImportError:  # ... and the repository root once it has one
    from tests.servers.pubsub_server import PubSubTestServer

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
PUBSUB_PROJECT = "healthflow-e2e"
KAFKA_PARTITIONS = 3
FAST_RETRY = {"max_attempts": 2, "initial_delay_s": 0.01, "max_delay_s": 0.02}
SQL_DESTINATIONS = ("sqlite", "postgres", "mysql")
ALL_DESTINATIONS = ("webhook", *SQL_DESTINATIONS, "supabase", "objects", "s3", "sqs", "kafka", "pubsub")


# ======================================================================================================================
# Expected events: the same payloads normalized directly (no pipeline, no state), in each user's order
# ======================================================================================================================
@dataclass(frozen=True)
class Expected:
    events: dict[str, NormalizedEvent]  # by event id
    order: dict[str, list[str]]  # user id -> event ids in sequence order

    @property
    def ids(self) -> set[str]:
        return set(self.events)

    @property
    def count(self) -> int:
        return len(self.events)

    def sequence(self, event_id: str) -> str:
        return self.events[event_id].sequence


def expected_events(path: str) -> Expected:
    fragments: dict[str, list[Keyed]] = defaultdict(list)
    for message in read_lines(path):  # exactly the RawMessages the pipeline's file source builds
        for item in normalize_message(message):
            if not isinstance(item, Failed):
                fragments[item.user["user_id"]].append(item)
    events: dict[str, NormalizedEvent] = {}
    order: dict[str, list[str]] = {}
    for user, keyed in fragments.items():
        merged = merge_user_events(user, keyed)  # sorted by sequence
        order[user] = [e.event_id for e in merged]
        events.update((e.event_id, e) for e in merged)
    assert sum(len(ids) for ids in order.values()) == len(events), "two records of the run share an event id"
    return Expected(events, order)


def raw_file(path: Path, payloads) -> str:
    path.write_text("\n".join(json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                                          "received_at": p.received_at_ms, "payload": p.payload.decode()})
                              for p in payloads) + "\n")
    return str(path)


# ======================================================================================================================
# One fresh set of destinations of every type, described by a destinations config
# ======================================================================================================================
@dataclass
class Deployment:
    tag: str
    root: Path
    receiver: WebhookReceiver
    moto: str
    bucket: str
    queue_url: str
    broker: EmbeddedBroker
    kafka_topic: str
    pubsub: PubSubTestServer
    pubsub_topic: str
    pubsub_subscription: str
    sql_prefix: str
    supabase_schema: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def dlq(self) -> str:
        return str(self.root / "dlq")

    @property
    def state_url(self) -> str:
        return f"sqlite:///{self.root / 'state.db'}"

    @property
    def sqlite_path(self) -> Path:
        return self.root / "out.db"

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    def targets(self) -> list[Target]:
        return parse_destinations(self.config, f"e2e-{self.tag}").targets()

    def run(self, source: str) -> RunSummary:
        return run_batch(NormalizeJob(FileSource(source), self.targets(), self.dlq, state_url=self.state_url))

    # -- inspection of each destination --------------------------------------------------------------------------------
    def sql_count(self, destination: str, table: str) -> int:
        if destination == "sqlite":
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as connection:
                return connection.execute(f"SELECT COUNT(*) FROM {self.sql_prefix}{table}").fetchone()[0]
        if destination == "mysql":
            return mysql_query(f"SELECT COUNT(*) FROM {self.sql_prefix}{table}")[0][0]
        name = f"{self.supabase_schema}.{table}" if destination == "supabase" else f"{self.sql_prefix}{table}"
        return postgres_query(f"SELECT COUNT(*) FROM {name}")[0][0]

    def sql_event_ids(self, destination: str) -> list[str]:
        sql = f"SELECT event_id FROM {self.sql_prefix}records"
        if destination == "sqlite":
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as connection:
                return [r[0] for r in connection.execute(sql).fetchall()]
        rows = mysql_query(sql) if destination == "mysql" else postgres_query(sql)
        return [r[0] for r in rows]

    def object_store_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_bytes()) for p in sorted(self.objects.rglob("*.json"))]

    def s3_keys(self) -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.moto, region_name=MOTO_REGION)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.tag}/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def s3_json_event_ids(self) -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.moto, region_name=MOTO_REGION)
        return [s3.head_object(Bucket=self.bucket, Key=key)["Metadata"]["event-id"]
                for key in self.s3_keys() if key.endswith(".json")]

    def s3_parquet_event_ids(self) -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.moto, region_name=MOTO_REGION)
        ids: list[str] = []
        for key in self.s3_keys():
            if key.endswith(".parquet"):
                body = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                ids.extend(pq.read_table(io.BytesIO(body)).column("event_id").to_pylist())
        return ids

    def sqs_messages(self) -> list[dict[str, Any]]:
        """Every message on the queue, in the order SQS hands them out.

        Read only after all runs: a FIFO queue holds back a message group while one of its messages is in flight, so
        each received batch is deleted before the next receive; deduplication (by MessageDeduplicationId = event id)
        already happened when the runs sent (moto only dedups against messages not yet deleted)."""
        sqs = boto3.client("sqs", endpoint_url=self.moto, region_name=MOTO_REGION)
        received: list[dict[str, Any]] = []
        while True:
            batch = sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                        MessageAttributeNames=["All"], MessageSystemAttributeNames=["All"],
                                        VisibilityTimeout=60).get("Messages", [])
            if not batch:
                return received
            received.extend(batch)
            sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)])

    def kafka_messages(self, timeout_s: float = 30.0) -> dict[int, list[tuple[str, str]]]:
        """(user id, event id) of every message per partition, in offset order (read up to each partition's EOF)."""
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": f"e2e-{uuid.uuid4().hex}",
                             "enable.auto.commit": False, "enable.partition.eof": True})
        consumer.assign([TopicPartition(self.kafka_topic, p, OFFSET_BEGINNING) for p in range(KAFKA_PARTITIONS)])
        by_partition: dict[int, list[tuple[str, str]]] = {p: [] for p in range(KAFKA_PARTITIONS)}
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout_s
        try:
            while len(at_end) < KAFKA_PARTITIONS and time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None:
                    continue
                if message.error():
                    assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                    at_end.add(message.partition())
                    continue
                headers = {k: v.decode() for k, v in message.headers() or []}
                assert message.key().decode() == headers["user_id"]
                by_partition[message.partition()].append((headers["user_id"], headers["event_id"]))
        finally:
            consumer.close()
        assert at_end == set(range(KAFKA_PARTITIONS)), f"no end of partition seen for {set(by_partition) - at_end}"
        return by_partition

    def pubsub_messages(self, expected: int, timeout_s: float = 30.0) -> list[Any]:
        """Pull and acknowledge until ``expected`` messages arrived, then one more pull that must come back empty."""
        subscriber = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(
            host=self.pubsub.host, channel=grpc.insecure_channel(self.pubsub.host)))
        messages: list[Any] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(messages) < expected and time.monotonic() < deadline:
                response = subscriber.pull(subscription=self.pubsub_subscription, max_messages=1000, timeout=10)
                if response.received_messages:
                    subscriber.acknowledge(subscription=self.pubsub_subscription,
                                           ack_ids=[r.ack_id for r in response.received_messages])
                messages.extend(r.message for r in response.received_messages)
            assert not subscriber.pull(subscription=self.pubsub_subscription, max_messages=1000,
                                       timeout=10).received_messages, "more Pub/Sub messages than expected"
        finally:
            subscriber.close()
        return messages


def postgres_query(sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        cursor = connection.execute(sql)
        return cursor.fetchall() if cursor.description else []


def mysql_query(sql: str) -> list[tuple[Any, ...]]:
    connection = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database="test",
                                 autocommit=True, charset="utf8mb4")
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())
    finally:
        connection.close()


@dataclass
class Stack:
    """The loopback servers shared by the module, and a factory of fresh destination sets on them."""

    broker: EmbeddedBroker
    moto: str
    pubsub: PubSubTestServer
    secret: str
    tmp: Path
    exit: contextlib.ExitStack
    source: str = ""
    expected: Expected | None = None

    def deploy(self, name: str) -> Deployment:
        tag = f"{name}{uuid.uuid4().hex[:8]}"
        root = self.tmp / tag
        root.mkdir()
        receiver = self.exit.enter_context(WebhookReceiver(self.secret))
        bucket = f"hf-e2e-{tag}"
        boto3.client("s3", endpoint_url=self.moto, region_name=MOTO_REGION).create_bucket(Bucket=bucket)
        queue_url = boto3.client("sqs", endpoint_url=self.moto, region_name=MOTO_REGION).create_queue(
            QueueName=f"hf-e2e-{tag}.fifo",
            Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"})["QueueUrl"]
        kafka_topic = f"e2e.{tag}"
        self.broker.create_topic(kafka_topic, partitions=KAFKA_PARTITIONS)
        pubsub_topic = f"projects/{PUBSUB_PROJECT}/topics/{tag}"
        subscription = f"projects/{PUBSUB_PROJECT}/subscriptions/{tag}"
        self.pubsub.create_topic(pubsub_topic)
        self.pubsub.create_subscription(subscription, pubsub_topic, ack_deadline_seconds=60)
        deployment = Deployment(tag, root, receiver, self.moto, bucket, queue_url, self.broker, kafka_topic,
                                self.pubsub, pubsub_topic, subscription, sql_prefix=f"hf_e2e_{tag}_",
                                supabase_schema=f"hf_e2e_{tag}")
        self.exit.callback(drop_sql, deployment)
        deployment.config = {"destinations": [
            {"name": "webhook", "type": "webhook", "url": receiver.url, "secret": self.secret, "timeout_s": 10},
            {"name": "sqlite", "type": "sqlite", "url": f"sqlite:///{deployment.sqlite_path}",
             "table_prefix": deployment.sql_prefix},
            {"name": "postgres", "type": "postgres", "url": POSTGRES_URL, "table_prefix": deployment.sql_prefix},
            {"name": "mysql", "type": "mysql", "url": MYSQL_URL, "table_prefix": deployment.sql_prefix},
            {"name": "supabase", "type": "supabase", "url": POSTGRES_URL, "schema": deployment.supabase_schema},
            {"name": "objects", "type": "object_store", "root": str(deployment.objects)},
            {"name": "s3", "type": "s3", "bucket": bucket, "prefix": tag, "endpoint_url": self.moto,
             "region": MOTO_REGION, "formats": ["json", "parquet"]},
            {"name": "sqs", "type": "sqs", "queue_url": queue_url, "endpoint_url": self.moto, "region": MOTO_REGION},
            {"name": "kafka", "type": "kafka", "bootstrap_servers": self.broker.bootstrap, "topic": kafka_topic,
             "producer_config": {"message.timeout.ms": 10_000}},
            {"name": "pubsub", "type": "pubsub", "project": PUBSUB_PROJECT, "topic": tag,
             "emulator_host": self.pubsub.host},
        ]}
        assert [d["name"] for d in deployment.config["destinations"]] == list(ALL_DESTINATIONS)
        return deployment


def drop_sql(deployment: Deployment) -> None:
    prefix = deployment.sql_prefix
    postgres_query(f"DROP TABLE IF EXISTS {prefix}records, {prefix}users")
    postgres_query(f"DROP SCHEMA IF EXISTS {deployment.supabase_schema} CASCADE")
    mysql_query(f"DROP TABLE IF EXISTS {prefix}records, {prefix}users")


@pytest.fixture(scope="module")
def stack(broker: EmbeddedBroker, moto_endpoint: str, simulated_payloads, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with contextlib.ExitStack() as exit_stack, PubSubTestServer() as pubsub:
        running = Stack(broker, moto_endpoint, pubsub, secret, tmp, exit_stack)
        running.source = raw_file(tmp / "raw.jsonl", simulated_payloads)
        running.expected = expected_events(running.source)
        yield running


# ======================================================================================================================
# Assertions per destination
# ======================================================================================================================
def normalized(summary: RunSummary) -> int:
    return sum(summary.with_prefix("normalized:").values())


def assert_in_user_order(ids_by_user: dict[str, list[str]], expected: Expected, runs: int, where: str) -> None:
    """Each user's ids are that user's events in sequence order, once per run, and nothing else."""
    for user, ids in ids_by_user.items():
        assert ids == expected.order[user] * runs, f"{where}: {user}'s events out of order or incomplete"
    assert set(ids_by_user) == set(expected.order), f"{where}: users missing"


def assert_stores_complete(deployment: Deployment, expected: Expected) -> None:
    """The destinations that upsert, overwrite or dedupe hold each event exactly once."""
    users = len(expected.order)
    for name in SQL_DESTINATIONS:
        assert deployment.sql_count(name, "records") == expected.count, name
        assert sorted(deployment.sql_event_ids(name)) == sorted(expected.ids), name
        assert deployment.sql_count(name, "users") == users, name
    assert deployment.sql_count("supabase", "terra_data_payloads") == expected.count
    assert deployment.sql_count("supabase", "terra_users") == users

    bodies = deployment.object_store_bodies()
    assert len(bodies) == expected.count
    assert sorted(json.dumps(b, sort_keys=True) for b in bodies) == sorted(
        json.dumps(e.envelope(), sort_keys=True) for e in expected.events.values())

    s3_json = deployment.s3_json_event_ids()
    assert len(s3_json) == expected.count and set(s3_json) == expected.ids
    parquet_ids = deployment.s3_parquet_event_ids()  # one file per (batch, type): readers dedupe on event_id
    assert set(parquet_ids) == expected.ids

    messages = deployment.sqs_messages()  # FIFO: deduplicated by event id, one group per user
    ids = [m["MessageAttributes"]["event_id"]["StringValue"] for m in messages]
    assert Counter(ids) == Counter(expected.ids), "SQS: each event exactly once"
    by_group: dict[str, list[str]] = defaultdict(list)
    for message, event_id in zip(messages, ids, strict=True):
        assert message["Attributes"]["MessageGroupId"] == expected.events[event_id].user_id
        by_group[expected.events[event_id].user_id].append(event_id)
    assert_in_user_order(by_group, expected, runs=1, where="SQS")


def assert_streams_hold(deployment: Deployment, expected: Expected, runs: int) -> None:
    """Kafka and Pub/Sub: no broker-side deduplication, so every run's copy is there, each user's in order."""
    by_partition = deployment.kafka_messages()
    all_ids = [event_id for messages in by_partition.values() for _, event_id in messages]
    assert Counter(all_ids) == Counter({event_id: runs for event_id in expected.ids})
    partitions_of: dict[str, set[int]] = defaultdict(set)
    for partition, messages in by_partition.items():
        per_user: dict[str, list[str]] = defaultdict(list)
        for user, event_id in messages:
            assert expected.events[event_id].user_id == user
            per_user[user].append(event_id)
            partitions_of[user].add(partition)
        for user, ids in per_user.items():  # run after run, each run in the user's sequence order
            assert ids == expected.order[user] * runs, f"Kafka partition {partition}: {user} out of order"
    assert all(len(p) == 1 for p in partitions_of.values()), "a user's events spread over partitions"

    messages = deployment.pubsub_messages(expected=runs * expected.count)
    assert len(messages) == runs * expected.count
    assert {m.attributes["event_id"] for m in messages} == expected.ids
    by_key: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        assert message.ordering_key == message.attributes["user_id"]
        by_key[message.ordering_key].append(message.attributes["event_id"])
    assert_in_user_order(by_key, expected, runs=runs, where="Pub/Sub")


def assert_webhook_in_order(receiver: WebhookReceiver, expected: Expected) -> None:
    for user, ids in expected.order.items():
        received = receiver.order_for(user)
        assert received == ids, f"webhook: {user}'s events out of order or incomplete"
        assert [expected.sequence(i) for i in received] == sorted(expected.sequence(i) for i in received)


# ======================================================================================================================
# The tests
# ======================================================================================================================
def test_every_destination_holds_exactly_the_events_after_forced_redelivery(stack: Stack) -> None:
    expected = stack.expected
    assert expected is not None and expected.count > 50
    deployment = stack.deploy("redeliver")
    receiver = deployment.receiver

    for run in (1, 2):  # run 2 re-delivers every event with the same event ids
        summary = deployment.run(stack.source)
        assert normalized(summary) == expected.count, f"run {run}"
        for name in ALL_DESTINATIONS:
            assert summary.get(f"delivered:{name}") == expected.count, f"run {run}: {name}"
            assert summary.get(f"delivery_dead_letter:{name}") == 0, f"run {run}: {name}"

    assert receiver.unique == expected.count and receiver.duplicates == expected.count
    assert set(receiver.events) == expected.ids and receiver.rejected_signature == 0
    assert_webhook_in_order(receiver, expected)
    assert_stores_complete(deployment, expected)
    assert_streams_hold(deployment, expected, runs=2)
    assert select(deployment.dlq) == []  # no delivery dead letters (only the malformed inputs' ingest ones)


def test_a_failing_destination_leaves_the_others_complete_and_replay_restores_it(stack: Stack) -> None:
    expected = stack.expected
    assert expected is not None
    deployment = stack.deploy("failing")
    webhook = next(d for d in deployment.config["destinations"] if d["name"] == "webhook")
    webhook["retry"] = dict(FAST_RETRY)
    receiver = deployment.receiver
    receiver.fail_next(100_000, 503)  # down for the whole run

    summary = deployment.run(stack.source)

    assert normalized(summary) == expected.count
    assert summary.get("delivered:webhook") == 0 and receiver.unique == 0
    assert summary.get("delivery_dead_letter:webhook") == expected.count
    for name in ALL_DESTINATIONS[1:]:
        assert summary.get(f"delivered:{name}") == expected.count, name
        assert summary.get(f"delivery_dead_letter:{name}") == 0, name
    dead = select(deployment.dlq)
    assert {d["destination"] for d in dead} == {"webhook"}
    assert sorted(d["event_id"] for d in dead) == sorted(expected.ids)
    assert {d["attempts"] for d in dead} == {FAST_RETRY["max_attempts"]}
    assert_stores_complete(deployment, expected)
    assert_streams_hold(deployment, expected, runs=1)

    receiver.clear_failures()  # the endpoint is fixed
    replayed = replay_deliveries(deployment.dlq, deployment.targets(), destination="webhook",
                                 status_url=deployment.state_url)
    assert replayed.delivered == Counter({"webhook": expected.count}) and not replayed.failed_again
    assert receiver.unique == expected.count and receiver.duplicates == 0 and receiver.rejected_signature == 0
    assert set(receiver.events) == expected.ids
    assert_webhook_in_order(receiver, expected)
    assert select(deployment.dlq, destination="webhook") == []
    assert all(not d["stage"].startswith("deliver:") for d in read_dead_letters(deployment.dlq))
