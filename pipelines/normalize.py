"""The normalize pipeline: raw events → normalized Terra-shaped events → every destination.

Graph: source → Normalize (decode, parse, map, validate, merge per user; dead letters out of
every stage) → DeliverAll (one branch per destination, each with its own retries and dead
letters) → dead-letter store → Acknowledge (a source message is acknowledged, or its Kafka offset
committed, only once every destination delivered or dead-lettered everything it became).

- Batch (``run_batch``): files, a Kafka topic up to its end, or messages in hand. Runs to
  completion; the run summary is read from the data the run wrote, not from runner metrics.
- Streaming (``run_streaming``): one long-running job over an ingestion topic (Kafka or a Pub/Sub
  subscription): per-user merge in keyed state, per-destination delivery with timer retries.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from core.errors import FatalError
from core.raw import RawMessage
from core.secrets import held_in, hold_url_password
from pipelines.launch import is_dry_run, is_local, make_pipeline
from sinks.base import Sink
from sinks.policy import RetryPolicy, Target
from transforms import reuse
from transforms.acks import Acknowledge, Acknowledger
from transforms.deliver import DeliverAll, checked_shards
from transforms.normalize import Normalize
from transforms.outputs import StoreDeadLetters
from transforms.sources import KafkaOffsets, ReadKafkaBatch, ReadRawFiles, committed_offsets
from transforms.streams import KafkaStream, PubSubStream, ReadStream, StreamSource

log = logging.getLogger(__name__)

DEFAULT_STATE_URL = "sqlite:///.healthflow/state.db"
SUMMARIES = "_runs"  # under the dead-letter root: run summaries, never read as dead letters


@dataclass
class KafkaSource:
    bootstrap: str
    topic: str = "healthflow.raw"
    group: str = "healthflow-normalize"
    limit_per_partition: int | None = None


@dataclass
class PubSubSource:
    """A subscription of an ingestion topic: ``projects/P/subscriptions/S`` (streaming only)."""

    subscription: str


@dataclass
class FileSource:
    pattern: str


@dataclass
class MessagesSource:
    """Raw messages already in hand (dead-letter replay, tests)."""

    messages: list[RawMessage]


Source = KafkaSource | PubSubSource | FileSource | MessagesSource


@dataclass
class NormalizeJob:
    """What to read, where to deliver (sinks with default settings, or fully configured Targets)."""

    source: Source
    sinks: Sequence[Sink | Target]
    dead_letter_root: str
    state_url: str = DEFAULT_STATE_URL
    batch_size: int = 200
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    delivery_shards: int | None = None  # streaming: keys of in-order delivery (``transforms.deliver.DeliverAll``)

    def __post_init__(self) -> None:
        if not self.sinks:
            raise FatalError("no destinations configured: give at least one (webhook, SQL, object store, ...)")
        self.state_url = hold_url_password(self.state_url, "--state")  # a literal password is never pickled
        checked_shards(self.delivery_shards)

    @property
    def targets(self) -> list[Target]:
        return [s if isinstance(s, Target) else Target(s, self.retry, self.batch_size) for s in self.sinks]

    def stream(self) -> StreamSource:
        if isinstance(self.source, KafkaSource):
            return KafkaStream(self.source.bootstrap, self.source.topic, self.source.group)
        if isinstance(self.source, PubSubSource):
            return PubSubStream(self.source.subscription)
        raise FatalError("streaming reads an ingestion topic: give --bootstrap-servers (Kafka) or "
                         "--subscription projects/P/subscriptions/S (Pub/Sub)")


@dataclass
class RunSummary:
    """Counts of one batch run, summed from what every stage of the run reported as data."""

    counters: dict[str, int]
    seconds: float
    committed_offsets: dict[int, int] = field(default_factory=dict)
    dry_run: bool = False  # translated and not submitted (``--dry_run``): nothing ran

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    def with_prefix(self, prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in sorted(self.counters.items()) if k.startswith(prefix)}


def check_portable(job: NormalizeJob, options: PipelineOptions) -> None:
    """Refuse, at start, what only works when every worker is this process (with what to use instead)."""
    if is_local(options):
        return
    problems = []
    if job.state_url.startswith("sqlite:"):
        problems.append(f"--state {job.state_url} is a file on one machine: give postgresql://USER@HOST:PORT/DB, "
                        "which every worker shares")
    if "://" not in job.dead_letter_root:
        problems.append(f"--dead-letters {job.dead_letter_root} is a local folder: give gs://BUCKET/PATH or "
                        "s3://BUCKET/PATH, which every worker shares")
    if isinstance(job.source, MessagesSource):
        problems.append("messages in hand exist only in this process: publish them or write them to files")
    for target in job.targets:
        reason = target.sink.local_only()
        if reason:
            problems.append(f"destination {target.name}: {reason}")
    held = held_in(job.state_url, *(value for target in job.targets for value in vars(target.sink).values()))
    if held:
        problems.append(f"secrets written literally ({', '.join(held)}) are only in this process's environment: "
                        "write them as ${VAR} and set VAR on the workers")
    runner = str(options.view_as(StandardOptions).runner or "")
    if isinstance(job.source, PubSubSource) and "Dataflow" not in runner:
        problems.append(f"{runner} cannot read Pub/Sub from Python (Beam's ReadFromPubSub is native to Dataflow): "
                        "read the ingestion topic from Kafka there, or run on Dataflow")
    if problems:
        raise FatalError("this runner runs on other machines; " + "; ".join(problems))


def build(pipeline: beam.Pipeline, job: NormalizeJob, streaming: bool = False,
          summary_path: str | None = None) -> None:
    """Add the normalize graph for ``job`` to ``pipeline`` (no I/O here: sources are planned at run time)."""
    acknowledger: Acknowledger | None = None
    if streaming:
        stream = job.stream()
        raw = pipeline | "ReadStream" >> ReadStream(stream)
        acknowledger = stream.acknowledger()
    elif isinstance(job.source, KafkaSource):
        src = job.source
        raw = pipeline | "ReadKafka" >> ReadKafkaBatch(src.bootstrap, src.topic, src.group, src.limit_per_partition)
        acknowledger = KafkaOffsets(src.bootstrap, src.topic, src.group)
    elif isinstance(job.source, FileSource):
        raw = pipeline | "ReadFiles" >> ReadRawFiles(job.source.pattern)
    elif isinstance(job.source, MessagesSource):
        raw = pipeline | "Messages" >> beam.Create(job.source.messages)
    else:
        raise FatalError("a Pub/Sub subscription is read by a streaming job: add --streaming")
    build_from(raw, job, streaming, acknowledger, summary_path)


def build_from(raw: beam.PCollection, job: NormalizeJob, streaming: bool = False,
               acknowledger: Acknowledger | None = None, summary_path: str | None = None) -> None:
    """The graph after the read: normalize ``raw`` (PCollection[RawMessage]), deliver, store dead letters,
    acknowledge with ``acknowledger``; with ``summary_path`` (bounded input), write the run's counts there."""
    events, ingest_dead, ingest_ended, ingest_tallies = raw | "Normalize" >> Normalize(job.state_url)
    _, delivery_dead, delivery_ended, delivery_tallies = (
        events | "Deliver" >> DeliverAll(job.targets, status_url=job.state_url, shards=job.delivery_shards))
    stored = ((ingest_dead, *delivery_dead)
              | "AllDeadLetters" >> beam.Flatten()
              | "StoreDeadLetters" >> beam.ParDo(StoreDeadLetters(job.dead_letter_root)))
    ended = (ingest_ended, *delivery_ended, stored) | "AllEnded" >> beam.Flatten()
    if acknowledger is not None:
        _ = ended | "Acknowledge" >> Acknowledge(acknowledger)
    if summary_path is not None:
        _ = ((ingest_tallies, *delivery_tallies)
             | "AllTallies" >> beam.Flatten()
             | "Sum" >> beam.CombinePerKey(sum)
             | "Summary" >> beam.combiners.ToDict()
             | "WriteSummary" >> beam.Map(_write_summary, summary_path))


