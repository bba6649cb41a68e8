"""``make bench``: every throughput, latency and memory figure of the speed work, measured in one run on the same data.

On the simulated raw events (300 users × 4 days by default; ``--quick`` for fewer), in this order:

- the json parse + dump floor and the bare mapper loop (decode → map → validate → merge, no Beam, no I/O);
- the normalize pipeline on Beam's local runner: files → SQLite + object store (one worker, then two worker
  processes on the same single file, also as the ``healthflow run`` command end to end); the ingestion topic
  (Kafka) → webhook + SQLite + object store in batch; a streaming job consuming the whole pre-published topic (Kafka,
  then Pub/Sub) into the same destinations;
- each destination's own write path; streaming publish → webhook p50/p99 latency;
- peak RSS (the whole process tree) of files → SQLite + object store at 1x and 10x the input, each in a fresh
  process;
- every figure against its target, rates also normalized to the reference machine's json floor.

The in-process pipeline rows also show their user and kernel CPU seconds and what creating a new file cost just
before them: the local object store creates one per event, and on some file systems that cost varies tenfold between
runs (``_costs``).

Ratios are taken within this run, so machine noise largely cancels. The webhook receiver, the Pub/Sub test server,
the Kafka broker and moto run in processes of their own. All figures are written as JSON (``--json``) with the
commit, date and machine, and ``--compare OLD.json`` prints new/old for every figure both runs have.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import results
from bench.latency import measure
from bench.memory import peak_rss, raw_line
from bench.processes import pubsub_server, webhook_receiver
from bench.streaming import drain
from connectors.publish import publish
from core.events import NormalizedEvent
from core.logs import configure_logging
from core.raw import RawMessage, RawPayload
from pipelines.demo_data import Simulator
from pipelines.embedded import EmbeddedBroker, moto_server
from pipelines.normalize import FileSource, KafkaSource, NormalizeJob, run_batch
from schemas.serde import encode_raw
from sinks.kafka import KafkaSink
from sinks.object_store import ObjectStoreSink
from sinks.pubsub import PubSubSink
from sinks.s3 import S3Sink
from sinks.sql import SqlSink
from sinks.sqs import SqsSink
from sinks.webhook import WebhookSink
from transforms.normalize import normalize_in_memory

Doc = dict[str, Any]
ONE_WORKER = ["--direct_num_workers=1"]
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
FLOOR_REPEATS = 3
MEMORY_FACTOR = 10
COMPARE_NOISE = 0.10  # --compare marks a change better or worse beyond this (runs on a shared machine vary)


def mapper_loop(payloads: Sequence[RawPayload]) -> tuple[float, list[NormalizedEvent]]:
    """Seconds to decode, map, validate and merge every payload with no Beam and no I/O, and the events."""
    started = time.perf_counter()
    events, _ = normalize_in_memory(RawMessage(encode_raw(payload), {"partition": 0, "offset": offset})
                                    for offset, payload in enumerate(payloads))
    return time.perf_counter() - started, events


def json_floor(payloads: Sequence[RawPayload]) -> float:
    """Seconds to json-parse and json-dump every payload: the least any normalizer must spend, for scale."""
    started = time.perf_counter()
    for payload in payloads:
        with contextlib.suppress(ValueError):  # the simulator's malformed payloads cost a failed parse
            json.dumps(json.loads(payload.payload))
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=None, help="simulated users (default 300, --quick 40)")
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="fewer users, shorter latency runs, fewer moto events: to try the harness (not figures)")
    parser.add_argument("--json", default="bench-results.json", metavar="PATH",
                        help="write every figure here (default: bench-results.json in the working directory)")
    parser.add_argument("--compare", metavar="OLD.json", help="print new/old against an earlier run's JSON")
    args = parser.parse_args(argv)
    users = args.users or (QUICK_USERS if args.quick else 300)
    configure_logging()
    console = Console(width=150)
    doc = results.new_document(users, args.days, args.quick)
    payloads = list(Simulator(users, args.days).payloads())
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    plan = QUICK if args.quick else FULL

    delivered = _mappers(doc, payloads)
    doc["data"].update(raw_events=len(payloads), normalized_events=len(delivered))
    title = (f"{users} users × {args.days} days, {len(payloads):,} raw events, {len(delivered):,} normalized events"
             + (" (--quick: not for figures)" if args.quick else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "raw.jsonl").write_text("".join(raw_line(p) + "\n" for p in payloads))
        _files(doc, console, work)
        _cli_workers(doc, console, work)
        _floor(doc, payloads)
        if not args.quick:
            _files_4x(doc, console, work, users, args.days)
            _floor(doc, payloads)
        _topic_batch(doc, console, work, payloads, secret)
        for source in ("kafka", "pubsub"):
            _floor(doc, payloads)
            _streaming(doc, console, source, payloads, secret)
        _floor(doc, payloads)
        _destinations(doc, console, work, delivered, secret, plan["moto_events"])
    _latency(doc, console, secret, plan)
    _floor(doc, payloads)
    _memory(doc, console, users, args.days)
    _floor(doc, payloads)
    doc["machine"]["load_average_end"] = list(os.getloadavg())
    results.evaluate_targets(doc)
    _print_throughput(console, doc, title)
    _print_workers(console, doc)
    _print_latency(console, doc, plan)
    _print_memory(console, doc)
    _print_targets(console, doc)
    try:
        console.print(f"figures written to {results.write_json(doc, args.json).resolve()}")
    except OSError as exc:
        console.print(f"[yellow]figures not written: {exc}[/]")
    if args.compare:
        _print_compare(console, args.compare, doc)


QUICK_USERS = 40
FULL = {"moto_events": 400, "latency_rate": 50.0, "latency_seconds": 20.0, "latency_warmup": 3.0}
QUICK = {"moto_events": 100, "latency_rate": 50.0, "latency_seconds": 5.0, "latency_warmup": 2.0}


# --- measurements: each records its figure in ``doc``, or why it was not measured --------------------------------


def _attempt(doc: Doc, console: Console, key: str, label: str, measure_it: Callable[[], None]) -> None:
    """Run one measurement; a failure is recorded and printed as "not measured: reason" and the bench goes on."""
    console.print(f"[dim]{time.strftime('%H:%M:%S')} measuring {label}[/]")
    try:
        measure_it()
    except Exception as exc:  # a bench reports what it could not measure, and goes on
        reason = f"{type(exc).__name__}: {exc}".strip()
        results.add_missing(doc, key, label, reason)
        console.print(f"[yellow]{label}: not measured: {reason[:200]}[/]")


def _mappers(doc: Doc, payloads: Sequence[RawPayload]) -> list[NormalizedEvent]:
    seconds, delivered = mapper_loop(payloads)
    results.add_rate(doc, "mapper_loop", "bare mapper loop (no Beam, no I/O)", len(payloads), seconds,
                     vs_mapper_loop=1.0, normalized_events=len(delivered))
    for _ in range(FLOOR_REPEATS):
        _floor(doc, payloads)
    return delivered


def _floor(doc: Doc, payloads: Sequence[RawPayload]) -> None:
    """One more json floor sample; the figure is the median of every sample so far (taken between measurements,
    so the normalization follows the machine's load over the run)."""
    samples = [*doc["figures"].get("floor.json", {}).get("all_seconds", []), json_floor(payloads)]
    seconds = statistics.median(samples)
    doc["figures"]["floor.json"] = {
        "label": f"floor: json parse + dump of each payload (median of {len(samples)} across the run)",
        "items": len(payloads), "seconds": seconds, "rate": len(payloads) / seconds,
        "vs_mapper_loop": seconds / doc["figures"]["mapper_loop"]["seconds"], "all_seconds": samples}


def _vs_mapper(doc: Doc, figure: dict[str, Any]) -> None:
    """Time per raw event relative to the bare mapper loop (1.30 = 30 % slower than the loop)."""
    loop = results.rate(doc, "mapper_loop")
    if loop and figure.get("rate"):
        figure["vs_mapper_loop"] = loop / figure["rate"]


@contextlib.contextmanager
def _costs(work: Path, figure: dict[str, Any]) -> Iterator[None]:
    """Note in ``figure`` what a run in this process cost: its user and kernel CPU seconds (every thread of the bench
    process: the runner and its worker; the servers' processes are not counted), and what creating one new file in
    ``work`` cost just before it (``new_file_us``), which the object store pays once per new object.

    Creating a file is the kernel's CPU and varies between runs on the same machine (on an ext4 file system where
    many files were just deleted, 20 µs here became 200–700 µs for a few minutes); the kernel seconds show how much
    of a run's time it was."""
    figure["new_file_us"] = new_file_cost(work)
    before = resource.getrusage(resource.RUSAGE_SELF)
    yield
    after = resource.getrusage(resource.RUSAGE_SELF)
    figure["cpu_user_s"], figure["cpu_kernel_s"] = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


NEW_FILE_PROBES = 200


def new_file_cost(work: Path) -> float:
    """Microseconds to create a new 2 KB file (an object's size) in a fresh folder under ``work``; the probe files
    stay until ``work`` goes, as deleting them would slow what follows (see ``_costs``)."""
    folder = Path(tempfile.mkdtemp(prefix="new-files-", dir=work))
    body = b"x" * 2048
    started = time.perf_counter()
    for n in range(NEW_FILE_PROBES):
        (folder / f"{n}.json").write_bytes(body)
    return (time.perf_counter() - started) / NEW_FILE_PROBES * 1e6


def _files_job(work: Path, name: str, raw: str = "raw.jsonl") -> NormalizeJob:
    out = work / name
    out.mkdir()
    return NormalizeJob(FileSource(str(work / raw)),
                        [SqlSink("sqlite", f"sqlite:///{out / 'out.db'}"), ObjectStoreSink("object_store",
                                                                                            str(out / "objects"))],
                        str(out / "dlq"), state_url=f"sqlite:///{out / 'state.db'}")


def _files(doc: Doc, console: Console, work: Path) -> None:
    """files → SQLite + object store with one worker, then two worker processes (fresh output and state each)."""
    label = "pipeline: files → SQLite + objects"

    def one() -> None:
        job, costs = _files_job(work, "files1"), {}
        with _costs(work, costs):
            summary = run_batch(job, ONE_WORKER)
        _vs_mapper(doc, results.add_rate(doc, "pipeline.files", label, summary.get("raw_in"), summary.seconds,
                                         beam_args=ONE_WORKER, delivered=_delivered(summary.counters), **costs))

    def two() -> None:
        summary = run_batch(_files_job(work, "files2"), TWO_WORKERS)
        _vs_mapper(doc, results.add_rate(doc, "pipeline.files_two_workers", f"{label}, 2 worker processes",
                                         summary.get("raw_in"), summary.seconds, beam_args=TWO_WORKERS,
                                         delivered=_delivered(summary.counters)))

    _attempt(doc, console, "pipeline.files", label, one)
    _attempt(doc, console, "pipeline.files_two_workers", f"{label}, 2 worker processes", two)
    first, second = doc["figures"]["pipeline.files"], doc["figures"]["pipeline.files_two_workers"]
    if first.get("rate") and second.get("rate"):
        doc["figures"]["workers"] = {"label": "two workers vs one on one input file", "one_s": first["seconds"],
                                     "two_s": second["seconds"], "speedup": first["seconds"] / second["seconds"]}
    else:
        results.add_missing(doc, "workers", "two workers vs one on one input file", "a run was not measured")


CLI_DESTINATIONS = """destinations:
  - {name: sqlite, type: sqlite, url: "sqlite:///${HEALTHFLOW_BENCH_OUT}/out.db"}
  - {name: objects, type: object_store, root: "${HEALTHFLOW_BENCH_OUT}/objects"}
"""


def _cli_workers(doc: Doc, console: Console, work: Path) -> None:
    """Two workers vs one as a user runs them: the ``healthflow run`` command end to end on the 1x file, each in a
    fresh process with fresh output and state, its imports included (a multi-process run's warm parent imports while
    the command does: ``pipelines.warm_workers.prestart``)."""
    label = "two workers vs one, `healthflow run` end to end, 1x input"
    destinations = work / "cli-destinations.yaml"
    destinations.write_text(CLI_DESTINATIONS)

    def command(name: str, beam_args: Sequence[str]) -> float:
        out = work / name
        out.mkdir()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "runners.cli", "run", "normalize", "--input",
                               str(work / "raw.jsonl"), "--destinations", str(destinations), "--dead-letters",
                               str(out / "dlq"), "--state", f"sqlite:///{out / 'state.db'}", *beam_args],
                              env={**os.environ, "HEALTHFLOW_BENCH_OUT": str(out)}, cwd=results.ROOT,
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"healthflow run exited {done.returncode}: {done.stderr.strip()[-300:]}")
        return seconds

    def measure_it() -> None:
        one, two = command("cli1", ONE_WORKER), command("cli2", TWO_WORKERS)
        doc["figures"]["workers_cli"] = {"label": label, "one_s": one, "two_s": two, "speedup": one / two}

    _attempt(doc, console, "workers_cli", label, measure_it)


