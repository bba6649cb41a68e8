"""kill -9 of the streaming job mid-stream, then a restart: nothing lost, no duplicate rows at the upsert destination.

The job runs as `healthflow run normalize --streaming` in its own process against the gRPC Pub/Sub test
server and PostgreSQL (a fresh database). Messages are acknowledged only after delivery, so whatever the
killed process had in flight is delivered again by Pub/Sub once its ack deadline passes.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from test_streaming import PROJECT, batch_reference, publish_pubsub, sql_rows

from reliability.mechanics import (
    JobPaths,
    as_comparable,
    destinations_file,
    kafka_source,
    normalize_command,
    postgres_rows,
    wait_for,
    webhook_entry,
)
from reliability.mechanics import start_job as start_job_process

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fresh_postgres():
    name = f"hf_kill_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_job(source: list[str], destinations: Path, tmp_path: Path, secret: str = "",
              env: dict[str, str] | None = None, state: str | None = None) -> subprocess.Popen[bytes]:
    """``healthflow run normalize --streaming`` from ``source`` in its own process (the harness's mechanics)."""
    paths = JobPaths(state or f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "dlq", tmp_path / "job.log")
    return start_job_process(normalize_command(source, destinations, paths, streaming=True), paths.log, secret, env)


def test_kill_9_mid_stream_then_restart_loses_nothing(tmp_path, simulated_payloads, fresh_postgres, monkeypatch,
                                                      webhook_secret):
    from servers.pubsub_server import PubSubTestServer

    from pipelines.webhook_receiver import WebhookReceiver

    expected = as_comparable(batch_reference(tmp_path, simulated_payloads))
    destinations = tmp_path / "destinations.yaml"
    with PubSubTestServer(pull_wait_s=0.2) as pubsub, WebhookReceiver(webhook_secret) as receiver:
        destinations_file(destinations, f"{{name: pg, type: postgres, url: '{fresh_postgres}'}}",
                          webhook_entry("hook", receiver.url))
        name = uuid.uuid4().hex[:8]
        subscription = f"{PROJECT}/subscriptions/normalize-{name}"
        pubsub.create_topic(f"{PROJECT}/topics/raw-{name}")
        pubsub.create_subscription(subscription, f"{PROJECT}/topics/raw-{name}", ack_deadline_seconds=3)
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub.host)
        half = len(simulated_payloads) // 2
        job = start_job(["--subscription", subscription], destinations, tmp_path, webhook_secret,
                        {"PUBSUB_EMULATOR_HOST": pubsub.host})
        try:
            publish_pubsub(pubsub.host, subscription, simulated_payloads[:half], pace_s=0.01)
            wait_for(lambda: len(postgres_rows(fresh_postgres)) > 10, what="the first rows", timeout_s=90)
            receiver.stall_next(3, 3.0)  # the webhook holds the next events: their messages are in flight
            publish_pubsub(pubsub.host, subscription, simulated_payloads[half:half + 20], pace_s=0.005)
            wait_for(lambda: pubsub.leased(subscription) > 0, what="messages in flight")
            job.send_signal(signal.SIGKILL)  # mid-stream: messages in flight, none acknowledged early
            job.wait(10)
            assert pubsub.leased(subscription) > 0
            publish_pubsub(pubsub.host, subscription, simulated_payloads[half + 20:])
            job = start_job(["--subscription", subscription], destinations, tmp_path, webhook_secret,
                            {"PUBSUB_EMULATOR_HOST": pubsub.host})
            wait_for(lambda: as_comparable(postgres_rows(fresh_postgres)) == expected, timeout_s=150,
                     what="every record after the restart")
            wait_for(lambda: pubsub.outstanding(subscription) == 0, what="every message acknowledged")
            final_ids = {event_id for event_id, _ in expected.values()}
            wait_for(lambda: final_ids <= set(receiver.events), what="every record's final event at the webhook")
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait(10)
        with psycopg.connect(fresh_postgres) as conn:
            (rows, distinct), = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT (user_id, type, natural_key)) FROM healthflow_records").fetchall()
        assert rows == distinct == len(expected)


