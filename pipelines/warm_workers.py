"""Worker processes of the local multi-process runner that start warm.

Beam's FnApiRunner with ``--direct_running_mode=multi_processing`` starts each SDK worker as a fresh
``python -m apache_beam.runners.worker.sdk_worker_main``: ~1.2 s of CPU each importing Beam and the pipeline's
modules before it takes its first bundle, paid again by every worker on the cores that run them.

``WarmWorkers`` instead starts one process, the warm parent, as the runner is made. It imports all that once, while
the runner builds and translates the graph, and then forks a worker for each one Beam asks for: a worker is ready
in milliseconds, and shares the parent's imported modules until it writes to them.

Beam still starts each worker with a command line and waits for it. That command is ``worker_attach.py``, a few
lines of the standard library: it hands its environment (what Beam gives a worker: control and logging endpoints,
pipeline options, worker id) and folder to the warm parent, then waits for the forked worker's exit status and
exits with it. So Beam sees what it always sees: a process per worker that ends when the worker does. Killing the
command ends its worker. Whenever the warm parent cannot serve (it failed to import, is gone, or does not answer
within ``STARTED_TIMEOUT_S``), the command becomes Beam's own cold worker: only the speed depends on the parent.

A forked worker ends as a cold one would, less the teardown of its modules: other threads joined, ``atexit``
handlers run (pooled sinks closed), streams flushed, then its status reported.

The parent forks only while it runs no Python thread but its own, as CPython's forkserver does, and before any
gRPC channel or server exists (each worker makes its own). The C libraries Beam loads that keep threads of their
own (pyarrow's jemalloc, numpy's OpenBLAS) prepare for fork themselves. The parent ends with the run (its stdin,
the runner's pipe, closes; also when the runner is killed) or after ``IDLE_TIMEOUT_S`` if no run began (a runner
that never ran), and removes its socket as it goes. It ignores Ctrl-C, which is the runner's to act on.
"""

from __future__ import annotations

import argparse
import atexit
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
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# what a worker imports before its first bundle: Beam's harness, and the modules of every healthflow graph
PRELOAD: tuple[str, ...] = ("apache_beam.runners.worker.sdk_worker_main",
                            "apache_beam.runners.worker.bundle_processor", "pipelines.normalize", "pipelines.replay")
ATTACH = Path(__file__).with_name("worker_attach.py")
STARTED = b"S"  # the warm parent's first byte to an attaching command: a worker was forked for it
LENGTH_BYTES = 8
REQUEST_TIMEOUT_S = 10.0  # an attaching command that sends no request within this is dropped, not waited on
STARTED_TIMEOUT_S = 60.0  # a command not answered within this (a stuck parent) starts a cold worker
IDLE_TIMEOUT_S = 60.0  # a parent whose run has not begun within this after its imports ends (it never will)


class WarmWorkers:
    """A warm parent: ``command`` is the worker command line for Beam's subprocess environment.

    Started on creation; ``close`` stops it (workers already forked are not stopped: each ends when Beam closes its
    control channel or kills its command). ``claim`` as a run begins. Never closed, it ends when this process does,
    when garbage-collected, or idle after ``IDLE_TIMEOUT_S`` unclaimed. OSError when it cannot be started here (then
    nothing is left behind)."""

    def __init__(self, started_timeout_s: float = STARTED_TIMEOUT_S, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self._folder = tempfile.mkdtemp(prefix="healthflow-workers-")  # mode 0700: only this user can attach
        self._address = os.path.join(self._folder, "parent.sock")
        self._started_timeout_s = started_timeout_s
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(self._address)  # OSError for a temp folder whose path is too long for a socket
                listener.listen(64)  # bound before the parent starts: a command attaching early waits in the backlog
                self._parent = subprocess.Popen(
                    [sys.executable, "-m", __name__, "serve", str(listener.fileno()), self._folder,
                     str(idle_timeout_s), ",".join(PRELOAD)], pass_fds=(listener.fileno(),), stdin=subprocess.PIPE)
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _stop, self._parent, self._folder)

    @property
    def pid(self) -> int:
        """The warm parent's process id (its children are the workers it forked)."""
        return self._parent.pid

    @property
    def command(self) -> str:
        return " ".join(shlex.quote(part) for part in (sys.executable, "-I", "-S", str(ATTACH), self._address,
                                                       str(self._started_timeout_s)))

    def ended(self) -> bool:
        """Whether the parent has ended (closed, idle, or failed); it is then reaped."""
        return self._parent.poll() is not None

    def claim(self) -> bool:
        """Tell the parent a run begins (it then no longer ends idle); False when it has ended (or was closed). A
        parent ending idle at this very moment may still take the claim: its run's workers then start cold."""
        if not self._finalizer.alive or self.ended():
            return False
        try:
            self._parent.stdin.write(b"r")  # type: ignore[union-attr]
            self._parent.stdin.flush()  # type: ignore[union-attr]
        except OSError:  # it ended idle just now
            return False
        return True

    def close(self) -> None:
        self._finalizer()


