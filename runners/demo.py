"""``healthflow demo``: the whole path on this machine, with embedded components only.

Simulated Garmin/Oura/WHOOP payloads → embedded Kafka-protocol broker (Tansu) → the normalize
pipeline on Beam's local runner → a signature-verifying webhook receiver, a SQLite database and a
local folder laid out like the S3 destination. Ends with a table that accounts for every event.
"""

from __future__ import annotations

import base64
import collections
import os
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from connectors.publish import publish
from core.dead_letters import read_dead_letters
from pipelines.demo_data import Simulator, garmin_daily
from pipelines.embedded import EmbeddedBroker
from pipelines.normalize import KafkaSource, NormalizeJob, RunSummary, run_batch
from pipelines.webhook_receiver import WebhookReceiver
from sinks.config import load_destinations

TOPIC = "healthflow.raw"
NORMALIZED_TOPIC = "healthflow.normalized"
DESTINATIONS_FILE = Path(__file__).with_name("demo_destinations.yaml")


def run_demo(users: int = 300, days: int = 4, workdir: Path = Path("demo-output")) -> int:
    console = Console(width=None if sys.stdout.isatty() else 120)
    workdir.mkdir(parents=True, exist_ok=True)
    db_path, objects, dead_root = workdir / "healthflow.db", workdir / "objects", workdir / "dead-letters"
    rows_before = _sql_rows(db_path)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    console.rule("[bold]healthflow demo")
    console.print(f"{users} simulated users × {days} days (Garmin, Oura, WHOOP) → embedded broker → Beam → "
                  f"the destinations in [cyan]{DESTINATIONS_FILE.name}[/]; output under [cyan]{workdir}/[/]")

    with EmbeddedBroker() as broker, WebhookReceiver(secret) as receiver:
        broker.create_topic(TOPIC, partitions=4)
        broker.create_topic(NORMALIZED_TOPIC, partitions=4)
        payloads = list(Simulator(users, days).payloads())
        with _progress(console) as progress:
            task = progress.add_task("publishing raw events", total=len(payloads) + 1)
            published = publish(broker.bootstrap, TOPIC, _ticking(payloads, progress, task))
            published += publish(broker.bootstrap, TOPIC, [b"\x00not an avro raw event"])
            progress.advance(task)
        os.environ.update(HEALTHFLOW_DEMO_WEBHOOK_URL=receiver.url, HEALTHFLOW_DEMO_WEBHOOK_SECRET=secret,
                          HEALTHFLOW_DEMO_DIR=str(workdir.resolve()), HEALTHFLOW_DEMO_BOOTSTRAP=broker.bootstrap)
        targets = load_destinations(DESTINATIONS_FILE).targets()
        destinations = [t.name for t in targets]
        job = NormalizeJob(KafkaSource(broker.bootstrap, TOPIC), targets, str(dead_root),
                           state_url=f"sqlite:///{workdir / 'state.db'}")
        summary = _run_with_live_counts(console, job, receiver)
        again = run_batch(job)  # offsets were committed after delivery: nothing is read twice
        rows_after = _sql_rows(db_path)
        checks = [
            f"webhook: {receiver.unique:,} unique events received, both signatures verified (Terra and Standard "
            f"Webhooks), {receiver.duplicates} duplicates, {receiver.rejected_signature} rejected",
            f"sqlite: {rows_after:,} rows" + (f" (before this run: {rows_before:,}: a rerun adds none)"
                                             if rows_before is not None else ""),
            f"s3_layout: {sum(1 for _ in objects.rglob('*.json')):,} objects under {objects}",
            f"kafka: {_count_topic(broker.bootstrap, NORMALIZED_TOPIC):,} messages on {NORMALIZED_TOPIC} "
            "(key = user id)",
        ]
        _report(console, published, summary, again, checks, dead_root, destinations)
        console.print(_stream(console, job, broker.bootstrap, receiver))

    return 0 if _unexplained(summary, destinations) == 0 else 1


STREAMED_USERS = 40


