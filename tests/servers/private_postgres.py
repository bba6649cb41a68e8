"""A private PostgreSQL cluster on a free loopback port, for faults that stop and restart the database.

``initdb`` + ``pg_ctl`` from the machine's PostgreSQL binaries (``/usr/lib/postgresql/<N>/bin``, or ``$PG_BIN``)
into a temporary folder: never the shared server on 5432. Trust authentication for the user ``postgres``, listening
on 127.0.0.1 only, no Unix socket outside the cluster's folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType


def postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (``$PG_BIN``, else the newest /usr/lib/postgresql/*/bin)."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries: install postgresql, or set PG_BIN to the folder with pg_ctl")
    return Path(found[-1]).parent


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``command`` as the ``postgres`` system user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    """``with PrivatePostgres() as pg: pg.database()`` → a fresh ``postgresql://postgres@127.0.0.1:PORT/NAME``.

    ``stop()`` and ``start()`` take the whole server down and bring it back on the same port with the same data
    (a clean shutdown, ``-m fast``: open connections are cut, as in a restart); ``close()`` removes the cluster.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.bin = postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="hf-private-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._initialized = False

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, timeout_s: float = 60.0) -> None:
        subprocess.run(_as_server_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                                        "-t", str(int(timeout_s)), *args]), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout_s + 10)

    def start(self) -> PrivatePostgres:
        if not self._initialized:
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres", "postgres")
            subprocess.run(_as_server_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A",
                                            "trust", "--no-sync", "-E", "UTF8"]), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.folder}'\nfsync = off\nmax_connections = 200\n")
            self._initialized = True
        self._pg_ctl("start", "-o", f"-p {self.port}")
        return self

    def stop(self) -> None:
        """Stop the server now (fast shutdown: clients are disconnected, committed data stays)."""
        if self.running:
            self._pg_ctl("stop", "-m", "fast")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def database(self, prefix: str = "hf") -> str:
        """Create a fresh database and return its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def wait_until_accepting(url: str, timeout_s: float = 30.0) -> None:
    """Block until ``url`` accepts a connection (or raise after ``timeout_s``)."""
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