LOCAL_RUNNERS = {None, "DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner"}  # --runner: this machine
_prestarted: WarmWorkers | None = None


def prestart(beam_args: Sequence[str]) -> bool:
    """Start the warm parent of the run ``beam_args`` describe now, before the caller imports Beam, when they ask for
    Beam's local multi-process runner (``--direct_running_mode=multi_processing``, no other ``--runner``, no
    ``--streaming``); whether one was started. The parent's imports then overlap the caller's own (the ``healthflow
    run`` command's: ~1 s), and the run's workers are ready that much sooner.

    The arguments are read here without Beam, so a spelling Beam reads differently only loses the head start: the
    run's ``WarmMultiProcessRunner`` takes the parent (``take_prestarted``) or, without one, starts its own. A parent
    no run takes ends idle (``IDLE_TIMEOUT_S``) or with this process. OSError as ``WarmWorkers``."""
    global _prestarted
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    reader.add_argument("--runner")
    reader.add_argument("--direct_running_mode")
    reader.add_argument("--streaming", nargs="?", const="true")
    try:
        given, _ = reader.parse_known_args(list(beam_args))
    except argparse.ArgumentError:  # ``--runner`` without a value, say: Beam says what is wrong
        return False
    if (given.runner not in LOCAL_RUNNERS or given.direct_running_mode != "multi_processing"
            or given.streaming is not None):
        return False
    if _prestarted is None or _prestarted.ended():
        _prestarted = WarmWorkers()
    return True


def take_prestarted() -> WarmWorkers | None:
    """The parent ``prestart`` started, if it is still there to serve a run (it is then the caller's)."""
    global _prestarted
    warm, _prestarted = _prestarted, None
    return warm if warm is not None and not warm.ended() else None


def _stop(parent: subprocess.Popen[bytes], folder: str) -> None:
    """End the warm parent now (its forked workers are processes of their own) and remove its socket."""
    with contextlib.suppress(OSError):
        parent.stdin.close()  # type: ignore[union-attr]
    with contextlib.suppress(OSError):
        parent.kill()
    parent.wait()
    shutil.rmtree(folder, ignore_errors=True)


