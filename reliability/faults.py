"""The faults: each runs the real job against real components, injects one fault, recovers and balances the books.

Every fault gets a ``Context`` (the shared broker, the private PostgreSQL cluster, the simulated payloads and the
clean reference run's final record of each natural key) and returns ``Row``s, one per destination it checks. The
expected events of a destination are the final events of the clean run (one per natural key): a PostgreSQL
destination must end holding exactly those ids, a webhook must have received each of them (or dead-lettered it).
"""

from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from connectors.publish import publish
from core.raw import RawPayload
from pipelines.embedded import EmbeddedBroker
from pipelines.webhook_receiver import WebhookReceiver
from reliability.books import Row, balance
from reliability.mechanics import (
    JobPaths,
    Rows,
    create_database,
    delivery_dead_letters,
    destinations_file,
    kafka_source,
    kill,
    last_error,
    normalize_command,
    postgres_row_count,
    postgres_rows,
    reached,
    run_to_end,
    safe,
    start_job,
    webhook_entry,
    write_jsonl,
)
from reliability.outage import Outage
from tests.servers.postgres import PrivatePostgres

FAST_WEBHOOK_RETRY = ("{max_attempts: 2, initial_delay_s: 0.2, max_delay_s: 1, disable_after_s: 3600, "
                      "redelivery_schedule_s: [1, 1, 2, 2, 2, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]}")


@dataclass
class Settings:
    """Sizes and patience; ``quick()`` is the bounded form run by ``make test``."""

    users: int = 12
    days: int = 2
    webhook_down_s: float = 180.0
    on_time_s: float = 30.0  # while the webhook is down, PostgreSQL holds every record this soon after publish
    broker_down_s: float = 10.0
    database_down_s: float = 30.0
    recover_timeout_s: float = 240.0
    hostile_events: int = 5_000
    hostile_requests: int = 5_000
    batch_timeout_s: float = 300.0
    hostile_timeout_s: float = 300.0  # a hostile batch still running then is a hang
    request_timeout_s: float = 10.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(users=3, days=1, webhook_down_s=8.0, on_time_s=8.0, broker_down_s=3.0, database_down_s=5.0,
                   recover_timeout_s=45.0, hostile_events=300, hostile_requests=300, batch_timeout_s=60.0,
                   hostile_timeout_s=20.0, request_timeout_s=10.0)


@dataclass
class Context:
    """What every fault shares: components on loopback, the inputs and the clean run's books."""

    workdir: Path
    settings: Settings
    secret: str
    broker: EmbeddedBroker
    postgres: PrivatePostgres
    payloads: list[RawPayload]
    reference: Rows
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def expected_ids(self) -> set[str]:
        return {event_id for event_id, _ in self.reference.values()}

    def folder(self, name: str) -> Path:
        path = self.workdir / f"{next(self._counter):02d}-{name}"  # unique across threads (faults run side by side)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def topic(self, broker: EmbeddedBroker | None = None) -> str:
        name = f"raw.reliability.{uuid.uuid4().hex[:8]}"
        (broker or self.broker).create_topic(name, partitions=3)
        return name


@dataclass
class Setup:
    """One fault's destinations: a fresh PostgreSQL database and a webhook receiver, and the job's paths."""

    folder: Path
    database: str
    receiver: WebhookReceiver
    destinations: Path
    paths: JobPaths

    def postgres_complete(self, expected: Rows) -> bool:
        rows = safe(lambda: postgres_rows(self.database))
        return all(rows.get(key, ("",))[0] == event_id for key, (event_id, _) in expected.items())

    def webhook_complete(self, expected_ids: set[str]) -> bool:
        return expected_ids <= set(self.receiver.events)

    def books(self, ctx: Context, fault: str, injected: str) -> list[Row]:
        """Balance both destinations by event id (PostgreSQL: the id each natural key ends with)."""
        rows = safe(lambda: postgres_rows(self.database))
        at_postgres = {rows[key][0] for key in ctx.reference if key in rows}
        postgres = balance(fault, "postgres", injected, ctx.expected_ids, at_postgres,
                           delivery_dead_letters(self.paths.dead_letters, "pg"))
        try:
            count, distinct = postgres_row_count(self.database)
            postgres.duplicates = count - distinct
        except Exception as exc:
            postgres.note(f"could not count rows: {exc}")
        webhook = balance(fault, "webhook", injected, ctx.expected_ids, self.receiver.events,
                          delivery_dead_letters(self.paths.dead_letters, "hook"))
        if self.receiver.duplicates:
            webhook.note(f"{self.receiver.duplicates} redelivered (at least once)")
        return [postgres, webhook]


