"""The normalize pipeline: raw events → normalized Terra-shaped events → every destination.

Graph: source (Kafka offset range or files) → Normalize (decode, parse, map, validate, merge per
user; dead letters out of every stage) → DeliverAll (one branch per destination, each with its
own retries and dead letters) → dead-letter store.

Modes:
- batch: read what is there, deliver, then commit Kafka offsets (only after every sink accepted).
- streaming: the same graph as repeated micro-batches over new offsets (``run_stream``), so the
  commit-after-delivery guarantee holds on every runner without a JVM Kafka reader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import apache_beam as beam

from core.errors import FatalError
from core.raw import RawMessage
from pipelines.launch import make_pipeline
from sinks.base import Sink
from sinks.dead_letters import WriteDeadLetter
from sinks.policy import RetryPolicy, Target
from transforms.deliver import DeliverAll
from transforms.normalize import METRICS, Normalize
from transforms.sources import NEXT_OFFSET, ReadKafkaBatch, ReadRawFiles, commit_offsets

log = logging.getLogger(__name__)


@dataclass
class KafkaSource:
    bootstrap: str
    topic: str = "healthflow.raw"
    group: str = "healthflow-normalize"
    limit_per_partition: int | None = None


@dataclass
class FileSource:
    pattern: str


@dataclass
class MessagesSource:
    """Raw messages already in hand (dead-letter replay, tests)."""

    messages: list[RawMessage]


@dataclass
class NormalizeJob:
    """What to read, where to deliver (sinks with default settings, or fully configured Targets)."""

    source: KafkaSource | FileSource | MessagesSource
    sinks: Sequence[Sink | Target]
    dead_letter_root: str
    state_url: str = "sqlite:///.healthflow/state.db"
    batch_size: int = 200
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not self.sinks:
            raise FatalError("no destinations configured: give at least one (webhook, SQL, object store, ...)")

    @property
    def targets(self) -> list[Target]:
        return [s if isinstance(s, Target) else Target(s, self.retry, self.batch_size) for s in self.sinks]


@dataclass
class RunSummary:
    """Counters of one run (all from Beam metrics, so the same on every runner)."""

    counters: dict[str, int]
    seconds: float
    committed_offsets: dict[int, int] = field(default_factory=dict)

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    def with_prefix(self, prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in sorted(self.counters.items()) if k.startswith(prefix)}


def build(pipeline: beam.Pipeline, job: NormalizeJob) -> None:
    """Add the normalize graph for ``job`` to ``pipeline``."""
    if isinstance(job.source, KafkaSource):
        src = job.source
        raw = pipeline | "ReadKafka" >> ReadKafkaBatch(src.bootstrap, src.topic, src.group, src.limit_per_partition)
    elif isinstance(job.source, FileSource):
        raw = pipeline | "ReadFiles" >> ReadRawFiles(job.source.pattern)
    else:
        raw = pipeline | "Messages" >> beam.Create(job.source.messages)
    user_events, ingest_dead = raw | "Normalize" >> Normalize(job.state_url)
    _, delivery_dead = user_events | "Deliver" >> DeliverAll(job.targets, status_url=job.state_url)
    ((ingest_dead, *delivery_dead)
     | "AllDeadLetters" >> beam.Flatten()
     | "StoreDeadLetters" >> beam.ParDo(WriteDeadLetter(job.dead_letter_root)))


def run_batch(job: NormalizeJob, beam_args: Sequence[str] = ()) -> RunSummary:
    """Run one batch to completion; commit Kafka offsets only if every stage and sink succeeded."""
    started = time.perf_counter()
    pipeline = make_pipeline(beam_args)
    build(pipeline, job)
    result = pipeline.run()
    result.wait_until_finish()
    summary = RunSummary(_counters(result), time.perf_counter() - started)
    if isinstance(job.source, KafkaSource):
        prefix = f"{NEXT_OFFSET}:{job.source.topic}:"
        summary.committed_offsets = {int(k[len(prefix):]): v for k, v in _distribution_max(result).items()
                                     if k.startswith(prefix)}
        commit_offsets(job.source.bootstrap, job.source.topic, job.source.group, summary.committed_offsets)
    return summary


def run_stream(job: NormalizeJob, beam_args: Sequence[str] = (), poll_interval_s: float = 2.0,
               max_batches: int | None = None, on_batch: Callable[[RunSummary], None] | None = None) -> int:
    """Micro-batch streaming from Kafka: run batches over new offsets until ``max_batches``.

    After each batch, delivery dead letters whose scheduled redelivery is due are delivered again
    (each destination on its own schedule; disabled destinations are skipped).
    """
    from pipelines.replay import replay_deliveries

    if not isinstance(job.source, KafkaSource):
        raise FatalError("streaming mode reads the ingestion topic: give --bootstrap-servers")
    batches = 0
    while max_batches is None or batches < max_batches:
        summary = run_batch(job, beam_args)
        redelivered = replay_deliveries(job.dead_letter_root, job.targets, due_only=True, status_url=job.state_url)
        summary.counters.update({f"redelivered:{k}": v for k, v in redelivered.delivered.items()})
        batches += 1
        if on_batch:
            on_batch(summary)
        if summary.get("raw_in") == 0:
            time.sleep(poll_interval_s)
    return batches


def _counters(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(METRICS))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + int(value or 0)
    return out


def _distribution_max(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for dist in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(METRICS))["distributions"]:
        value = dist.committed if dist.committed is not None else dist.attempted
        if value is not None and value.count:
            out[dist.key.metric.name] = max(out.get(dist.key.metric.name, 0), int(value.max))
    return out
