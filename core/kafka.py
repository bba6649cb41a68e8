"""The one Kafka producer of healthflow: idempotent settings, produce under back-pressure, delivery reports, flush.

Every producer is built from these pieces (raw-event publishing, the poller's publisher, the notification queue,
the Kafka sink): ``producer_config`` (idempotent, ``acks=all``), ``new_producer``, ``produce`` (serves delivery
reports while librdkafka's local queue is full instead of failing with ``BufferError``), ``DeliveryReports`` (an
``on_delivery`` callback counting acknowledgements and keeping errors) and ``send_all`` (produce a batch through a
producer of its own, flush, close; the caller decides what a ``Sent`` with errors or unflushed messages means).
``SharedProducer`` is the long-lived producer of a process that publishes all the time (the API, the poller): created
on first use, its delivery reports served by a thread of its own, and replaced by a new one when it can no longer
deliver (see ``REPLACE_ON``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Producer

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]
Message = tuple[bytes, "str | bytes | None", "Headers | None"]  # value, key, headers

IDEMPOTENT = {"enable.idempotence": True, "acks": "all", "linger.ms": 5}


def producer_config(bootstrap: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Idempotent producer settings for ``bootstrap`` (no duplicates or reordering from the client's own retries,
    a delivery report means durably written), with ``settings`` on top."""
    return {"bootstrap.servers": bootstrap, **IDEMPOTENT, **(settings or {})}


def new_producer(config: Mapping[str, Any]) -> Producer:
    return Producer(dict(config))


def produce(producer: Producer, topic: str, value: bytes, *, key: str | bytes | None = None,
            headers: Headers | None = None, on_delivery: Callable[[Any, Any], None] | None = None,
            deadline: float | None = None) -> bool:
    """Produce one message. While the local queue is full, serve delivery reports and try again, until ``deadline``
    (a ``time.monotonic()`` value) when one is given: False when the queue stayed full until then (nothing was
    produced). Delivery reports already due are served before returning. A ``KafkaException`` is raised as is."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
            break
        except BufferError:
            if deadline is not None and time.monotonic() >= deadline:
                producer.poll(0)
                return False
            producer.poll(0.1)
    producer.poll(0)
    return True


class DeliveryReports:
    """An ``on_delivery`` callback: counts the acknowledged messages and keeps the errors (thread-safe)."""

    def __init__(self) -> None:
        self.acked = 0
        self.errors: list[str] = []
        self._lock = threading.Condition()

    def __call__(self, err: Any, _msg: Any) -> None:
        with self._lock:
            if err is None:
                self.acked += 1
            else:
                self.errors.append(str(err))
            self._lock.notify_all()

    def snapshot(self) -> tuple[int, list[str]]:
        """(acknowledged, errors) as they are now."""
        with self._lock:
            return self.acked, list(self.errors)

    def wait(self, count: int, timeout_s: float) -> bool:
        """Block until ``count`` reports (acknowledgements or errors) came, at most ``timeout_s``: whether they did.
        Needs someone serving the producer's reports meanwhile (a ``SharedProducer`` does)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.acked + len(self.errors) >= count, timeout_s)


@dataclass(frozen=True)
class Sent:
    count: int  # messages produced
    remaining: int  # still queued when the flush timed out
    errors: list[str]  # failed delivery reports

    @property
    def ok(self) -> bool:
        return not self.remaining and not self.errors


def send_all(config: Mapping[str, Any], topic: str, messages: Iterable[Message],
             flush_timeout_s: float = 30.0) -> Sent:
    """Produce ``messages`` through a new producer, flush it and close it."""
    producer = new_producer(config)
    reports = DeliveryReports()
    count = 0
    try:
        for value, key, headers in messages:
            produce(producer, topic, value, key=key, headers=headers, on_delivery=reports)
            count += 1
        remaining = producer.flush(flush_timeout_s)
    finally:
        producer.close()
    return Sent(count, remaining, reports.snapshot()[1])


# Delivery errors after which a producer is replaced by a new one (a new producer id from the broker). Fatal errors
# (a sequence gap, a fenced epoch) end an idempotent producer for good. A broker that lost its producer state (a restart
# on memory storage) answers UNKNOWN_PRODUCER_ID to every request; librdkafka only bumps the epoch locally and retries
# until the messages time out, forever: so a message timing out replaces the producer too.
REPLACE_ON = frozenset({KafkaError._FATAL, KafkaError._MSG_TIMED_OUT, KafkaError.UNKNOWN_PRODUCER_ID,
                        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.INVALID_PRODUCER_EPOCH})