def setup(ctx: Context, name: str, receiver: WebhookReceiver, database: str | None = None, state: str | None = None,
          webhook_timeout_s: float = 5.0, webhook_retry: str = FAST_WEBHOOK_RETRY, webhook_url: str | None = None,
          ) -> Setup:
    folder = ctx.folder(name)
    database = database or create_database(ctx.postgres.url())
    destinations = destinations_file(folder / "destinations.yaml", f"{{name: pg, type: postgres, url: '{database}'}}",
                                     webhook_entry("hook", webhook_url or receiver.url, webhook_timeout_s,
                                                   webhook_retry))
    paths = JobPaths(state or f"sqlite:///{folder / 'state.db'}", folder / "dlq", folder / "job.log")
    return Setup(folder, database, receiver, destinations, paths)


def _crash(row: Row, job: subprocess.Popen[bytes] | None, log: Path) -> Row:
    """Mark ``row`` crashed when the long-running job ended on its own (with why); say so when it still runs but
    has not delivered everything."""
    if job is not None and job.poll() is not None:
        row.crashed = 1
        row.note(f"job exited {job.returncode}: {last_error(log)}")
    elif row.lost:
        row.note("job still running, not recovered in time")
    return row


def _finish(ctx: Context, s: Setup, job: subprocess.Popen[bytes] | None, since: float) -> float | None:
    """Wait until both destinations hold every expected event (or the job ended); seconds since ``since``."""
    def done() -> bool:
        return (job is not None and job.poll() is not None) or (
            s.postgres_complete(ctx.reference) and s.webhook_complete(ctx.expected_ids))

    reached(done, ctx.settings.recover_timeout_s)
    if s.postgres_complete(ctx.reference) and s.webhook_complete(ctx.expected_ids):
        return time.monotonic() - since
    return None


# -- 1. SIGKILL mid-run (batch) and mid-stream ---------------------------------------------------------------------
def kill_batch(ctx: Context) -> list[Row]:
    """A Kafka batch run killed while a delivery is in flight, then run again to the end."""
    topic = ctx.topic()
    with WebhookReceiver(ctx.secret) as receiver:
        s = setup(ctx, "kill-batch", receiver)
        publish(ctx.broker.bootstrap, topic, ctx.payloads)
        command = normalize_command(kafka_source(ctx.broker.bootstrap, topic, "killed-batch"), s.destinations,
                                    s.paths, streaming=False)
        receiver.stall_next(3, 3.0)  # deliveries in flight when the kill comes
        job = start_job(command, s.paths.log, ctx.secret)
        in_flight = reached(lambda: receiver.received > 0 or job.poll() is not None, ctx.settings.batch_timeout_s)
        killed_mid_run = job.poll() is None
        kill(job)
        restarted = time.monotonic()
        code, _ = run_to_end(command, s.paths.log, ctx.secret, ctx.settings.batch_timeout_s)
        recover = time.monotonic() - restarted
        rows = s.books(ctx, "SIGKILL mid-run (batch)", "kill -9 during delivery")
        for row in rows:
            row.recover_s = recover
            if not killed_mid_run or in_flight is None:
                row.note("the run ended before the kill")
            if code != 0:
                row.crashed = 1
                row.note(f"rerun exited {code}: {last_error(s.paths.log)}")
        return rows


