"""Servers the bench runs in processes of their own, so their work is not counted as the pipeline's."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _process(command: list[str], ready: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run ``python -m ...``; yields the first line it prints (which must start with ``ready``) and the process;
    closing its stdin ends it."""
    process = subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith(ready):
            raise RuntimeError(f"{command[0]} did not start (exit code {process.poll()})")
        yield line, process
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def pubsub_server(*topics: str, subscriptions: tuple[str, ...] = ()) -> Iterator[str]:
    """The Pub/Sub test server (``tests/servers/pubsub_server.py``) with ``topics`` (and ``subscriptions`` of the
    first one); yields its ``PUBSUB_EMULATOR_HOST``."""
    command = ["tests.servers.pubsub_server", *(a for t in topics for a in ("--topic", t)),
               *(a for s in subscriptions for a in ("--subscription", s))]
    with _process(command, "PUBSUB_EMULATOR_HOST=") as (line, _):
        yield line.split("=", 1)[1]


class PubSubProcess:
    """The Pub/Sub test server in its own process, which answers how many messages a subscription still holds."""

    def __init__(self, host: str, process: subprocess.Popen[str]) -> None:
        self.host, self._process = host, process

    def outstanding(self, subscription: str) -> int:
        """Messages of ``subscription`` not acknowledged yet (waiting or leased), as the server counts them."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(f"outstanding {subscription}\n")
        self._process.stdin.flush()
        return int(self._process.stdout.readline())


@contextlib.contextmanager
def counting_pubsub_server(topic: str, subscription: str) -> Iterator[PubSubProcess]:
    """The Pub/Sub test server with ``topic`` and its ``subscription``, queryable for outstanding messages."""
    command = ["bench.processes", "pubsub", "--topic", topic, "--subscription", subscription]
    with _process(command, "PUBSUB_EMULATOR_HOST=") as (line, process):
        yield PubSubProcess(line.split("=", 1)[1], process)


@contextlib.contextmanager
def webhook_receiver(secret: str) -> Iterator[str]:
    """A webhook receiver (``pipelines.webhook_receiver``) verifying ``secret``; yields its URL. It parses bodies only
    when asked for what it received (``--parse-on-read``): json parsing was most of its time per request."""
    with _process(["pipelines.webhook_receiver", "--secret", secret, "--parse-on-read"], "{") as (line, _):
        yield json.loads(line)["url"]


def _serve_pubsub(argv: list[str]) -> None:
    """``python -m bench.processes pubsub --topic T --subscription S``: serve; each ``outstanding S`` line read
    on stdin is answered with that count on stdout; stdin closing ends it."""
    import argparse

    from tests.servers.pubsub_server import PubSubTestServer  # run from the repository (cwd): tests/ is not installed

    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--subscription", required=True)
    args = parser.parse_args(argv)
    with PubSubTestServer(pull_wait_s=0.2) as server:
        server.create_topic(args.topic)
        server.create_subscription(args.subscription, args.topic, ack_deadline_seconds=60)
        print(f"PUBSUB_EMULATOR_HOST={server.host}", flush=True)
        for line in sys.stdin:
            command, _, subscription = line.strip().partition(" ")
            if command == "outstanding":
                print(server.outstanding(subscription), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["pubsub"]:
    _serve_pubsub(sys.argv[2:])