def _stream(console: Console, job: NormalizeJob, bootstrap: str, receiver: WebhookReceiver) -> str:
    """The same job as one long-running streaming pipeline: new raw events one by one, each timed to the webhook."""
    from connectors.base import terra_user_id
    from core.kafka import new_producer, produce, producer_config
    from pipelines.streaming import run_streaming
    from schemas.serde import encode_raw

    console.print(f"[bold]streaming:[/] the same job as one long-running pipeline; once it runs, {STREAMED_USERS} new "
                  "raw events, published one by one, 50 ms apart")
    running = run_streaming(job, redeliver_every_s=None)
    sent: dict[str, float] = {}
    try:
        kafka = new_producer(producer_config(bootstrap, {"linger.ms": 0}))
        produce(kafka, TOPIC, encode_raw(garmin_daily("streamed-warm-up")), key="garmin:streamed-warm-up")
        kafka.flush(10)
        warm_up = terra_user_id("garmin", "streamed-warm-up")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and warm_up not in receiver.arrivals:  # the job has started
            time.sleep(0.05)
        for index in range(STREAMED_USERS):
            user = f"streamed-{index}"
            sent[terra_user_id("garmin", user)] = time.time()
            produce(kafka, TOPIC, encode_raw(garmin_daily(user)), key=f"garmin:{user}")
            time.sleep(0.05)
        kafka.flush(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(user in receiver.arrivals for user in sent):
            time.sleep(0.1)
    finally:
        running.stop()
    arrivals = receiver.arrivals
    latencies = sorted((arrivals[user] - at) * 1000 for user, at in sent.items() if user in arrivals)
    if not latencies:
        return "streaming: nothing arrived at the webhook within 30 s"
    return (f"streaming: {len(latencies)}/{len(sent)} events at the webhook, publish → webhook p50 "
            f"{latencies[len(latencies) // 2]:.0f} ms, max {latencies[-1]:.0f} ms")


def _count_topic(bootstrap: str, topic: str) -> int:
    """Messages on ``topic``, read to the end of every partition."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "healthflow-demo-count",
                         "enable.partition.eof": True, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        count, ended = 0, set()
        deadline = time.monotonic() + 30
        while len(ended) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.2):
                if message.error() and message.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(message.partition())
                elif not message.error():
                    count += 1
        return count
    finally:
        consumer.close()


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _ticking(items, progress: Progress, task):
    for item in items:
        progress.advance(task)
        yield item


def _run_with_live_counts(console: Console, job: NormalizeJob, receiver: WebhookReceiver) -> RunSummary:
    result: dict[str, RunSummary] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result["summary"] = run_batch(job)
        except BaseException as exc:  # surfaced below, in the main thread
            errors.append(exc)

    worker = threading.Thread(target=target, name="pipeline")
    with _progress(console) as progress:
        task = progress.add_task("normalize + deliver (Beam, local runner)", total=None)
        worker.start()
        while worker.is_alive():
            progress.update(task, description=f"normalize + deliver (Beam, local runner) — "
                                              f"{receiver.unique} webhook events received")
            time.sleep(0.25)
        worker.join()
    if errors:
        raise errors[0]
    return result["summary"]


def _sql_rows(db_path: Path) -> int | None:
    if not db_path.exists():
        return None
    with sqlite3.connect(db_path) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM healthflow_records").fetchone()[0]
        except sqlite3.OperationalError:
            return None


def _unexplained(summary: RunSummary, destinations: list[str]) -> int:
    raw_outcomes = sum(summary.get(f"raw_{o}") for o in ("ok", "partial", "dead", "empty", "split"))
    events = sum(summary.with_prefix("normalized:").values())
    missing = abs(summary.get("raw_in") - raw_outcomes)
    missing += abs(summary.get("fragments") - summary.get("superseded") - events)
    for name in destinations:
        missing += abs(events - summary.get(f"delivered:{name}") - summary.get(f"delivery_dead_letter:{name}")
                       - summary.get(f"filtered:{name}"))
    return missing


def _report(console: Console, published: int, summary: RunSummary, again: RunSummary, checks: list[str],
            dead_root: Path, destinations: list[str]) -> None:
    raw_in, seconds = summary.get("raw_in"), summary.seconds
    events = summary.with_prefix("normalized:")
    total_events = sum(events.values())

    ingest = Table(title="ingest", show_header=True)
    ingest.add_column("raw events")
    ingest.add_column("count", justify="right")
    for label, value in [("published", published), ("read by the pipeline", raw_in),
                         ("fully normalized", summary.get("raw_ok")),
                         ("partly dead-lettered", summary.get("raw_partial")),
                         ("dead-lettered", summary.get("raw_dead")),
                         ("empty (no documents, or only ignored kinds)", summary.get("raw_empty")),
                         ("documents of kinds knowingly not mapped (ignored:<provider>:<kind>)",
                          sum(summary.with_prefix("ignored:").values())),
                         ("split among several users", summary.get("raw_split")),
                         ("read again by a second run (offsets committed)", again.get("raw_in"))]:
        ingest.add_row(label, f"{value:,}")
    console.print(ingest)

    normalized = Table(title="normalized events (one per record after merging updates and duplicates)")
    for col in ("provider", "model", "events"):
        normalized.add_column(col, justify="right" if col == "events" else "left")
    for key, value in sorted(events.items()):
        provider, model = key.split(":")
        normalized.add_row(provider, model, f"{value:,}")
    normalized.add_row("all", f"from {summary.get('fragments'):,} records; {summary.get('superseded'):,} superseded",
                       f"{total_events:,}", style="bold")
    console.print(normalized)

    delivered = Table(title="delivered per destination")
    for col in ("destination", "delivered", "filtered", "retried", "dead-lettered", "check"):
        delivered.add_column(col, justify="left" if col == "destination" else "right")
    for name in destinations:
        ok, dead = summary.get(f"delivered:{name}"), summary.get(f"delivery_dead_letter:{name}")
        skipped = summary.get(f"filtered:{name}")
        delivered.add_row(name, f"{ok:,}", f"{skipped:,}", f"{summary.get(f'retried:{name}'):,}", f"{dead:,}",
                          "ok" if ok + dead + skipped == total_events else "[red]MISMATCH")
    console.print(delivered)
    console.print("[bold]checked at the destinations:")
    for line in checks:
        console.print(f"  • {line}")

    reasons = collections.Counter(
        (d["stage"], d["error_class"], d["error_message"][:90]) for d in read_dead_letters(str(dead_root)))
    dead = Table(title=f"dead letters (stored under {dead_root}/)")
    for col in ("stage", "error", "reason", "count"):
        dead.add_column(col, justify="right" if col == "count" else "left")
    for (stage, error, message), count in sorted(reasons.items()):
        dead.add_row(stage, error, message, str(count))
    console.print(dead)

    unexplained = _unexplained(summary, destinations)
    console.print(f"[bold]throughput[/]: {raw_in / seconds:,.0f} raw events/s, {total_events / seconds:,.0f} "
                  f"normalized events/s delivered to {len(destinations)} destinations ({seconds:.1f} s end to end, "
                  "Beam local runner)")
    console.print(f"[bold]unexplained losses: {unexplained}[/]" if unexplained == 0 else
                  f"[bold red]unexplained losses: {unexplained}[/]")