def _files_4x(doc: Doc, console: Console, work: Path, users: int, days: int) -> None:
    """Two workers vs one on one file of 4x the users: the two worker processes take ~2.5 s to start, which
    the 1x run cannot amortize."""
    label = "two workers vs one on one input file, 4x input"

    def measure_it() -> None:
        (work / "raw4x.jsonl").write_text("".join(raw_line(p) + "\n" for p in Simulator(users * 4, days).payloads()))
        one = run_batch(_files_job(work, "files4x1", "raw4x.jsonl"), ONE_WORKER)
        two = run_batch(_files_job(work, "files4x2", "raw4x.jsonl"), TWO_WORKERS)
        doc["figures"]["workers_4x"] = {"label": label, "one_s": one.seconds, "two_s": two.seconds,
                                        "raw_events": one.get("raw_in"), "speedup": one.seconds / two.seconds}

    _attempt(doc, console, "workers_4x", label, measure_it)


def _delivered(counters: dict[str, int]) -> dict[str, int]:
    """A run's raw, delivered and dead-lettered counts (its summary without the per-kind tallies)."""
    return {k: v for k, v in counters.items() if k.startswith(("delivered:", "dead_letter:", "raw_"))}


def _topic_batch(doc: Doc, console: Console, work: Path, payloads: Sequence[RawPayload], secret: str) -> None:
    label = "pipeline: Kafka → webhook + SQLite + objects, batch"

    def run() -> None:
        with EmbeddedBroker() as broker, webhook_receiver(secret) as url:
            broker.create_topic("bench", partitions=4)
            publish(broker.bootstrap, "bench", payloads)
            sinks = [WebhookSink("webhook", url, secret), SqlSink("sqlite", f"sqlite:///{work / 'k.db'}"),
                     ObjectStoreSink("object_store", str(work / "objects"))]
            job, costs = NormalizeJob(KafkaSource(broker.bootstrap, "bench"), sinks, str(work / "dlq2"),
                                      state_url=f"sqlite:///{work / 'state2.db'}"), {}
            with _costs(work, costs):
                summary = run_batch(job)
            _vs_mapper(doc, results.add_rate(doc, "pipeline.topic_batch", label, summary.get("raw_in"),
                                             summary.seconds, delivered=_delivered(summary.counters), **costs))

    _attempt(doc, console, "pipeline.topic_batch", label, run)