def test_kill_9_of_the_kafka_stream_then_restart_loses_nothing(tmp_path, simulated_payloads, fresh_postgres, broker,
                                                               topic, webhook_secret):
    from connectors.publish import publish
    from pipelines.webhook_receiver import WebhookReceiver
    from transforms.sources import committed_offsets

    expected = as_comparable(batch_reference(tmp_path, simulated_payloads))
    destinations = tmp_path / "destinations.yaml"

    def start() -> subprocess.Popen[bytes]:
        return start_job(kafka_source(broker.bootstrap, topic, "killed"), destinations, tmp_path, webhook_secret)

    def committed() -> int:
        return sum(committed_offsets(broker.bootstrap, topic, "killed").values())

    with WebhookReceiver(webhook_secret) as receiver:
        destinations_file(destinations, f"{{name: pg, type: postgres, url: '{fresh_postgres}'}}",
                          webhook_entry("hook", receiver.url))
        half = len(simulated_payloads) // 2
        job = start()
        try:
            first = publish(broker.bootstrap, topic, simulated_payloads[:half])
            wait_for(lambda: committed() == first, what="the first half committed", timeout_s=90)
            receiver.stall_next(3, 3.0)  # the webhook holds the next events: their offsets cannot be committed
            second = publish(broker.bootstrap, topic, simulated_payloads[half:half + 20])
            wait_for(lambda: receiver.received > 0 and len(postgres_rows(fresh_postgres)) > 0, what="deliveries")
            job.send_signal(signal.SIGKILL)  # mid-stream
            job.wait(10)
            assert committed() < first + second  # what was in flight was not committed
            rest = publish(broker.bootstrap, topic, simulated_payloads[half + 20:])
            job = start()
            wait_for(lambda: as_comparable(postgres_rows(fresh_postgres)) == expected, timeout_s=150,
                     what="every record after the restart")
            wait_for(lambda: committed() == first + second + rest, what="every offset committed")
            final_ids = {event_id for event_id, _ in expected.values()}
            wait_for(lambda: final_ids <= set(receiver.events), what="every record's final event at the webhook")
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait(10)


def test_the_streaming_job_rides_out_a_state_database_outage(tmp_path, simulated_payloads, broker, topic,
                                                             private_postgres, webhook_secret):
    """The record state's PostgreSQL is down when the job starts, then again for a while mid-stream: the job waits
    (never exits), and once the database is back every record is delivered and every offset committed."""
    from connectors.publish import publish
    from transforms.sources import committed_offsets

    expected = as_comparable(batch_reference(tmp_path, simulated_payloads))
    destinations = tmp_path / "destinations.yaml"
    out = tmp_path / "out.db"
    destinations.write_text(f"destinations:\n  - {{name: sql, type: sqlite, url: 'sqlite:///{out}'}}\n")
    private_postgres.stop()  # down before the job starts: a restart during an outage must wait, not exit

    def committed() -> int:
        return sum(committed_offsets(broker.bootstrap, topic, "outage").values())

    job = start_job(kafka_source(broker.bootstrap, topic, "outage"), destinations, tmp_path,
                    state=private_postgres.url())
    try:
        half = len(simulated_payloads) // 2
        first = publish(broker.bootstrap, topic, simulated_payloads[:half])
        time.sleep(8)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-2000:]
        private_postgres.start()
        wait_for(lambda: committed() == first, what="the first half committed", timeout_s=90)
        private_postgres.stop()  # mid-stream
        rest = publish(broker.bootstrap, topic, simulated_payloads[half:])
        time.sleep(15)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-2000:]
        private_postgres.start()
        wait_for(lambda: committed() == first + rest, what="every offset committed after the outage", timeout_s=120)
        wait_for(lambda: as_comparable(sql_rows(out)) == expected, what="every record delivered", timeout_s=30)
        assert job.poll() is None
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(10)


