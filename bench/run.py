"""``make bench``: throughput figures measured in one run on the same simulated data.

Prints events/s for the bare mapper loop (decode → map → validate → merge, no Beam), the normalize
pipeline on Beam's local runner (files → SQLite; Kafka → webhook + SQLite + S3 layout), and each
destination's own write path; ratios are taken within this run, so machine noise largely cancels.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.latency import measure
from bench.processes import pubsub_server
from connectors.publish import publish
from core.events import NormalizedEvent
from core.raw import RawMessage
from pipelines import quiet_beam
from pipelines.demo_data import Simulator
from pipelines.embedded import EmbeddedBroker, moto_server
from pipelines.normalize import FileSource, KafkaSource, NormalizeJob, run_batch
from pipelines.webhook_receiver import WebhookReceiver
from schemas.serde import encode_raw
from sinks.kafka import KafkaSink
from sinks.object_store import ObjectStoreSink
from sinks.pubsub import PubSubSink
from sinks.s3 import S3Sink
from sinks.sql import SqlSink
from sinks.sqs import SqsSink
from sinks.webhook import WebhookSink
from transforms.normalize import normalize_in_memory


def mapper_loop(payloads) -> tuple[float, list[NormalizedEvent]]:
    """Seconds to decode, map, validate and merge every payload with no Beam and no I/O, and the events."""
    started = time.perf_counter()
    events, _ = normalize_in_memory(RawMessage(encode_raw(payload), {"partition": 0, "offset": offset})
                                    for offset, payload in enumerate(payloads))
    return time.perf_counter() - started, events


def json_floor(payloads) -> float:
    """Seconds to json-parse and json-dump every payload: the least any normalizer must spend, for scale."""
    started = time.perf_counter()
    for payload in payloads:
        with contextlib.suppress(ValueError):  # the simulator's malformed payloads cost a failed parse
            json.dumps(json.loads(payload.payload))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--days", type=int, default=4)
    args = parser.parse_args()
    quiet_beam()
    console = Console(width=150)
    payloads = list(Simulator(args.users, args.days).payloads())
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    rows: list[tuple[str, int, float, str]] = []

    seconds, delivered = mapper_loop(payloads)
    base_rate = len(payloads) / seconds
    floor = json_floor(payloads)
    rows.append(("floor: json parse + dump of each payload", len(payloads), floor,
                 f"{floor / seconds:.2f}x (the mapper loop is {seconds / floor:.0f}x this)"))
    rows.append(("bare mapper loop (no Beam, no I/O)", len(payloads), seconds, "1.00x"))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = [json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                             "received_at": p.received_at_ms, "payload": p.payload.decode(errors="replace")})
                 for p in payloads]
        (work / "raw.jsonl").write_text("\n".join(lines) + "\n")
        summary = run_batch(NormalizeJob(FileSource(str(work / "raw.jsonl")),
                                         [SqlSink("sqlite", f"sqlite:///{work / 'files.db'}")], str(work / "dlq1"),
                                         state_url=f"sqlite:///{work / 'state1.db'}"))
        rows.append(("pipeline: files → SQLite", summary.get("raw_in"), summary.seconds,
                     f"{base_rate / (summary.get('raw_in') / summary.seconds):.2f}x"))

        with EmbeddedBroker() as broker, WebhookReceiver(secret) as receiver:
            broker.create_topic("bench", partitions=4)
            publish(broker.bootstrap, "bench", payloads)
            sinks = [WebhookSink("webhook", receiver.url, secret), SqlSink("sqlite", f"sqlite:///{work / 'k.db'}"),
                     ObjectStoreSink("s3_layout", str(work / "objects"))]
            summary = run_batch(NormalizeJob(KafkaSource(broker.bootstrap, "bench"), sinks, str(work / "dlq2"),
                                             state_url=f"sqlite:///{work / 'state2.db'}"))
            rows.append(("pipeline: Kafka → webhook + SQLite + S3 layout", summary.get("raw_in"), summary.seconds,
                         f"{base_rate / (summary.get('raw_in') / summary.seconds):.2f}x"))

            with moto_server() as aws, pubsub_server("projects/bench/topics/events") as pubsub_host:
                bucket, queue_url = _aws_resources(aws)
                broker.create_topic("bench.normalized", partitions=4)
                for sink in (WebhookSink("webhook", receiver.url, secret),
                             SqlSink("sqlite", f"sqlite:///{work / 'direct.db'}"),
                             SqlSink("postgres", "postgresql://postgres@127.0.0.1:5432/test", table_prefix="hf_bench_"),
                             SqlSink("mariadb", "mysql://root@127.0.0.1:3306/test", table_prefix="hf_bench_"),
                             ObjectStoreSink("object_store", str(work / "direct-objects")),
                             KafkaSink("kafka", broker.bootstrap, "bench.normalized"),
                             PubSubSink("pubsub", "bench", "events", emulator_host=pubsub_host)):
                    rows.append(_measure_sink(console, sink, delivered))
                # moto's Python server is far slower than S3/SQS: these rows measure the emulator, on fewer events
                for sink in (S3Sink("s3 (moto)", bucket, endpoint_url=aws, formats=("json", "parquet")),
                             SqsSink("sqs (moto)", queue_url, endpoint_url=aws)):
                    rows.append(_measure_sink(console, sink, delivered[:MOTO_EVENTS]))

    table = Table(title=f"healthflow bench — {args.users} users × {args.days} days, {len(payloads):,} raw events, "
                        f"{len(delivered):,} normalized events")
    for col in ("what", "items", "seconds", "items/s", "time vs mapper loop / notes"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for what, items, secs, ratio in rows:
        if items:
            table.add_row(what, f"{items:,}", f"{secs:.2f}", f"{items / secs:,.0f}", ratio)
        else:
            table.add_row(what, "-", "-", "-", ratio)
    console.print(table)

    latency = Table(title=f"streaming: publish → webhook (receiver in its own process), one long-running job, "
                          f"{LATENCY_RATE:.0f} events/s for {LATENCY_SECONDS:.0f} s after {LATENCY_WARMUP:.0f} s "
                          "of warm-up")
    for col in ("ingestion topic", "events", "received", "p50 ms", "p99 ms", "max ms"):
        latency.add_column(col, justify="left" if col == "ingestion topic" else "right")
    for kind in ("pubsub", "kafka"):
        try:
            figures = measure(kind, secret, LATENCY_RATE, LATENCY_SECONDS, LATENCY_WARMUP)
            latency.add_row(kind, f"{figures.sent:,}", f"{figures.received:,}", f"{figures.p50_ms:.0f}",
                            f"{figures.p99_ms:.0f}", f"{figures.max_ms:.0f}")
        except Exception as exc:  # a bench reports what it could not measure, and goes on
            latency.add_row(kind, "-", "-", "-", "-", f"not measured: {exc}"[:60])
    console.print(latency)


LATENCY_RATE, LATENCY_SECONDS, LATENCY_WARMUP = 50.0, 20.0, 3.0


MOTO_EVENTS = 400
ROOT = Path(__file__).resolve().parent.parent  # the repository: tests/ is not installed


def _measure_sink(console: Console, sink, events) -> tuple[str, int, float, str]:
    """Events/s of one destination's own write path (batches of 200, as the pipeline sends them)."""
    try:
        sink.open()
        started = time.perf_counter()
        failures = 0
        for start in range(0, len(events), 200):
            failures += len(sink.write(events[start:start + 200]).failures)
        elapsed = time.perf_counter() - started
    except Exception as exc:  # a bench reports what it could not measure, and goes on
        return (f"destination {sink.name}", 0, 0.0, f"not measured: {exc}"[:60])
    finally:
        sink.close()
    return (f"destination {sink.name} (write path)", len(events), elapsed, f"{failures} failed" if failures else "")


def _aws_resources(endpoint: str) -> tuple[str, str]:
    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    queue = boto3.client("sqs", endpoint_url=endpoint).create_queue(QueueName="bench.fifo",
                                                                      Attributes={"FifoQueue": "true"})
    return "bench", queue["QueueUrl"]


if __name__ == "__main__":
    main()
