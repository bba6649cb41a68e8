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
def _process(command: list[str], ready: str) -> Iterator[str]:
    """Run ``python -m ...``; yields the first line it prints (which must start with ``ready``); closing its
    stdin ends it."""
    process = subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith(ready):
            raise RuntimeError(f"{command[0]} did not start (exit code {process.poll()})")
        yield line
    finally:
        if process.stdin is not None:
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
    with _process(command, "PUBSUB_EMULATOR_HOST=") as line:
        yield line.split("=", 1)[1]


@contextlib.contextmanager
def webhook_receiver(secret: str) -> Iterator[str]:
    """A webhook receiver (``pipelines.webhook_receiver``) verifying ``secret``; yields its URL."""
    with _process(["pipelines.webhook_receiver", "--secret", secret], "{") as line:
        yield json.loads(line)["url"]
