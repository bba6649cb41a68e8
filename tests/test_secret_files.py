"""Files holding secrets are readable by their owner only: the control plane's SQLite store (Fernet-encrypted
provider tokens, API-key hashes) and its SQLite companions are created 0600, and tightened to 0600 when found
more open."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.fernet import Fernet

from controlplane.auth.control_plane import ControlPlane

EXE = shutil.which("healthflow") or str(Path(sys.executable).with_name("healthflow"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_cli_creates_the_state_store_0600(tmp_path):
    state = tmp_path / "fresh" / "state.db"
    env = {**os.environ, "HEALTHFLOW_SECRET_KEY": Fernet.generate_key().decode()}
    done = subprocess.run([EXE, "developers", "create", "--state", f"sqlite:///{state}"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert mode(state) == 0o600
    assert mode(state.parent) == 0o700
    for companion in state.parent.glob("state.db-*"):
        assert mode(companion) == 0o600, companion


def test_a_store_found_readable_by_others_is_tightened(tmp_path):
    state = tmp_path / "state.db"
    old_umask = os.umask(0o022)
    try:
        with ControlPlane(f"sqlite:///{state}", Fernet.generate_key().decode()) as plane:
            plane.create_developer(dev_id="lab", name="lab")
        state.chmod(0o644)
        with ControlPlane(f"sqlite:///{state}", Fernet.generate_key().decode()) as plane:
            plane.create_api_key("lab")
            companions = list(tmp_path.glob("state.db-*"))
            assert all(mode(c) == 0o600 for c in companions), [(c.name, oct(mode(c))) for c in companions]
    finally:
        os.umask(old_umask)
    assert mode(state) == 0o600


def test_a_pipeline_run_creates_its_record_state_and_sqlite_destination_0600(tmp_path):
    """Record state and a SQLite destination hold health data: a database the pipeline creates is 0600."""
    from bench.memory import raw_line
    from pipelines.demo_data import Simulator
    from pipelines.normalize import FileSource, NormalizeJob, run_batch
    from sinks.sql import SqlSink

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(raw_line(payload) + "\n" for payload in Simulator(2, 1).payloads()))
    state, out = tmp_path / "state.db", tmp_path / "out.db"
    old_umask = os.umask(0o022)
    try:
        summary = run_batch(NormalizeJob(FileSource(str(raw)), [SqlSink("sql", f"sqlite:///{out}")],
                                         str(tmp_path / "dlq"), state_url=f"sqlite:///{state}"))
    finally:
        os.umask(old_umask)
    assert summary.get("delivered:sql") > 0
    assert mode(state) == 0o600
    assert mode(out) == 0o600