def _streaming(doc: Doc, console: Console, source: str, payloads: Sequence[RawPayload], secret: str) -> None:
    name = {"kafka": "Kafka", "pubsub": "Pub/Sub"}[source]
    key, label = f"pipeline.topic_stream_{source}", f"pipeline: {name} → webhook + SQLite + objects, streaming"

    def run() -> None:
        figures = drain(source, payloads, secret)
        ended_after, after_s = figures.ended - figures.first_ended, figures.total_s - figures.startup_s
        if ended_after <= 0 or after_s <= 0:  # all ended at once: only the rate with start-up is known
            ended_after, after_s = figures.ended, figures.total_s
        _vs_mapper(doc, results.add_rate(doc, key, label, ended_after, after_s, **figures.as_dict()))

    _attempt(doc, console, key, label, run)


def _destinations(doc: Doc, console: Console, work: Path, delivered: list[NormalizedEvent], secret: str,
                  moto_events: int) -> None:
    """Each destination's own write path on the normalized events (moto's on fewer: it measures the emulator)."""
    with contextlib.ExitStack() as stack:

        def server(start: Callable[[], Any]) -> Any:
            try:
                return stack.enter_context(start())
            except Exception as exc:  # its destinations are reported not measured
                return exc

        url = server(lambda: webhook_receiver(secret))
        broker = server(EmbeddedBroker)
        pubsub_host = server(lambda: pubsub_server("projects/bench/topics/events"))
        aws = server(moto_server)
        sinks: list[tuple[str, Callable[[], Any], Sequence[NormalizedEvent]]] = [
            ("webhook", lambda: WebhookSink("webhook", _up(url), secret), delivered),
            ("sqlite", lambda: SqlSink("sqlite", f"sqlite:///{work / 'direct.db'}"), delivered),
            ("postgres", lambda: SqlSink("postgres", "postgresql://postgres@127.0.0.1:5432/test",
                                         table_prefix="hf_bench_"), delivered),
            ("mariadb", lambda: SqlSink("mariadb", "mysql://root@127.0.0.1:3306/test", table_prefix="hf_bench_"),
             delivered),
            ("object_store", lambda: ObjectStoreSink("object_store", str(work / "direct-objects")), delivered),
            ("kafka", lambda: _kafka_sink(_up(broker)), delivered),
            ("pubsub", lambda: PubSubSink("pubsub", "bench", "events", emulator_host=_up(pubsub_host)), delivered),
            # moto's Python server is far slower than S3/SQS: these rows measure the emulator, on fewer events
            ("s3 (moto)", lambda: S3Sink("s3 (moto)", _aws_resources(_up(aws))[0], endpoint_url=aws,
                                         formats=("json", "parquet")), delivered[:moto_events]),
            ("sqs (moto)", lambda: SqsSink("sqs (moto)", _aws_resources(_up(aws))[1], endpoint_url=aws),
             delivered[:moto_events]),
        ]
        for name, make, events in sinks:
            key, label = f"destination.{name.split()[0]}", f"destination {name} (write path)"
            _attempt(doc, console, key, label,
                     lambda make=make, events=events, key=key, label=label: _measure_sink(doc, key, label, make(),
                                                                                         events))


