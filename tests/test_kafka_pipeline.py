"""Through a real Kafka-protocol broker (Tansu): offsets move only after every sink accepted."""

from __future__ import annotations

import sqlite3

import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.publish import publish
from core.errors import FatalError
from pipelines.normalize import KafkaSource, NormalizeJob, run_batch
from sinks.policy import RetryPolicy
from sinks.sql import SqlSink

FAST_RETRY = RetryPolicy(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.02)


def _job(broker, topic, tmp_path, sql_url=None, group="normalize") -> NormalizeJob:
    sink = SqlSink("sql", sql_url or f"sqlite:///{tmp_path / 'out.db'}")
    return NormalizeJob(KafkaSource(broker.bootstrap, topic, group), [sink], str(tmp_path / "dlq"),
                        state_url=f"sqlite:///{tmp_path / 'state.db'}", retry=FAST_RETRY)


def _committed(broker, topic, group) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        return {tp.partition: tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(3)],
                                                                     timeout=10)}
    finally:
        consumer.close()


def _rows(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "out.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM healthflow_records").fetchone()[0]


def test_batch_reads_everything_once_and_commits_after_delivery(broker, topic, tmp_path, simulated_payloads):
    published = publish(broker.bootstrap, topic, simulated_payloads)
    first = run_batch(_job(broker, topic, tmp_path))
    assert first.get("raw_in") == published
    events = sum(first.with_prefix("normalized:").values())
    assert first.get("delivered:sql") == events == _rows(tmp_path)
    assert sum(first.committed_offsets.values()) == published
    assert _committed(broker, topic, "normalize") == first.committed_offsets
    second = run_batch(_job(broker, topic, tmp_path))
    assert second.get("raw_in") == 0  # nothing is read twice once committed


def test_a_failed_run_commits_nothing_and_the_next_run_rereads(broker, topic, tmp_path, simulated_payloads):
    published = publish(broker.bootstrap, topic, simulated_payloads[:30])
    with pytest.raises(Exception, match="unable to open database file"):
        run_batch(_job(broker, topic, tmp_path, sql_url="sqlite:////proc/healthflow-no-such-dir/x.db"))
    assert set(_committed(broker, topic, "normalize").values()) == {-1001}  # OFFSET_INVALID: never committed
    retry = run_batch(_job(broker, topic, tmp_path))
    assert retry.get("raw_in") == published
    assert retry.get("delivered:sql") == _rows(tmp_path) > 0


def test_a_missing_topic_is_a_configuration_error(broker, tmp_path):
    with pytest.raises(FatalError, match="not found"):
        run_batch(_job(broker, "no-such-topic", tmp_path))