def kill_stream(ctx: Context) -> list[Row]:
    """A Kafka streaming job killed with deliveries in flight, then restarted (mechanics of the fault tests)."""
    topic = ctx.topic()
    half = len(ctx.payloads) // 2
    with WebhookReceiver(ctx.secret) as receiver:
        s = setup(ctx, "kill-stream", receiver)
        command = normalize_command(kafka_source(ctx.broker.bootstrap, topic, "killed-stream"), s.destinations,
                                    s.paths, streaming=True)
        job = start_job(command, s.paths.log, ctx.secret)
        try:
            publish(ctx.broker.bootstrap, topic, ctx.payloads[:half])
            reached(lambda: receiver.unique > 0 or job.poll() is not None, ctx.settings.recover_timeout_s)
            receiver.stall_next(3, 3.0)
            publish(ctx.broker.bootstrap, topic, ctx.payloads[half:half + 5])
            reached(lambda: receiver.received > receiver.unique + receiver.duplicates or job.poll() is not None, 30)
            crashed_before = job.poll() is not None
            kill(job)
            publish(ctx.broker.bootstrap, topic, ctx.payloads[half + 5:])
            restarted = time.monotonic()
            job = start_job(command, s.paths.log, ctx.secret)
            recover = _finish(ctx, s, job, restarted)
            rows = s.books(ctx, "SIGKILL mid-stream", "kill -9 with deliveries in flight")
            for row in rows:
                row.recover_s = recover
                _crash(row, job, s.paths.log)
                if crashed_before:
                    row.crashed = 1
                    row.note("the job ended before the kill")
            return rows
        finally:
            kill(job)


# -- 2. a webhook destination down, then back ---------------------------------------------------------------------
def webhook_down(ctx: Context) -> list[Row]:
    """The webhook refuses connections for ``webhook_down_s``: PostgreSQL keeps its pace, the backlog drains after."""
    return _webhook_outage(ctx, slow=False)


def webhook_slow(ctx: Context) -> list[Row]:
    """The webhook answers every request in 1.5 s against a 1 s timeout for ``webhook_down_s`` (the probe's slow
    destination): PostgreSQL keeps its pace, the backlog drains once the webhook answers in time again."""
    return _webhook_outage(ctx, slow=True)


def _webhook_outage(ctx: Context, slow: bool) -> list[Row]:
    topic = ctx.topic()
    down_s = ctx.settings.webhook_down_s
    name = "webhook-slow" if slow else "webhook-down"
    with WebhookReceiver(ctx.secret) as receiver, Outage(receiver.port) as gate:
        s = setup(ctx, name, receiver, webhook_timeout_s=1.0 if slow else 2.0, webhook_url=f"{gate.url}/webhook",
                  webhook_retry=redelivery_covering(down_s))
        command = normalize_command(kafka_source(ctx.broker.bootstrap, topic, name), s.destinations,
                                    s.paths, streaming=True, redeliver_every_s=1.0)
        job = start_job(command, s.paths.log, ctx.secret)
        try:
            warm = len(ctx.payloads) // 4
            publish(ctx.broker.bootstrap, topic, ctx.payloads[:warm])
            reached(lambda: receiver.unique > 0 or job.poll() is not None, ctx.settings.recover_timeout_s)
            if slow:
                receiver.stall_next(1_000_000, 1.5)  # every request, until cleared
            else:
                gate.down()
            went_down = time.monotonic()
            publish(ctx.broker.bootstrap, topic, ctx.payloads[warm:])
            on_time_s = min(down_s, ctx.settings.on_time_s)
            postgres_lag = reached(lambda: s.postgres_complete(ctx.reference) or job.poll() is not None, on_time_s)
            if not s.postgres_complete(ctx.reference):
                postgres_lag = None
            missing_while_down = len(ctx.expected_ids - set(receiver.events))
            time.sleep(max(0.0, down_s - (time.monotonic() - went_down)))
            if slow:
                receiver.clear_failures()
            else:
                gate.up()
            back = time.monotonic()
            recover = _finish(ctx, s, job, back)
            fault = "webhook slow, then fast" if slow else "webhook down, then back"
            injected = (f"1.5 s answers vs 1 s timeout for {down_s:.0f} s" if slow
                        else f"connection refused for {down_s:.0f} s")
            postgres, webhook = s.books(ctx, fault, injected)
            webhook.recover_s = recover
            webhook.note(f"{missing_while_down} events waited for it")
            if recover is None:
                webhook.kept = False
                webhook.note(f"backlog not drained {ctx.settings.recover_timeout_s:.0f} s after it was back")
            postgres.recover_s = postgres_lag
            if postgres_lag is None:
                postgres.kept = False
                postgres.note(f"not complete {on_time_s:.0f} s after publish while the webhook was out: it waited")
            else:
                postgres.note(f"complete {postgres_lag:.1f} s after publish, webhook still out")
            return [_crash(postgres, job, s.paths.log), _crash(webhook, job, s.paths.log)]
        finally:
            kill(job)


