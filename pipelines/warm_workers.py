"""Worker processes of the local multi-process runner that start warm.

Beam's FnApiRunner with ``--direct_running_mode=multi_processing`` starts each SDK worker as a fresh
``python -m apache_beam.runners.worker.sdk_worker_main``: about a second of CPU each importing Beam and the
pipeline's modules before it takes its first bundle, paid again by every worker on the same cores that run them.

``warm_workers()`` instead starts one process (the warm parent) as the run begins. It imports all that once, while
the runner is still translating the graph, and then forks a worker for each one Beam asks for: a worker is ready
within milliseconds, and its imported modules are shared with the parent's until written.

Beam still starts each worker with a command line and waits for it; that command is ``worker_attach.py``, a few
lines of the standard library that hand its environment (what Beam gives a worker: control and logging
endpoints, pipeline options, worker id) to the warm parent, then wait for the forked worker's exit status and exit
with it. So Beam sees what it always sees: a process per worker that ends when the worker does. A worker whose
command ends (Beam kills it) ends too. Whenever the warm parent cannot serve (gone, or failed to import), the
command runs Beam's own cold worker instead, so nothing depends on it but the speed.

The warm parent forks while it has one thread and no gRPC channel or server, as CPython's forkserver does; each
worker makes its own. It ends with the run (its stdin, the runner's pipe, closes).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from pathlib import Path

# what a worker imports before its first bundle: Beam's harness, and the modules of every healthflow graph
PRELOAD: tuple[str, ...] = ("apache_beam.runners.worker.sdk_worker_main", "apache_beam.runners.worker.bundle_processor",
           "pipelines.normalize", "pipelines.replay")
ATTACH = Path(__file__).with_name("worker_attach.py")
STARTED = b"S"  # the warm parent's first byte to the attaching command: a worker was forked for it
LENGTH_BYTES = 8
REQUEST_TIMEOUT_S = 10.0  # an attaching command that sends no request within this is dropped, not waited on


class WarmWorkers:
    """A warm parent for one run: ``command`` is the worker command line for Beam's subprocess environment.

    Started on creation, so that its imports overlap whatever the runner does before its first bundle; ``close``
    stops it (workers already forked are not stopped: each ends when Beam closes its control channel or kills its
    command). Never closed, it ends with this process or when garbage-collected (its stdin closes)."""

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="healthflow-workers-")
        self._address = os.path.join(self._folder, "parent.sock")
        self._parent: subprocess.Popen[bytes] | None = None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(self._address)
            listener.listen(64)  # bound before the parent starts: a command attaching early waits in the backlog
            self._parent = subprocess.Popen([sys.executable, "-m", __name__, "serve", str(listener.fileno()),
                                             ",".join(PRELOAD)], pass_fds=(listener.fileno(),), stdin=subprocess.PIPE)
        self._finalizer = weakref.finalize(self, _stop, self._parent, self._folder)

    @property
    def pid(self) -> int:
        """The warm parent's process id (its children are the workers it forked)."""
        return self._parent.pid  # type: ignore[union-attr]

    @property
    def command(self) -> str:
        return f"{shlex.quote(sys.executable)} -I -S {shlex.quote(str(ATTACH))} {shlex.quote(self._address)}"

    def close(self) -> None:
        self._finalizer()


def _stop(parent: subprocess.Popen[bytes], folder: str) -> None:
    """End the warm parent (its stdin closes: it exits at once) and remove its socket; does not wait for it."""
    with contextlib.suppress(OSError):
        parent.stdin.close()  # type: ignore[union-attr]
    shutil.rmtree(folder, ignore_errors=True)


def serve(listener_fd: int, preload: list[str]) -> None:
    """The warm parent: import ``preload``, then fork a worker per attaching command until stdin closes.

    Only this user can attach (the socket is in a folder of its own, mode 0700). A parent that cannot import what
    it should, or that has come to run a second thread (which a fork would leave behind holding its locks), says
    so and ends: every command then starts Beam's cold worker."""
    listener = socket.socket(fileno=listener_fd)
    try:
        for name in preload:
            importlib.import_module(name)
    except Exception as exc:  # any import error: the workers start cold, the run goes on
        print(f"healthflow: worker processes start cold: the warm parent cannot import {name} "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return
    if threading.active_count() != 1:
        print(f"healthflow: worker processes start cold: importing {', '.join(preload)} started threads "
              f"({', '.join(t.name for t in threading.enumerate())}), which forking would leave holding their locks",
              file=sys.stderr)
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers report over their connection: none is waited for
    with selectors.DefaultSelector() as selector:
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "runner")
        selector.register(listener, selectors.EVENT_READ, "attach")
        while True:
            for key, _ in selector.select():
                if key.data == "runner":
                    if not os.read(sys.stdin.fileno(), 4096):  # the run is over (or the runner gone)
                        return
                    continue
                connection, _ = listener.accept()
                try:
                    connection.settimeout(REQUEST_TIMEOUT_S)
                    request = _receive(connection)
                    child = os.fork()
                except (OSError, ValueError):  # the command went, or no fork: it starts a cold worker
                    connection.close()
                    continue
                if child == 0:
                    listener.close()
                    selector.close()
                    _run_worker(connection, request)  # never returns
                connection.close()


def _receive(connection: socket.socket) -> dict:
    length = int.from_bytes(_exactly(connection, LENGTH_BYTES), "big")
    return json.loads(_exactly(connection, length))


def _exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ValueError("the attaching command went away")
        data += chunk
    return data


def _run_worker(connection: socket.socket, request: dict) -> None:
    """In the forked worker: become the worker Beam started, report its exit status, exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the runner's pipe is the warm parent's, not a worker's
        os.close(devnull)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        connection.settimeout(None)
        connection.sendall(STARTED)
        threading.Thread(target=_end_with_command, args=(connection,), daemon=True,
                         name="healthflow-attached").start()
        from apache_beam.runners.worker import sdk_worker_main

        sdk_worker_main.main([])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # as a cold worker reports it: a traceback, a failed status
        traceback.print_exc()
    finally:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            connection.sendall(bytes([code & 0xFF]))
        os._exit(code & 0xFF)


def _end_with_command(connection: socket.socket) -> None:
    """End this worker when the command Beam started for it ends (killed, say): it would otherwise outlive it."""
    with contextlib.suppress(OSError):
        while connection.recv(1):
            pass
    os._exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), [name for name in sys.argv[3].split(",") if name])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # nothing to finalize: skip tearing down every module the workers were forked with
