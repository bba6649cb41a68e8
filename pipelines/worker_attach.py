"""The worker command Beam starts under ``pipelines.warm_workers``: standard library only (run as ``python -I -S``).

Hands this process's environment and folder to the warm parent listening at ``argv[1]``, which forks a worker for
it, then exits with that worker's exit status. When no warm parent answers within ``argv[2]`` seconds, or it goes
before forking, this process becomes Beam's own cold worker instead
(``python -m apache_beam.runners.worker.sdk_worker_main``)."""

import json
import os
import socket
import sys

STARTED = b"S"  # pipelines.warm_workers.STARTED
LENGTH_BYTES = 8  # pipelines.warm_workers.LENGTH_BYTES


def cold_worker() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"])


def main() -> None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(float(sys.argv[2]))  # a parent that is stuck (stopped, importing forever): start cold
    try:
        connection.connect(sys.argv[1])
        request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}).encode()
        connection.sendall(len(request).to_bytes(LENGTH_BYTES, "big") + request)
        started = connection.recv(1)
    except OSError:
        started = b""
    if started != STARTED:
        connection.close()
        cold_worker()
    connection.settimeout(None)  # the worker runs as long as the run needs it
    status = connection.recv(1)
    sys.exit(status[0] if status else 1)  # no status: the worker died without reporting one


if __name__ == "__main__":
    main()