def _write_summary(counts: dict[str, int], path: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(counts, sort_keys=True).encode())


def _summary_path(job: NormalizeJob, options: PipelineOptions) -> tuple[str, Callable[[], None]]:
    if is_local(options):
        folder = tempfile.mkdtemp(prefix="healthflow-run-")
        return str(Path(folder) / "summary.json"), lambda: _remove_local(folder)
    path = f"{job.dead_letter_root.rstrip('/')}/{SUMMARIES}/{uuid.uuid4().hex}.json"
    return path, lambda: FileSystems.delete([path])


def _remove_local(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def run_batch(job: NormalizeJob, beam_args: Sequence[str] = ()) -> RunSummary:
    """Run one batch to completion and return what it did.

    Kafka offsets are committed as messages end (every destination delivered or dead-lettered
    them); a run that fails part-way commits only what had ended, so nothing is skipped.
    """
    started = time.perf_counter()
    pipeline = make_pipeline(beam_args)
    check_portable(job, pipeline.options)
    summary_path, cleanup = _summary_path(job, pipeline.options)
    build(pipeline, job, summary_path=summary_path)
    if is_dry_run(pipeline.options):  # translated, not submitted: nothing ran, nothing to read
        pipeline.run()
        return RunSummary({}, time.perf_counter() - started, dry_run=True)
    try:
        pipeline.run().wait_until_finish()
        counters = _read_summary(summary_path)
    finally:
        cleanup()
        reuse.close_all()
    summary = RunSummary(counters, time.perf_counter() - started)
    if isinstance(job.source, KafkaSource):
        summary.committed_offsets = committed_offsets(job.source.bootstrap, job.source.topic, job.source.group)
    return summary


def _read_summary(path: str) -> dict[str, int]:
    try:
        with FileSystems.open(path) as handle:
            return {k: int(v) for k, v in json.loads(handle.read()).items()}
    except (OSError, ValueError) as exc:
        if FileSystems.exists(path):
            raise
        log.debug("no summary at %s (%s): the run handled nothing", path, exc)
        return {}