def _up(server: Any) -> Any:
    """A server's address, or the reason it did not start."""
    if isinstance(server, Exception):
        raise RuntimeError(f"its server did not start: {server}")
    return server


def _kafka_sink(broker: EmbeddedBroker) -> KafkaSink:
    broker.create_topic("bench.normalized", partitions=4)
    return KafkaSink("kafka", broker.bootstrap, "bench.normalized")


def _measure_sink(doc: Doc, key: str, label: str, sink: Any, events: Sequence[NormalizedEvent]) -> None:
    """Events/s of one destination's own write path (batches of 200, as the pipeline sends them)."""
    try:
        sink.open()
        started = time.perf_counter()
        failures = 0
        for start in range(0, len(events), 200):
            failures += len(sink.write(events[start:start + 200]).failures)
        elapsed = time.perf_counter() - started
    finally:
        sink.close()
    results.add_rate(doc, key, label, len(events), elapsed, failed=failures)


_aws_ready: dict[str, tuple[str, str]] = {}


def _aws_resources(endpoint: str) -> tuple[str, str]:
    if endpoint not in _aws_ready:
        import boto3

        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        queue = boto3.client("sqs", endpoint_url=endpoint).create_queue(QueueName="bench.fifo",
                                                                          Attributes={"FifoQueue": "true"})
        _aws_ready[endpoint] = ("bench", queue["QueueUrl"])
    return _aws_ready[endpoint]


