"""What the embedded broker keeps across a restart: with a storage folder, every acknowledged event and the committed
offsets (also after kill -9); in memory, nothing, and its startup log line says so."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipelines.embedded import EmbeddedBroker, free_port

EXE = shutil.which("healthflow") or str(Path(sys.executable).with_name("healthflow"))
TOPIC, GROUP, PARTITIONS, EVENTS = "healthflow.raw", "healthflow-normalize", 3, 300


def produce(bootstrap: str, values: list[bytes]) -> list[bytes]:
    """Publish with an idempotent producer (acks=all, as healthflow's); the values the broker acknowledged."""
    acked: list[bytes] = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for index, value in enumerate(values):
        producer.produce(TOPIC, value, key=str(index % 17),
                         on_delivery=lambda error, message: acked.append(message.value()) if error is None else None)
    assert producer.flush(30) == 0
    return acked


def consumer(bootstrap: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP, "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "enable.partition.eof": True})


def committed(bootstrap: str) -> dict[int, int]:
    reader = consumer(bootstrap)
    try:
        offsets = reader.committed([TopicPartition(TOPIC, p) for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        reader.close()


def read_from(bootstrap: str, offsets: dict[int, int], limit: int | None = None, commit: bool = False) -> list[bytes]:
    """Read each partition from ``offsets`` (a negative one: the start) to its end, or ``limit`` messages in all;
    with ``commit``, commit the position reached."""
    reader = consumer(bootstrap)
    position = {p: max(offsets.get(p, 0), 0) for p in range(PARTITIONS)}
    reader.assign([TopicPartition(TOPIC, p, o) for p, o in position.items()])
    values: list[bytes] = []
    ended: set[int] = set()
    deadline = time.monotonic() + 30
    while len(ended) < PARTITIONS and (limit is None or len(values) < limit):
        assert time.monotonic() < deadline, f"read {len(values)}, positions {position}"
        message = reader.poll(0.5)
        if message is None:
            continue
        if message.error():
            assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
            ended.add(message.partition())
            continue
        values.append(message.value())
        position[message.partition()] = message.offset() + 1
    if commit:
        reader.commit(offsets=[TopicPartition(TOPIC, p, o) for p, o in position.items()], asynchronous=False)
    reader.close()
    return values


def test_a_broker_with_storage_keeps_acked_events_and_committed_offsets_across_restarts(tmp_path):
    storage = tmp_path / "broker"
    values = [f"event-{i}".encode() for i in range(EVENTS)]
    broker = EmbeddedBroker(storage=storage).start()
    try:
        broker.create_topic(TOPIC, PARTITIONS)
        acked = produce(broker.bootstrap, values)
        assert sorted(acked) == sorted(values)
        first = read_from(broker.bootstrap, {}, limit=100, commit=True)
        before = committed(broker.bootstrap)
        assert sum(before.values()) == len(first) == 100
        broker.process.send_signal(signal.SIGKILL)  # the broker dies; what it acknowledged is already stored
        broker.process.wait(10)
    finally:
        broker.stop()

    with EmbeddedBroker(storage=storage) as again:
        assert committed(again.bootstrap) == before
        rest = read_from(again.bootstrap, before)
        assert len(rest) == EVENTS - 100 and sorted(first + rest) == sorted(values)  # none lost, none twice
        assert sorted(produce(again.bootstrap, [b"after-restart"])) == [b"after-restart"]
        again.create_topic(TOPIC, PARTITIONS, exist_ok=True)
    with EmbeddedBroker(storage=storage) as third:  # a restart after a clean stop, with the recording compacted
        assert sorted(read_from(third.bootstrap, {})) == sorted([*values, b"after-restart"])


def test_a_broker_in_memory_says_it_loses_everything_and_does(caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.embedded"), EmbeddedBroker() as broker:
        broker.create_topic(TOPIC, PARTITIONS)
        assert produce(broker.bootstrap, [b"one"]) == [b"one"]
        port = broker.port
    assert "stores in memory: topics, messages and committed offsets are lost when it stops" in caplog.text
    with EmbeddedBroker(port) as again:
        from confluent_kafka.admin import AdminClient

        assert TOPIC not in AdminClient({"bootstrap.servers": again.bootstrap}).list_topics(timeout=10).topics


def test_healthflow_broker_command_keeps_its_data_in_the_storage_folder(tmp_path):
    port = free_port()
    command = [EXE, "broker", "--port", str(port), "--storage", str(tmp_path / "kept"), "--topic", TOPIC,
               "--partitions", str(PARTITIONS)]
    env = {**os.environ, "HEALTHFLOW_LOG_LEVEL": ""}
    for round_ in range(2):
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        try:
            banner = process.stderr.readline()
            while "healthflow: broker at" not in banner:
                assert banner, "the broker command ended before it started"
                banner = process.stderr.readline()
            assert f"kept in {tmp_path / 'kept'}" in banner
            if round_ == 0:
                assert produce(f"127.0.0.1:{port}", [b"kept"]) == [b"kept"]
            else:
                assert read_from(f"127.0.0.1:{port}", {}) == [b"kept"]
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0


def test_the_broker_storage_is_its_owners_alone(tmp_path):
    """The recording holds every message (health data): 0600, in folders created 0700, before and after a restart."""
    storage = tmp_path / "new" / "broker"
    for _ in range(2):
        with EmbeddedBroker(storage=storage) as broker:
            broker.create_topic(TOPIC, PARTITIONS, exist_ok=True)
            assert produce(broker.bootstrap, [b"private"]) == [b"private"]
            recording = storage / "s3-requests.jsonl"
            assert recording.stat().st_size and stat.S_IMODE(recording.stat().st_mode) == 0o600
        assert stat.S_IMODE(recording.stat().st_mode) == 0o600
    assert stat.S_IMODE(storage.stat().st_mode) == stat.S_IMODE(storage.parent.stat().st_mode) == 0o700


def _children() -> set[int]:
    """This process's child processes still running (not zombies)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(status.parent.name))
    return found


def test_a_port_another_process_listens_on_is_refused_and_nothing_is_left_running(tmp_path):
    """A connection to a port someone else holds does not reach this broker: start() says so, naming the port, and
    leaves no broker or storage server running."""
    import socket

    import pytest

    from core.errors import FatalError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = _children()
        with pytest.raises(FatalError, match=f"port {port}"):
            EmbeddedBroker(port=port, storage=tmp_path / "broker").start()
        time.sleep(0.5)
        assert _children() - before == set()
