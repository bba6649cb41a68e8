"""Running the API: ``serve()`` (blocking, what ``healthflow serve`` calls) and ``BackgroundServer`` (a thread).

Both bind 127.0.0.1 by default; put a TLS-terminating proxy in front and pass ``public_url`` (the
address browsers use, which providers redirect back to) to expose it.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from controlplane.api.serve_limits import ServeLimits
from core.logs import configure_logging
from core.logs import configured as logging_configured

log = logging.getLogger(__name__)
events_log = logging.getLogger("healthflow.auth.events")


def log_event(event: dict[str, Any]) -> None:
    """The default ``emit``: one JSON line per lifecycle event on the ``healthflow.auth.events`` logger."""
    events_log.info("%s", json.dumps(event, separators=(",", ":"), sort_keys=True))


def serve(port: int = 8080, store_url: str = "sqlite:///.healthflow/state.db", *, host: str = "127.0.0.1",
          public_url: str | None = None, secret_key: str | None = None,
          emit: Callable[[dict[str, Any]], None] | None = None,
          bootstrap_servers: str | None = None, limiter: Any = None, limits: ServeLimits | None = None) -> None:
    """Serve the ``/v2`` API until interrupted (needs ``HEALTHFLOW_SECRET_KEY`` unless ``secret_key`` is given).

    With ``bootstrap_servers``, provider webhooks (``/v2/providers/{provider}/webhook``) are received
    too and published to the ingestion and notification topics there, and historical requests
    (``GET /v2/{type}``) are fetched at low priority (``limiter``: a shared RedisRateLimiter, or
    in-process limits). A provider whose webhooks cannot be authenticated (no URL token for one that signs
    nothing, no key for one that signs) is named in a warning at start; its requests are refused until it is set.
    Webhooks and historical requests publish through one long-lived producer, created on first use and closed when
    the server stops; a webhook is answered only once the broker acknowledged it, awaited without blocking the event
    loop for at most ``limits.publish_timeout_s``, else 503 with ``Retry-After`` while every other endpoint answers.
    Expired widget sessions, authorizations and never-completed connections are purged at start and every
    ``limits.purge_interval_s``.

    Logs go through ``core.logs`` (uvicorn's access and error logs included, so secrets in URLs are redacted);
    when nothing configured it yet, INFO and above are shown as text.
    """
    from controlplane.api.app import create_app
    from controlplane.auth.control_plane import ControlPlane
    from controlplane.auth.guard import ApiKeyGuard, FailureThrottle
    from controlplane.auth.housekeeping import Housekeeping

    if not logging_configured():
        configure_logging("INFO")
    limits = limits or ServeLimits()
    throttle = FailureThrottle(limits.auth_failures_per_client, limits.auth_failures_per_dev_id,
                               limits.throttle_storage)
    control_plane = ControlPlane(store_url, secret_key, public_url=public_url or f"http://{host}:{port}",
                                 emit=emit or log_event).open()
    guard = ApiKeyGuard(control_plane.developers, throttle)
    housekeeping = Housekeeping(control_plane, limits.purge_interval_s)
    polling = producer = None
    try:
        control_plane.flush_events()
        housekeeping.start()
        if bootstrap_servers:
            from connectors.publish import raw_event_producer
            from controlplane.polling import ConnectionPolling, CursorStore, KafkaPublisher, LocalRateLimiter, Poller

            producer = raw_event_producer(bootstrap_servers, timeout_s=limits.publish_timeout_s)
            publisher = KafkaPublisher(bootstrap_servers, "healthflow.raw", producer=producer)
            polling = ConnectionPolling(control_plane, Poller(cursors=CursorStore(store_url), publisher=publisher,
                                                              limiter=limiter or LocalRateLimiter()),
                                        max_backfill_days=limits.history_max_days,
                                        backfill_workers=limits.backfill_workers,
                                        backfill_queue=limits.backfill_queue)
        app = create_app(control_plane, polling=polling, api_key_guard=guard)
        if bootstrap_servers:
            from connectors.publish import RawEventPublisher
            from controlplane.webhooks import router, unauthenticated_webhooks

            for problem in unauthenticated_webhooks():
                log.warning("%s", problem)
            app.include_router(router(RawEventPublisher(producer=producer, timeout_s=limits.publish_timeout_s)))
        uvicorn.run(app, host=host, port=port, log_config=None)  # our handler: levels, format, redaction
    finally:
        housekeeping.stop()
        if polling is not None:
            polling.close()
        if producer is not None:
            producer.close(limits.publish_timeout_s)
        guard.close()
        control_plane.close()


class BackgroundServer:
    """uvicorn in a daemon thread on a socket bound at construction, so ``url`` is known before the app exists."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, app: Any, timeout_s: float = 10.0) -> BackgroundServer:
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"api-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