def _latency(doc: Doc, console: Console, secret: str, plan: dict[str, float]) -> None:
    rate, seconds, warmup = plan["latency_rate"], plan["latency_seconds"], plan["latency_warmup"]
    for kind in ("pubsub", "kafka"):
        label = f"streaming latency publish → webhook ({kind})"

        def run(kind: str = kind, label: str = label) -> None:
            figures = measure(kind, secret, rate, seconds, warmup)
            doc["figures"][f"latency.{kind}"] = {"label": label, "publish_rate": rate, "seconds": seconds,
                                                 "warmup_s": warmup, "sent": figures.sent,
                                                 "received": figures.received, "p50_ms": figures.p50_ms,
                                                 "p99_ms": figures.p99_ms, "max_ms": figures.max_ms}

        _attempt(doc, console, f"latency.{kind}", label, run)


def _print_latency(console: Console, doc: Doc, plan: dict[str, float]) -> None:
    rate, seconds, warmup = plan["latency_rate"], plan["latency_seconds"], plan["latency_warmup"]
    table = Table(title=f"streaming: publish → webhook (receiver in its own process), one long-running job, "
                        f"{rate:.0f} events/s for {seconds:.0f} s after {warmup:.0f} s of warm-up")
    for col in ("ingestion topic", "events", "received", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="left" if col == "ingestion topic" else "right")
    for kind in ("pubsub", "kafka"):
        figure = doc["figures"][f"latency.{kind}"]
        if "not_measured" in figure:
            table.add_row(kind, "-", "-", "-", "-", f"not measured: {figure['not_measured']}"[:60])
        else:
            table.add_row(kind, f"{figure['sent']:,}", f"{figure['received']:,}", f"{figure['p50_ms']:.0f}",
                          f"{figure['p99_ms']:.0f}", f"{figure['max_ms']:.0f}")
    console.print(table)