def serve(listener_fd: int, folder: str, idle_timeout_s: float, preload: list[str]) -> None:
    """The warm parent: import ``preload``, then fork a worker per attaching command until stdin closes (or none
    comes within ``idle_timeout_s``); remove ``folder``, which holds the socket, as it ends.

    A parent that cannot import what it should, or that has come to run a second Python thread (which a fork would
    leave behind holding its locks), says so and ends: every command then starts Beam's cold worker."""
    listener = socket.socket(fileno=listener_fd)
    inherited = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}  # the workers'
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's (in whose process group this is) to act on
    signal.signal(signal.SIGTERM, _terminated)  # with its process group, say: the socket's folder still goes
    try:
        try:
            for name in preload:
                importlib.import_module(name)
        except Exception as exc:  # any import error: the workers start cold, the run goes on
            print(f"healthflow: worker processes start cold: the warm parent cannot import {name} "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        if threading.active_count() != 1:
            print(f"healthflow: worker processes start cold: importing {', '.join(preload)} started threads "
                  f"({', '.join(t.name for t in threading.enumerate())}), which forking would leave holding their "
                  "locks", file=sys.stderr)
            return
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers report over their connection: none is waited for
        _fork_workers(listener, idle_timeout_s, inherited)  # returns here only: a worker never leaves _run_worker
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _fork_workers(listener: socket.socket, idle_timeout_s: float, handlers: dict[int, Any]) -> None:
    """Fork a worker per attaching command until stdin closes; until the runner writes to stdin (its run began) or a
    worker is forked, for at most ``idle_timeout_s``. A worker gets the signal ``handlers`` the parent inherited."""
    claimed = False
    with selectors.DefaultSelector() as selector:
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "runner")
        selector.register(listener, selectors.EVENT_READ, "attach")
        while True:
            ready = selector.select(None if claimed else idle_timeout_s)
            if not ready:  # asked for nothing: its runner never ran
                return
            for key, _ in ready:
                if key.data == "runner":
                    if not os.read(sys.stdin.fileno(), 4096):  # the run is over (or the runner gone)
                        return
                    claimed = True  # a run began: no idle end
                    continue
                try:
                    connection, _ = listener.accept()
                except OSError:  # no descriptor to spare, say: the commands to come start cold workers
                    return
                try:
                    connection.settimeout(REQUEST_TIMEOUT_S)
                    request = _receive(connection)
                    for stream in (sys.stdout, sys.stderr):
                        stream.flush()  # written once, not once more by each worker
                    with warnings.catch_warnings():
                        # Python 3.12+ warns of any other OS thread; those here are C libraries' that prepare for fork
                        warnings.simplefilter("ignore", DeprecationWarning)
                        child = os.fork()
                except (OSError, ValueError):  # the command went, or no fork: it starts a cold worker
                    connection.close()
                    continue
                if child == 0:
                    try:
                        selector.close()
                        listener.close()
                        _run_worker(connection, request, handlers)  # ends the process
                    finally:
                        os._exit(1)  # nothing unwinds into this loop's copy in the worker
                claimed = True
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


def _run_worker(connection: socket.socket, request: dict, handlers: dict[int, Any]) -> None:
    """In the forked worker: become the worker Beam started, end as it would, report its exit status, exit."""
    try:
        connection.settimeout(None)
        connection.sendall(STARTED)
    except OSError:  # the command gave up waiting (and started a cold worker): nothing to do
        os._exit(1)
    code = 1
    attached = threading.Event()  # set while the command is waited on: its ending ends this worker
    attached.set()
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for number, handler in handlers.items():  # as a cold worker starts: Ctrl-C raises, unless ignored by then
            signal.signal(number, handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the runner's pipe is the warm parent's, not a worker's
        os.close(devnull)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        threading.Thread(target=_end_with_command, args=(connection, attached), daemon=True,
                         name="healthflow-attached").start()
        from apache_beam.runners.worker import sdk_worker_main

        sys.argv = [sdk_worker_main.__file__]  # as a cold worker's: PipelineOptions() reads no stray arguments
        sdk_worker_main.main([])
        code = 0
    except SystemExit as exc:  # as the interpreter exits on it
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # as a cold worker reports it: a traceback, a failed status
        traceback.print_exc()
    finally:
        _end_as_the_interpreter_would()
        attached.clear()  # the command is not to end this worker before it has its status
        with contextlib.suppress(OSError):
            connection.sendall(bytes([code & 0xFF]))
        os._exit(code & 0xFF)


def _end_as_the_interpreter_would() -> None:
    """What a cold worker does on its way out, but tearing down modules: the interpreter's own thread shutdown (its
    hooks wake idle pool threads, then other threads but daemons are joined), the ``atexit`` handlers (a failing one
    is printed; the status stays), its streams flushed."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
    except BaseException:  # as the interpreter does: printed, and the atexit handlers still run
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _end_with_command(connection: socket.socket, attached: threading.Event) -> None:
    """End this worker when the command Beam started for it ends (killed, say): it would otherwise outlive it."""
    with contextlib.suppress(OSError):
        while connection.recv(1):
            pass
    if attached.is_set():
        os._exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), [name for name in sys.argv[5].split(",") if name])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # nothing to finalize: skip tearing down every module the workers were forked with