class SharedProducer:
    """One long-lived idempotent producer for a process, shared by threads; thread-safe and never blocking to produce.

    The librdkafka producer is created on first use (nothing connects before), together with a daemon thread that
    serves delivery reports every ``poll_interval_s``, so callbacks run on that thread and callers only wait on their
    own reports. After a fatal error or a delivery error in ``REPLACE_ON`` the producer is replaced (at most once
    every ``min_replace_interval_s``): what was still queued in the old one is purged, its reports delivered as
    errors, and later messages go through the new one. ``close()`` flushes, stops the thread and releases it.
    """

    def __init__(self, config: Mapping[str, Any], *, poll_interval_s: float = 0.05,
                 min_replace_interval_s: float = 1.0) -> None:
        self.config = {**config, "error_cb": self._on_error}
        self.poll_interval_s, self.min_replace_interval_s = poll_interval_s, min_replace_interval_s
        self.replaced = 0  # how many producers were replaced so far
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._replace = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_replace = 0.0

    def _on_error(self, err: Any) -> None:
        if err.fatal():
            self._replace.set()

    def _current(self) -> Producer:
        """The producer, created on first use (call with ``_lock`` held)."""
        if self._closed.is_set():
            raise RuntimeError("this producer is closed")
        if self._producer is None:
            self._producer = new_producer(self.config)
            self._thread = threading.Thread(target=self._serve, name="kafka-delivery-reports", daemon=True)
            self._thread.start()
        return self._producer

    def produce(self, topic: str, value: bytes, *, key: str | bytes | None = None, headers: Headers | None = None,
                on_delivery: Callable[[Any, Any], None] | None = None, deadline: float | None = None) -> bool:
        """``produce`` on the current producer (``deadline``: see there; a deadline already past never waits, so an
        event loop can call this). ``on_delivery`` is called on the reporting thread."""

        def report(err: Any, msg: Any) -> None:
            if err is not None and err.code() in REPLACE_ON:
                self._replace.set()
            if on_delivery is not None:
                on_delivery(err, msg)

        while True:
            with self._lock:  # producers are swapped under this lock: never produce on a replaced one
                try:
                    self._current().produce(topic, value=value, key=key, headers=headers, on_delivery=report)
                    return True
                except BufferError:  # the reporting thread drains the queue meanwhile
                    pass
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _serve(self) -> None:
        """Serve delivery reports until closed. Nothing ends it early: an exception from a caller's callback, a poll
        or a replacement is logged and serving goes on (a dead reporting thread would leave every later publish
        waiting for reports that never come)."""
        while not self._closed.is_set():
            with self._lock:
                producer = self._producer
            if producer is None:
                return
            try:
                producer.poll(self.poll_interval_s)
                if self._replace.is_set() and time.monotonic() - self._last_replace >= self.min_replace_interval_s:
                    self._swap()
            except Exception:  # logged; the loop goes on (the pause keeps a repeating failure from spinning)
                log.exception("kafka delivery-report thread: an error while serving reports; still serving")
                self._closed.wait(self.poll_interval_s)

    def _swap(self) -> None:
        with self._lock:
            if self._closed.is_set() or self._producer is None:
                return
            self._last_replace = time.monotonic()  # set first: a replacement that raises is tried again only later
            old, self._producer = self._producer, new_producer(self.config)
            self._replace.clear()
            self.replaced += 1
        # it cannot deliver: what it holds is reported as failed (the callers answer for it, e.g. with a 503 the
        # provider retries; an in-flight message may still have been written, so at least once), then it is released
        old.purge()
        old.flush(self.poll_interval_s)
        old.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout_s``; what is left is reported as failed), then stop the reporting
        thread and release the producer."""
        with self._lock:
            producer, self._producer = self._producer, None
            self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if producer is not None:
            if producer.flush(timeout_s):  # still undelivered: reported as failed rather than waited for
                producer.purge()
                producer.flush(0.1)
            producer.close()

    def __enter__(self) -> SharedProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
