"""Connections kept from one bundle to the next, each used by one DoFn instance at a time.

Beam's bundle-based local runner (the embedded streaming runner) sets every DoFn up and tears it down
for each bundle, and a bundle there is often one message: opening a database, a broker producer or
an HTTP session each time would cost more than the work. A DoFn takes its connections here in
``setup()`` (``acquire``) and hands them back in ``teardown()`` (``release``), so the next DoFn set up
with the same configuration reuses them. A DoFn instance runs one bundle at a time, so a connection
is never used by two threads at once. Only connections live here, never data. ``close_all()`` closes
what is kept (when a job ends, and at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import pickle
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_idle: dict[tuple[str, str], list[Any]] = {}


def _key(kind: str, config: Any) -> tuple[str, str]:
    try:
        return kind, hashlib.sha256(pickle.dumps(config)).hexdigest()
    except (pickle.PicklingError, TypeError, AttributeError):
        return kind, f"id-{id(config)}"


def acquire(kind: str, config: Any, opener: Callable[[], T]) -> T:
    """An idle connection for ``(kind, config)``, or a new one from ``opener``; yours until ``release``."""
    key = _key(kind, config)
    with _lock:
        idle = _idle.get(key)
        if idle:
            return idle.pop()
    return opener()


def release(kind: str, config: Any, resource: Any) -> None:
    """Hand a connection back for the next DoFn with the same configuration."""
    with _lock:
        _idle.setdefault(_key(kind, config), []).append(resource)


def discard(resource: Any) -> None:
    """Close a connection that must not be reused (it failed)."""
    with contextlib.suppress(Exception):
        resource.close()


def private_copy(config: T) -> T:
    """A copy of a connection's configuration object, to open without touching the original."""
    return copy.deepcopy(config)


def close_all() -> None:
    """Close every idle connection of this process; connections in use are closed by their DoFns."""
    with _lock:
        resources = [r for idle in _idle.values() for r in idle]
        _idle.clear()
    for resource in resources:
        discard(resource)


atexit.register(close_all)
