"""A private PostgreSQL cluster on a free loopback port that a test may stop and start (an outage), without touching
the shared server on 5432.

    with PrivatePostgres() as pg:          # initdb into a temporary folder, then start
        url = pg.url("postgres")           # postgresql://postgres@127.0.0.1:PORT/postgres (trust)
        pg.stop()                          # the database is down: connections are refused
        pg.start()                         # back, same port, same data

Fixture ``private_postgres`` (function scope) yields a running one. Built from /usr/lib/postgresql/15/bin (or
``$PG_BIN``); when running as root the cluster is owned by and run as the ``postgres`` system user, which initdb
requires.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.embedded import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary folder, trust authentication, listening on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="healthflow-pg-"))
        self.data = self.folder / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.folder, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True, cwd=self.folder, timeout=120)

    def init(self) -> PrivatePostgres:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: as a crash would)."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return subprocess.run([*self._as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True, cwd=self.folder).returncode == 0

    def close(self) -> None:
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        self.init().start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL cluster (see ``PrivatePostgres``), removed after the test."""
    with PrivatePostgres() as running:
        yield running
