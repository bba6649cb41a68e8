"""A real ``moto_server`` process on a free loopback port, for testing AWS sinks with unmodified boto3.

Use from a test module (the import is sys.path-safe: plain ``pytest`` puts ``tests/`` on sys.path, ``python -m
pytest`` puts the repo root there)::

    try:
        from tests.servers.moto import moto_endpoint
    except ModuleNotFoundError:
        from servers.moto import moto_endpoint  # noqa: F401 - pytest fixture

    def test_something(moto_endpoint: str) -> None:
        boto3.client("s3", endpoint_url=moto_endpoint, region_name=MOTO_REGION)

``moto_endpoint`` is session-scoped, sets fake credentials (``testing``) and region ``us-east-1`` in the environment
while it is active, and shares ONE server process across all modules that import it (reference counted), so tests
must use unique bucket/queue names. Outside pytest use ``with moto_server() as endpoint: ...``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import pytest

from pipelines.embedded import MOTO_REGION, free_port, moto_server  # noqa: F401 - re-exported for tests

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": MOTO_REGION,
    "AWS_REGION": MOTO_REGION,
    # never read a developer's real profiles / config while testing
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
_LOOPBACK = "127.0.0.1"


class _SharedServer:
    """One moto server per process, started by the first user and stopped when the last one releases it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._stack: contextlib.ExitStack | None = None
        self.endpoint = ""

    def acquire(self) -> str:
        with self._lock:
            if self._users == 0:
                stack = contextlib.ExitStack()
                self.endpoint = stack.enter_context(moto_server())
                self._stack = stack
            self._users += 1
            return self.endpoint

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._stack is not None:
                self._stack.close()
                self._stack = None
                self.endpoint = ""


_SHARED = _SharedServer()


@contextlib.contextmanager
def fake_aws_environment() -> Iterator[None]:
    """Fake credentials and region in ``os.environ`` (restored afterwards); loopback bypasses any proxy."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_AWS_ENV.items():
            patch.setenv(key, value)
        for key in _UNSET_AWS_ENV:
            patch.delenv(key, raising=False)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), _LOOPBACK, "localhost"]))
        patch.setenv("NO_PROXY", no_proxy)
        patch.setenv("no_proxy", no_proxy)
        yield


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:<port>``) of a shared moto server; fake AWS credentials while active."""
    with fake_aws_environment():
        endpoint = _SHARED.acquire()
        try:
            yield endpoint
        finally:
            _SHARED.release()