def _memory(doc: Doc, console: Console, users: int, days: int) -> None:
    """Peak RSS of files → SQLite + object store at 1x and 10x the users, each in a fresh process."""
    for factor in (1, MEMORY_FACTOR):
        key, label = f"memory.{factor}x", f"files → SQLite + object store, {factor}x input ({users * factor} users)"

        def run(factor: int = factor, key: str = key, label: str = label) -> None:
            figures = peak_rss(users * factor, days).as_dict()
            figures["delivered"] = _delivered(figures.pop("summary"))
            results.add_rate(doc, key, label, figures.pop("raw_events"), figures.pop("seconds"), **figures)

        _attempt(doc, console, key, label, run)
    one, ten = doc["figures"]["memory.1x"], doc["figures"][f"memory.{MEMORY_FACTOR}x"]
    if "peak_mb" in one and "peak_mb" in ten:
        doc["figures"]["memory"] = {"label": f"peak RSS at {MEMORY_FACTOR}x / at 1x", "ratio":
                                    ten["peak_mb"] / one["peak_mb"]}
    else:
        results.add_missing(doc, "memory", f"peak RSS at {MEMORY_FACTOR}x / at 1x", "a run was not measured")


def _print_memory(console: Console, doc: Doc) -> None:
    one, ten = doc["figures"]["memory.1x"], doc["figures"][f"memory.{MEMORY_FACTOR}x"]
    table = Table(title="peak RSS of files → SQLite + object store, each in a fresh process (the process and its "
                        "children, sampled every 50 ms)")
    for col in ("input", "raw events", "RSS before the run MB", "peak RSS MB", "peak − before MB", "pipeline s",
                "raw events/s"):
        table.add_column(col, justify="left" if col == "input" else "right")
    for figure in (one, ten):
        if "not_measured" in figure:
            table.add_row(figure["label"], "-", "-", "-", "-", "-", f"not measured: {figure['not_measured']}"[:60])
        else:
            table.add_row(figure["label"], f"{figure['items']:,}", f"{figure['start_mb']:.0f}",
                          f"{figure['peak_mb']:.0f}", f"{figure['peak_mb'] - figure['start_mb']:.0f}",
                          f"{figure['seconds']:.1f}", f"{figure['rate']:,.0f}")
    ratio = doc["figures"]["memory"].get("ratio")
    table.add_row(f"peak at {MEMORY_FACTOR}x / peak at 1x (target ≤ 1.5x)", "", "", "-" if ratio is None else
                  f"{ratio:.2f}x", "", "", "")
    console.print(table)


# --- output --------------------------------------------------------------------------------------------------------


def _print_throughput(console: Console, doc: Doc, title: str) -> None:
    table = Table(title=f"healthflow bench — {title}",
                  caption="webhook receiver, Kafka broker, Pub/Sub server and moto run in processes of their own; "
                          "streaming rows: raw messages ended after the first one was seen / the time since "
                          "(start-up excluded)")
    for col in ("what", "items", "seconds", "items/s", "time vs mapper loop / notes"):
        table.add_column(col, justify="left" if col == "what" else "right", no_wrap=col == "what")
    for key, figure in sorted(doc["figures"].items(), key=lambda item: item[0] != "floor.json"):
        if not key.startswith(("floor.", "mapper_loop", "pipeline.", "destination.")):
            continue
        if "not_measured" in figure:
            table.add_row(figure["label"], "-", "-", "-", f"not measured: {figure['not_measured']}"[:60])
            continue
        table.add_row(figure["label"], f"{figure['items']:,}", f"{figure['seconds']:.2f}", f"{figure['rate']:,.0f}",
                      _note(key, figure))
    console.print(table)


