"""The ``healthflow`` command.

    healthflow providers                      list providers and the raw kinds each accepts
    healthflow normalize --provider P FILE|-  show what a raw payload becomes (JSON lines)
    healthflow publish --bootstrap-servers B --provider P FILE|-   put a raw payload on the ingestion topic
    healthflow run normalize --destinations FILE [options] [beam options]   run the pipeline on any runner
    healthflow deadletters list|show|replay    inspect failures and deliver them again
    healthflow demo                            everything, embedded, on this machine
    healthflow broker [--storage DIR]          a Kafka-protocol broker on loopback (in memory, or kept in DIR)

Logging (any command, before or after its name): --log-level LEVEL (or $HEALTHFLOW_LOG_LEVEL; WARNING by default,
INFO for `serve`, `poll` and `broker`) and --log-format text|json (or $HEALTHFLOW_LOG_FORMAT), to standard error,
secrets redacted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from core.errors import FatalError
from core.logs import FORMAT_VARIABLE, FORMATS, LEVEL_VARIABLE, LEVELS, configure_logging

PIPELINES = ("normalize",)


def _read_input(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def cmd_providers(_: argparse.Namespace) -> int:
    from connectors import registry

    for slug, provider in sorted(registry().items()):
        print(f"{slug} ({provider.terra_name}): {provider.doc}")
        for kind, spec in provider.kinds.items():
            models = ", ".join(spec.models) or "(ignored)"
            print(f"  {kind:<28} → {models:<14} {spec.doc.splitlines()[0] if spec.doc else ''}")
    return 0


def cmd_normalize(args: argparse.Namespace) -> int:
    from core.raw import RawMessage, RawPayload
    from schemas.serde import encode_raw
    from transforms.normalize import normalize_in_memory

    raw = RawPayload(args.provider.lower(), _read_input(args.file), args.kind, args.user)
    events, failures = normalize_in_memory([RawMessage(encode_raw(raw), {"path": args.file, "line": 1})])
    for failure in failures:
        rec = failure.record
        where = f" (document {rec['source']['document_index']})" if "document_index" in rec["source"] else ""
        print(f"error [{rec['stage']}]{where}: {rec['error_class']}: {rec['error_message']}", file=sys.stderr)
    for event in events:
        print(json.dumps(event.envelope(), ensure_ascii=False))
    return 1 if failures else 0


def cmd_publish(args: argparse.Namespace) -> int:
    from connectors.publish import publish
    from core.raw import RawPayload

    count = publish(args.bootstrap_servers, args.topic,
                    [RawPayload(args.provider.lower(), _read_input(args.file), args.kind, args.user)])
    print(f"published {count} raw event(s) to {args.topic}")
    return 0


def cmd_run(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    from pipelines.warm_workers import prestart

    if args.mode != "streaming":  # a multi-process run's warm parent imports Beam while this command does; if it
        with contextlib.suppress(OSError):  # cannot start, the runner starts one (or cold workers), as before
            prestart(beam_args)
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from pipelines.normalize import FileSource, KafkaSource, NormalizeJob, PubSubSource, run_batch
    from sinks.config import load_destinations

    streaming = args.mode == "streaming" or PipelineOptions(list(beam_args)).view_as(StandardOptions).streaming
    given = [flag for flag, value in (("--input", args.input), ("--bootstrap-servers", args.bootstrap_servers),
                                      ("--subscription", args.subscription)) if value]
    if len(given) > 1:
        raise FatalError(f"give one source, not {' and '.join(given)}")
    if args.input:
        if streaming:
            raise FatalError("files are read in batch: drop --streaming, or stream from --bootstrap-servers or "
                             "--subscription")
        source: KafkaSource | FileSource | PubSubSource = FileSource(args.input)
    elif args.bootstrap_servers:
        source = KafkaSource(args.bootstrap_servers, args.topic, args.group)
    elif args.subscription:
        source = PubSubSource(args.subscription)
    else:
        raise FatalError("no source: give --input FILES, --bootstrap-servers HOST:PORT (Kafka) or "
                         "--subscription projects/P/subscriptions/S (Pub/Sub)")
    targets = load_destinations(args.destinations).targets()
    job = NormalizeJob(source, targets, _shared_path(args.dead_letters), state_url=args.state)
    if not streaming:
        summary = run_batch(job, beam_args)
        if summary.dry_run:
            print("healthflow: the job was translated (--dry_run): nothing was submitted", file=sys.stderr)
            return 0
        print(json.dumps({"seconds": round(summary.seconds, 3), **summary.counters,
                          "committed_offsets": summary.committed_offsets}, indent=1))
        return 0
    return _run_streaming(job, beam_args, args.redeliver_every, args.duration)


def _run_streaming(job, beam_args: Sequence[str], redeliver_every_s: float, duration_s: float | None) -> int:
    """Run the streaming job until interrupted (Ctrl-C, SIGTERM) or for ``duration_s``."""
    import signal
    import threading

    from pipelines.streaming import run_streaming

    running = run_streaming(job, [*beam_args, "--streaming"], redeliver_every_s=redeliver_every_s or None)
    if running.dry_run:
        print("healthflow: the streaming job was translated (--dry_run): nothing was submitted", file=sys.stderr)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"healthflow: streaming from {job.source} — stop with Ctrl-C", file=sys.stderr, flush=True)
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            running.wait()
        except BaseException as exc:  # the job failed: report it after stopping
            failure.append(exc)
        finally:
            stop.set()

    threading.Thread(target=watch, daemon=True, name="healthflow-job").start()
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait(duration_s)
    running.stop()
    if failure:
        raise failure[0]
    return 0


def _shared_path(path: str) -> str:
    """A local folder as an absolute path (workers in other processes see the same one); URLs as given."""
    return path if "://" in path else str(Path(path).resolve())


def cmd_demo(args: argparse.Namespace) -> int:
    from runners.demo import run_demo

    return run_demo(users=args.users, days=args.days, workdir=Path(args.workdir))


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded broker until interrupted (Ctrl-C, SIGTERM)."""
    import signal
    import threading

    from pipelines.embedded import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(args.port, storage=args.storage) as broker:
        for topic in args.topic:
            broker.create_topic(topic, args.partitions, exist_ok=True)
        kept = (f"kept in {args.storage}" if args.storage else
                "in memory: lost when it stops (--storage DIR keeps them)")
        print(f"healthflow: broker at {broker.bootstrap}; topics, messages and committed offsets {kept} — stop with "
              "Ctrl-C", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                if broker.process is None or broker.process.poll() is not None:
                    raise FatalError("the embedded broker exited")
    return 0


def cmd_poll(args: argparse.Namespace) -> int:
    import time

    from controlplane.auth.control_plane import ControlPlane
    from controlplane.polling import (
        ConnectionPolling,
        CursorStore,
        KafkaPublisher,
        LocalRateLimiter,
        NotificationFetcher,
        Poller,
        RedisRateLimiter,
    )

    limiter = RedisRateLimiter(url=args.redis) if args.redis else LocalRateLimiter()
    with ControlPlane(args.state) as control_plane, KafkaPublisher(args.bootstrap_servers, args.topic) as publisher:
        polling = ConnectionPolling(control_plane, Poller(cursors=CursorStore(args.state), publisher=publisher,
                                                          limiter=limiter))
        fetcher = NotificationFetcher(polling)
        if args.once:
            report = polling.poll_once()
            fetched = fetcher.run_once(args.bootstrap_servers, args.notifications_topic)
            print(json.dumps({"polls": len(report.results), "published": sum(r.published for r in report.results),
                              "refreshed": report.refreshed, "revoked": report.revoked, "failed": report.failed,
                              "notifications_fetched": len(fetched.fetched.results),
                              "notifications_failed": fetched.fetched.failed,
                              "notifications_queued_again": fetched.requeued + fetched.deferred,
                              "notifications_revoked": fetched.revoked, "pings": fetched.pings,
                              "pings_foreign_url": fetched.foreign, "callbacks_gone": fetched.gone,
                              "notifications_unknown_account": fetched.unknown_accounts}))
            return 0
        scheduler = polling.scheduler(args.interval)
        scheduler.start()
        try:
            while True:  # notify-only webhooks: fetch what they name every few seconds
                fetcher.run_once(args.bootstrap_servers, args.notifications_topic)
                time.sleep(5)
        except KeyboardInterrupt:
            scheduler.stop()
    return 0


def _store_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--dead-letters", default=".healthflow/dead-letters", help="dead-letter store root")
    command.add_argument("--state", default="sqlite:///.healthflow/state.db",
                         help="record state merging partial records across batches (sqlite:///… or postgresql://…)")


def cmd_deadletters(args: argparse.Namespace) -> int:
    from core.dead_letters import read_dead_letters, to_json
    from pipelines.replay import replay_deliveries, replay_ingest

    if args.action == "list":
        for record in read_dead_letters(args.dead_letters):
            if args.stage and not record["stage"].startswith(args.stage):
                continue
            if args.destination and record["destination"] != args.destination:
                continue
            failed = datetime.fromtimestamp(record["failed_at"] / 1000, UTC).isoformat(timespec="seconds")
            print(f"{record['dead_letter_id']}  {failed}  {record['stage']:<22} attempts={record['attempts']:<3} "
                  f"{record['error_class']}: {record['error_message'][:100]}")
        return 0
    if args.action == "show":
        found = [r for r in read_dead_letters(args.dead_letters) if r["dead_letter_id"].startswith(args.id)]
        if len(found) != 1:
            raise FatalError(f"{len(found)} dead letters match {args.id!r}; give a longer id")
        print(to_json(found[0]).decode())
        return 0
    from sinks.config import load_destinations

    targets = load_destinations(args.destinations).targets()
    if args.ingest:
        result = replay_ingest(args.dead_letters, targets, args.state)
        summary = result.ingest.counters if result.ingest else {}
        print(json.dumps({"replayed_raw": summary.get("raw_in", 0), **summary}, indent=1))
        return 0
    result = replay_deliveries(args.dead_letters, targets, args.destination, args.to, due_only=args.due,
                               status_url=args.state)
    for name in sorted(set(result.delivered) | set(result.failed_again) | set(result.superseded)):
        print(f"{name}: {result.delivered[name]} delivered, {result.failed_again[name]} failed again (kept), "
              f"{result.superseded[name]} superseded (a newer version went out after them: removed unsent)")
    if not result.delivered and not result.failed_again and not result.superseded:
        print("nothing to replay")
    return 1 if sum(result.failed_again.values()) else 0


def cmd_destinations(args: argparse.Namespace) -> int:
    from sinks.status import DestinationStatus

    status = DestinationStatus(args.state).open()
    try:
        if args.action == "enable":
            status.enable(args.name)
            print(f"{args.name}: enabled; replay what it missed with "
                  f"`healthflow deadletters replay --destination {args.name} --destinations FILE`")
        elif args.action == "disable":
            status.disable(args.name, args.reason)
            print(f"{args.name}: disabled ({args.reason})")
        else:
            rows = status.all()
            for row in rows:
                since = (datetime.fromtimestamp(row.failing_since_ms / 1000, UTC).isoformat(timespec="seconds")
                         if row.failing_since_ms else "-")
                print(f"{row.name:<24} {'DISABLED' if row.disabled else 'active':<9} failing since {since:<26} "
                      f"{row.reason or ''}")
            if not rows:
                print("every destination is active; none has failed")
    finally:
        status.close()
    return 0


LONG_RUNNING = ("serve", "poll", "broker")  # services: their INFO lines (requests, lifecycle events, polls) are the log


def logging_options(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``--log-level`` and ``--log-format`` (on ``parser``, or on a parser of their own)."""
    parser = parser or argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS,
                        help=f"least severe level shown (default: ${LEVEL_VARIABLE}, else WARNING; INFO for "
                             f"{' and '.join(LONG_RUNNING)})")
    parser.add_argument("--log-format", type=str.lower, choices=FORMATS,
                        help=f"text, or json: one JSON object per line (default: ${FORMAT_VARIABLE}, else text)")
    return parser


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="healthflow", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    logging_options(top)
    sub = top.add_subparsers(dest="command", required=True)

    sub.add_parser("providers", help="list providers and the raw kinds each accepts")

    norm = sub.add_parser("normalize", help="print the normalized events of a raw payload as JSON lines")
    norm.add_argument("--provider", required=True)
    norm.add_argument("--kind", help="raw kind, for payloads that do not name it (Oura, WHOOP)")
    norm.add_argument("--user", help="provider user id, for payloads that do not carry it (Oura)")
    norm.add_argument("file", help="payload file, or - for standard input")

    pub = sub.add_parser("publish", help="publish a raw payload to the ingestion topic")
    pub.add_argument("--bootstrap-servers", required=True)
    pub.add_argument("--topic", default="healthflow.raw")
    pub.add_argument("--provider", required=True)
    pub.add_argument("--kind")
    pub.add_argument("--user")
    pub.add_argument("file")

    run = sub.add_parser("run", help="run a pipeline; unknown options go to Beam (e.g. --runner=DataflowRunner)")
    run.add_argument("pipeline", choices=PIPELINES)
    run.add_argument("--input", help="raw events as JSON lines (local path, s3://, gs://; globs allowed)")
    run.add_argument("--bootstrap-servers", help="Kafka bootstrap servers of the ingestion topic")
    run.add_argument("--topic", default="healthflow.raw")
    run.add_argument("--group", default="healthflow-normalize", help="consumer group whose offsets are committed")
    run.add_argument("--subscription", help="Pub/Sub subscription of the ingestion topic, projects/P/subscriptions/S "
                                            "(streaming; the client follows PUBSUB_EMULATOR_HOST)")
    run.add_argument("--mode", choices=("batch", "streaming"), default="batch",
                     help="streaming: one long-running job (the same as Beam's --streaming)")
    run.add_argument("--redeliver-every", type=float, default=60.0,
                     help="streaming: seconds between scheduled redeliveries of due dead letters (0: never)")
    run.add_argument("--duration", type=float, help="streaming: stop after this many seconds (default: run until "
                                                     "interrupted)")
    run.add_argument("--destinations", required=True, help="destinations file (YAML or TOML), see README")
    _store_options(run)

    dead = sub.add_parser("deadletters", help="inspect and replay dead letters")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    listing = dead_sub.add_parser("list", help="one line per dead letter, oldest first")
    listing.add_argument("--stage", help="only this stage (prefix match: deliver, deliver:webhook, parse, ...)")
    listing.add_argument("--destination", help="only delivery dead letters of this destination")
    show = dead_sub.add_parser("show", help="one dead letter in full")
    show.add_argument("id", help="dead-letter id (dlq_…), or a unique prefix")
    replay = dead_sub.add_parser("replay", help="deliver dead letters again once the cause is fixed")
    replay.add_argument("--destinations", required=True, help="destinations file (YAML or TOML)")
    scope = replay.add_mutually_exclusive_group()
    scope.add_argument("--destination", help="only dead letters of this destination (default: every destination)")
    scope.add_argument("--ingest", action="store_true",
                       help="replay ingest dead letters (decode/parse/normalize/validate) through the pipeline")
    replay.add_argument("--to", help="deliver to this destination instead of the one that failed")
    replay.add_argument("--due", action="store_true",
                        help="only dead letters whose scheduled redelivery is due (what streaming mode does)")

    dest = sub.add_parser("destinations", help="destination health: status, enable, disable")
    dest_sub = dest.add_subparsers(dest="action", required=True)
    dest_sub.add_parser("status", help="disabled destinations and failing streaks")
    enable = dest_sub.add_parser("enable", help="deliver to a disabled destination again (then replay)")
    enable.add_argument("name")
    disable = dest_sub.add_parser("disable", help="stop delivering to a destination; its events are kept")
    disable.add_argument("name")
    disable.add_argument("--reason", default="disabled by an operator")
    for command in (dest_sub.choices["status"], enable, disable):
        _store_options(command)
    for command in (listing, show, replay):
        _store_options(command)

    poll = sub.add_parser("poll", help="poll every active connection's provider API onto the ingestion topic")
    poll.add_argument("--bootstrap-servers", required=True)
    poll.add_argument("--topic", default="healthflow.raw")
    poll.add_argument("--redis", help="redis://host:port/db for rate limits shared by every poller (default: "
                                      "in-process limits, one poller only)")
    poll.add_argument("--interval", type=float, default=900.0, help="seconds between polls of a connection")
    poll.add_argument("--once", action="store_true", help="poll everything once and exit")
    poll.add_argument("--notifications-topic", default="healthflow.notifications",
                      help="where `healthflow serve` queues notify-only webhooks (fetched as they arrive)")
    poll.add_argument("--state", default="sqlite:///.healthflow/state.db", help="control-plane store")

    from controlplane.api.cli import add_parsers as add_api_parsers

    add_api_parsers(sub)  # healthflow serve, healthflow developers …

    broker = sub.add_parser("broker", help="a Kafka-protocol broker on loopback (Tansu), for local runs")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--storage", help="folder keeping topics, messages and committed offsets across restarts "
                                          "(default: in memory, lost when the broker stops)")
    broker.add_argument("--topic", action="append", default=[], help="create this topic when missing (repeatable)")
    broker.add_argument("--partitions", type=int, default=4, help="partitions of the topics created")

    demo = sub.add_parser("demo", help="generate, ingest, normalize and deliver on embedded components")
    demo.add_argument("--users", type=int, default=300)
    demo.add_argument("--days", type=int, default=4)
    demo.add_argument("--workdir", default="demo-output")
    return top


def setup_logging(argv: Sequence[str]) -> list[str]:
    """Configure logging from ``--log-level``/``--log-format`` wherever they are in ``argv``; the rest of it."""
    given, rest = logging_options().parse_known_args(argv)
    command = next((word for word in rest if not word.startswith("-")), "")
    level = given.log_level or os.environ.get(LEVEL_VARIABLE) or ("INFO" if command in LONG_RUNNING else "WARNING")
    try:
        configure_logging(level, given.log_format)
    except ValueError as exc:  # a bad $HEALTHFLOW_LOG_LEVEL or $HEALTHFLOW_LOG_FORMAT
        raise FatalError(str(exc)) from None
    return rest


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = setup_logging(sys.argv[1:] if argv is None else argv)
    except FatalError as exc:
        print(f"healthflow: {exc}", file=sys.stderr)
        return 2
    args, beam_args = parser().parse_known_args(argv)
    if args.command != "run" and beam_args:
        parser().error(f"unrecognized arguments: {' '.join(beam_args)}")
    try:
        if args.command == "run":
            return cmd_run(args, beam_args)
        from controlplane.api.cli import COMMANDS as API_COMMANDS

        return {"providers": cmd_providers, "normalize": cmd_normalize, "publish": cmd_publish,
                "deadletters": cmd_deadletters, "destinations": cmd_destinations, "demo": cmd_demo, "poll": cmd_poll,
                "broker": cmd_broker,
                **API_COMMANDS}[args.command](args)
    except FatalError as exc:
        print(f"healthflow: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown provider and the like, already worded for people
        print(f"healthflow: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