def test_a_database_that_is_down_is_an_outage_and_a_wrong_url_a_misconfiguration(private_postgres):
    from core.errors import FatalError, RetryableError
    from core.store import Store

    store = Store(private_postgres.url())
    store.open()
    private_postgres.stop()
    with pytest.raises(RetryableError):  # the connection it had is gone: transient, and dropped
        store.query("SELECT 1")
    with pytest.raises(RetryableError, match="store unavailable"):  # reconnecting while down: still transient
        store.query("SELECT 1")
    with pytest.raises(RetryableError, match="store unavailable"):
        Store(private_postgres.url()).open()
    private_postgres.start()
    assert store.query("SELECT 1") == [(1,)]  # back: the store reconnects by itself
    with pytest.raises(FatalError, match="does not exist"):
        Store(private_postgres.url("no_such_database")).open()
    with pytest.raises(FatalError, match="resolve host"):
        Store("postgresql://postgres@no-such-host.invalid:5432/x").open()


@pytest.mark.parametrize("scheme, port, database", [("postgresql", 5432, "postgres"), ("mysql", 3306, "mysql")])
def test_a_host_name_that_stops_resolving_once_connected_is_an_outage(scheme, port, database, monkeypatch):
    """docker compose: while a database's container restarts, its name does not resolve. A name that never resolved
    is a typo (fail at start); once the URL has connected in this process, it is an outage to wait out."""
    from core.errors import FatalError, RetryableError
    from core.store import Store

    variable = f"HF_TEST_DB_HOST_{uuid.uuid4().hex[:8].upper()}"  # a URL no other test has connected with
    url = f"{scheme}://{'postgres' if scheme == 'postgresql' else 'root'}@${{{variable}}}:{port}/{database}"
    restarting = f"restarting-{uuid.uuid4().hex[:8]}.invalid"
    monkeypatch.setenv(variable, restarting)
    with pytest.raises(FatalError, match=r"cannot open store.*not known"):  # never connected: a misconfiguration
        Store(url).open()
    monkeypatch.setenv(variable, "127.0.0.1")
    store = Store(url).open()
    assert store.query("SELECT 1") == [(1,)]
    store.close()
    monkeypatch.setenv(variable, restarting)  # the container restarts: its name is gone for a moment
    with pytest.raises(RetryableError, match=r"store unavailable.*not known"):
        store.open()
    with pytest.raises(RetryableError):  # any Store of that URL in this process
        Store(url).open()
    monkeypatch.setenv(variable, "127.0.0.1")
    assert store.query("SELECT 1") == [(1,)]


def test_a_resolver_saying_try_again_is_an_outage_even_before_the_first_connection():
    """EAI_AGAIN (``Temporary failure in name resolution``) is the resolver's own outage, never the URL's fault."""
    import pymysql

    from core.errors import RetryableError
    from core.sql import dialect_for

    never_connected = f"db-{uuid.uuid4().hex[:8]}"
    postgres = dialect_for(f"postgresql://app@{never_connected}/hf")
    failure = psycopg.OperationalError(f"failed to resolve host '{never_connected}': [Errno -3] Temporary failure "
                                       f"in name resolution")
    assert isinstance(postgres.classify(failure, f"postgresql://app@{never_connected}/hf"), RetryableError)
    libpq = psycopg.OperationalError(f'could not translate host name "{never_connected}" to address: Temporary '
                                     f'failure in name resolution')
    assert isinstance(postgres.classify(libpq, f"postgresql://app@{never_connected}/hf"), RetryableError)
    mysql = dialect_for(f"mysql://app@{never_connected}/hf")
    failure = pymysql.err.OperationalError(2003, f"Can't connect to MySQL server on '{never_connected}' ([Errno -3] "
                                                 f"Temporary failure in name resolution)")
    assert isinstance(mysql.classify(failure, f"mysql://app@{never_connected}/hf"), RetryableError)