def _note(key: str, figure: dict[str, Any]) -> str:
    if key == "floor.json":
        return f"{figure['vs_mapper_loop']:.2f}x (the mapper loop is {1 / figure['vs_mapper_loop']:.0f}x this)"
    if key.startswith("destination."):
        return f"{figure['failed']} failed" if figure.get("failed") else ""
    note = f"{figure['vs_mapper_loop']:.2f}x" if "vs_mapper_loop" in figure else ""
    if "cpu_user_s" in figure:
        note += (f"; CPU {figure['cpu_user_s']:.1f} s user + {figure['cpu_kernel_s']:.1f} s kernel; a new file "
                 f"{figure['new_file_us']:,.0f} µs")
    if key.startswith("pipeline.topic_stream"):
        note += (f"; start-up: {figure['first_ended']:,} ended by {figure['startup_s']:.1f} s; "
                 f"{figure['rate_with_startup']:,.0f}/s with it")
    return note


def _print_workers(console: Console, doc: Doc) -> None:
    for key, what in (("workers", "1x input"), ("workers_4x", "4x input"),
                      ("workers_cli", "1x input, the `healthflow run` command end to end, imports included")):
        figure = doc["figures"].get(key)
        if figure is None:
            continue
        if "not_measured" in figure:
            console.print(f"two workers vs one ({what}): not measured: {figure['not_measured']}")
            continue
        console.print(f"two workers vs one (files → SQLite + object store, one input file, {what}, fresh output "
                      f"and state each): {figure['one_s']:.2f} s with {' '.join(ONE_WORKER)}, {figure['two_s']:.2f} s "
                      f"with {' '.join(TWO_WORKERS)}: speed-up {figure['speedup']:.2f}x (target ≥ 1.6x)")


def _print_targets(console: Console, doc: Doc) -> None:
    floor = results.floor_rate(doc)
    scale = f"× {results.FLOOR_REFERENCE:,.0f} / {floor:,.0f}" if floor else "(no floor measured)"
    table = Table(title=f"targets — absolute rates were set on a machine whose json floor was "
                        f"{results.FLOOR_REFERENCE:,.0f} payloads/s; rates here are normalized to it ({scale}). "
                        "Streaming rates exclude start-up.")
    for col in ("target", "measured", "normalized", "goal", ""):
        table.add_column(col, justify="left" if col == "target" else "right")
    for row in doc["targets"]:
        measured, norm = row["measured"], row["normalized"]
        fmt = (lambda v: f"{v:,.0f}/s") if row["kind"] == "rate" else (lambda v: f"{v:.2f}x")
        goal = f"{row['op']} {fmt(row['goal'])}"
        if measured is None:
            table.add_row(row["label"], "-", "-", goal, f"not measured: {row['not_measured'] or '?'}"[:40])
            continue
        verdict = "[green]met[/]" if row["met"] else "[red]not met[/]"
        table.add_row(row["label"], fmt(measured), "-" if norm is None else fmt(norm), goal, verdict)
    console.print(table)


def _print_compare(console: Console, path: str, doc: Doc) -> None:
    try:
        old = results.read_json(path)
    except (OSError, ValueError) as exc:
        console.print(f"--compare {path}: not read: {exc}")
        return
    table = Table(title=f"compared with {path} (commit {str(old.get('commit'))[:10]}, {old.get('date')}): new / old; "
                        "for rates also relative to each run's own json floor")
    for col in ("figure", "old", "new", "new / old", "floor-relative", ""):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for row in results.compare(old, doc):
        change = row["floor_ratio"] if row["floor_ratio"] is not None else row["ratio"]
        better = change > 1 if row["higher_is_better"] else change < 1
        mark = "" if abs(change - 1) < COMPARE_NOISE else ("[green]better[/]" if better else "[red]worse[/]")
        table.add_row(row["name"], f"{row['old']:,.2f}", f"{row['new']:,.2f}", f"{row['ratio']:.2f}",
                      "-" if row["floor_ratio"] is None else f"{row['floor_ratio']:.2f}", mark)
    console.print(table)


if __name__ == "__main__":
    main()