def redelivery_covering(outage_s: float, rounds: int = 50) -> str:
    """A webhook retry policy whose scheduled redeliveries (every few seconds) outlast an outage of ``outage_s``."""
    step = max(1.0, round((outage_s + 60.0) / rounds, 1))
    return ("{max_attempts: 2, initial_delay_s: 0.2, max_delay_s: 1, disable_after_s: 3600, "
            f"redelivery_schedule_s: [{', '.join([str(step)] * rounds)}]}}")


# -- 3. 500s, 429 with Retry-After, timeouts and 410 from a webhook -------------------------------------------------
WEBHOOK_ANSWERS: dict[str, Callable[[WebhookReceiver], None]] = {
    "500 x6": lambda r: r.fail_next(6, 500),
    "429 Retry-After: 1 x6": lambda r: r.fail_next(6, 429, retry_after=1),
    "timeout (2.5 s > 1 s) x3": lambda r: r.stall_next(3, 2.5),
    "410 Gone": lambda r: r.fail_next(1, 410),
}


def webhook_errors(ctx: Context) -> list[Row]:
    """A batch over files to a webhook that answers badly, then replay of what was dead-lettered."""
    rows = []
    for injected, inject in WEBHOOK_ANSWERS.items():
        with WebhookReceiver(ctx.secret) as receiver:
            s = setup(ctx, "webhook-answers", receiver, webhook_timeout_s=1.0,
                      webhook_retry="{max_attempts: 4, initial_delay_s: 0.2, max_delay_s: 2}")
            raw = write_jsonl(s.folder / "raw.jsonl", ctx.payloads)
            inject(receiver)
            code, _ = run_to_end(normalize_command(["--input", str(raw)], s.destinations, s.paths, streaming=False),
                                 s.paths.log, ctx.secret, ctx.settings.batch_timeout_s)
            _, webhook = s.books(ctx, "webhook answers", injected)
            if code != 0:
                webhook.crashed = 1
                webhook.note(f"run exited {code}: {last_error(s.paths.log)}")
            store = ["--state", s.paths.state, "--dead-letters", str(s.paths.dead_letters)]
            started = time.monotonic()
            cli = [sys.executable, "-m", "runners.cli"]
            if injected.startswith("410"):  # the destination was disabled: an operator enables it, then replays
                run_to_end([*cli, "destinations", "enable", "hook", *store], s.paths.log, ctx.secret, 60)
            run_to_end([*cli, "deadletters", "replay", "--destinations", str(s.destinations), *store], s.paths.log,
                       ctx.secret, ctx.settings.batch_timeout_s)
            if s.webhook_complete(ctx.expected_ids):
                webhook.recover_s = time.monotonic() - started
                webhook.note("replay delivered the rest" if webhook.dead_lettered else "")
            else:
                webhook.note("replay did not deliver every dead letter")
            webhook.notes = [n for n in webhook.notes if n]
            rows.append(webhook)
    return rows


# -- 4. the broker restarted ----------------------------------------------------------------------------------------
def durable_broker_options(folder: Path) -> dict[str, object] | None:
    """``EmbeddedBroker`` keyword arguments for storage kept in ``folder`` when this checkout has that option
    (``storage=DIR``), else None (memory storage: what it held is gone after a restart)."""
    if "storage" in inspect.signature(EmbeddedBroker).parameters:
        return {"storage": folder}
    return None