def test_the_kafka_stream_rides_out_a_broker_outage(tmp_path, simulated_payloads):
    """The broker is away when the job starts, then restarted mid-stream: the job waits (never exits) and delivers
    what is published once it is back. (The embedded broker keeps topics in memory: the topic is created again.)"""
    from connectors.publish import publish
    from pipelines.embedded import EmbeddedBroker, free_port

    out = tmp_path / "out.db"
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(f"destinations:\n  - {{name: sql, type: sqlite, url: 'sqlite:///{out}'}}\n")
    broker = EmbeddedBroker(port=free_port())
    half = len(simulated_payloads) // 2
    job = start_job(kafka_source(broker.bootstrap, "raw", "outage"), destinations, tmp_path)
    try:
        time.sleep(50)  # longer than the local runner retries a failing bundle (4 attempts of a 10 s metadata wait)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-2000:]
        broker.start()
        broker.create_topic("raw", partitions=3)
        publish(broker.bootstrap, "raw", simulated_payloads[:half])
        wait_for(lambda: len(sql_rows(out)) > 0, what="the first records", timeout_s=90)
        broker.stop()
        time.sleep(35)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-2000:]
        broker.start()
        broker.create_topic("raw", partitions=3)
        before = len(sql_rows(out))
        publish(broker.bootstrap, "raw", simulated_payloads[half:])
        wait_for(lambda: len(sql_rows(out)) > before, what="records published after the restart", timeout_s=90)
        assert job.poll() is None
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        broker.stop()


def test_a_topic_the_broker_cannot_serve_for_now_is_an_outage_and_a_missing_one_a_misconfiguration():
    """LEADER_NOT_AVAILABLE while a broker restarts (and any error the client marks retriable) is waited out; a topic
    that does not exist, or that this client may not read, fails at start with what to fix."""
    from confluent_kafka import KafkaError

    from core.errors import FatalError, RetryableError
    from pipelines.embedded import EmbeddedBroker
    from transforms.sources import plan_partitions, topic_metadata_error

    for transient in (KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
                      KafkaError.REPLICA_NOT_AVAILABLE):
        assert isinstance(topic_metadata_error("b:9092", "raw", KafkaError(transient)), RetryableError)
    assert isinstance(topic_metadata_error("b:9092", "raw", KafkaError(KafkaError.TOPIC_EXCEPTION, retriable=True)),
                      RetryableError)
    assert isinstance(topic_metadata_error("b:9092", "raw", KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)),
                      FatalError)
    with EmbeddedBroker() as broker, pytest.raises(FatalError, match=r"'no-such-topic' not found.*create it"):
        plan_partitions(broker.bootstrap, "no-such-topic", "g")  # the real broker's answer for a missing topic


def test_a_batch_kafka_read_waits_out_a_broker_restart(tmp_path):
    """The broker goes away after the partitions are planned, while they are read, and is back (durable storage)
    after longer than the reader's idle window: the read waits and ends with every message, none twice."""
    import threading

    from confluent_kafka import Producer

    from pipelines.embedded import EmbeddedBroker, free_port
    from transforms.sources import ReadPartitionToEnd, plan_partitions

    port, storage = free_port(), tmp_path / "broker"
    broker = EmbeddedBroker(port=port, storage=storage).start()
    again = EmbeddedBroker(port=port, storage=storage)
    back = threading.Timer(5.0, again.start)  # back after 5 s: longer than the 2 s idle window below
    try:
        broker.create_topic("raw", 2)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
        values = [f"event-{n}".encode() for n in range(40)]
        for number, value in enumerate(values):
            producer.produce("raw", value, partition=number % 2)
        assert producer.flush(20) == 0
        plan = plan_partitions(broker.bootstrap, "raw", "restart")
        broker.stop()
        back.start()
        reader = ReadPartitionToEnd(broker.bootstrap, "raw", "restart", idle_polls=20)  # 20 polls of 0.1 s
        started = time.monotonic()
        read = [message.data for element in plan for message in reader.process(element)]
        assert time.monotonic() - started > 4.0  # it did wait for the broker
        assert sorted(read) == sorted(values)
    finally:
        broker.stop()
        back.cancel()
        back.join()
        again.stop()