def broker_restart(ctx: Context) -> list[Row]:
    """The job's broker stops for ``broker_down_s`` while events are being published, then comes back."""
    options = durable_broker_options(ctx.folder("broker-storage"))
    storage = "durable storage" if options is not None else "memory storage (no durable option in this checkout)"
    broker = EmbeddedBroker(**(options or {})).start()
    job = None
    try:
        topic = ctx.topic(broker)
        half = len(ctx.payloads) // 2
        with WebhookReceiver(ctx.secret) as receiver:
            s = setup(ctx, "broker-restart", receiver)
            command = normalize_command(kafka_source(broker.bootstrap, topic, "broker-restart"), s.destinations,
                                        s.paths, streaming=True)
            job = start_job(command, s.paths.log, ctx.secret)
            publish(broker.bootstrap, topic, ctx.payloads[:half])
            reached(lambda: receiver.unique > 0 or job.poll() is not None, ctx.settings.recover_timeout_s)
            broker.stop()
            published: list[object] = []
            sender = threading.Thread(target=_publish_into, args=(broker.bootstrap, topic, ctx.payloads[half:],
                                                                  published), daemon=True)
            sender.start()  # the producer must hold its events until the broker is back
            time.sleep(ctx.settings.broker_down_s)
            broker.start()
            back = time.monotonic()
            sender.join(ctx.settings.recover_timeout_s)
            gave_up = published[0] if published and isinstance(published[0], BaseException) else None
            if gave_up is not None:  # not acknowledged: the producer's caller sends again (at least once)
                publish(broker.bootstrap, topic, ctx.payloads[half:])
            recover = _finish(ctx, s, job, back)
            rows = s.books(ctx, "broker restarted", f"{ctx.settings.broker_down_s:.0f} s down, {storage}")
            for row in rows:
                row.recover_s = recover
                _crash(row, job, s.paths.log)
                if gave_up is not None:
                    row.note(f"publish while down gave up ({type(gave_up).__name__}: {gave_up}"[:160]
                             + "); sent again after the restart")
            return rows
    finally:
        kill(job)
        broker.stop()


def _publish_into(bootstrap: str, topic: str, payloads: Sequence[RawPayload], outcome: list[object]) -> None:
    try:
        outcome.append(publish(bootstrap, topic, payloads))
    except Exception as exc:  # reported in the row
        outcome.append(exc)


# -- 5. the database restarted -------------------------------------------------------------------------------------
def database_restart(ctx: Context) -> list[Row]:
    """A PostgreSQL cluster of its own (record state and destination) stops for ``database_down_s``, then restarts.

    Its own cluster, so the faults running beside it keep their database."""
    topic = ctx.topic()
    half = len(ctx.payloads) // 2
    with PrivatePostgres() as postgres, WebhookReceiver(ctx.secret) as receiver:
        database = create_database(postgres.url())
        s = setup(ctx, "database-restart", receiver, database=database, state=database)
        command = normalize_command(kafka_source(ctx.broker.bootstrap, topic, "database-restart"), s.destinations,
                                    s.paths, streaming=True, redeliver_every_s=1.0)
        job = start_job(command, s.paths.log, ctx.secret)
        try:
            publish(ctx.broker.bootstrap, topic, ctx.payloads[:half])
            reached(lambda: receiver.unique > 0 or job.poll() is not None, ctx.settings.recover_timeout_s)
            postgres.stop()
            try:
                publish(ctx.broker.bootstrap, topic, ctx.payloads[half:])
                time.sleep(ctx.settings.database_down_s)
            finally:
                postgres.start()
            back = time.monotonic()
            recover = _finish(ctx, s, job, back)
            rows = s.books(ctx, "database restarted", f"state + destination down {ctx.settings.database_down_s:.0f} s")
            for row in rows:
                row.recover_s = recover
                _crash(row, job, s.paths.log)
            return rows
        finally:
            kill(job)


__all__ = ["Context", "Settings", "broker_restart", "database_restart", "kill_batch", "kill_stream", "webhook_down",
           "webhook_errors"]
