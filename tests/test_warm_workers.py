"""The multi-process local runner's workers are forked by a warm parent (``pipelines.warm_workers``), start cold
when it cannot serve, and end with the command Beam started for them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apache_beam as beam
import pytest
from test_streaming import wait_for

from pipelines import warm_workers
from pipelines.launch import WarmMultiProcessRunner, make_pipeline
from pipelines.warm_workers import WarmWorkers

MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


PARENT = "pipelines.warm_workers serve"  # the warm parent's command line


@pytest.fixture
def temp_folder(monkeypatch):
    """A temp folder of this test's own (short enough for a socket path), for the warm parent's socket."""
    folder = Path(tempfile.mkdtemp(prefix="hf-ww-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_and_name_parents(tmp_path: Path) -> tuple[list[int], set[str], set[int]]:
    """Run a small graph on two worker processes: its results, each worker's parent command line and pid. Each
    worker registers an ``atexit`` handler that leaves a file named by its pid in ``tmp_path / "atexit"``."""
    out, marks = tmp_path / "out", tmp_path / "atexit"
    marks.mkdir()
    pipeline = make_pipeline(MULTI_PROCESS)
    assert isinstance(pipeline.runner, WarmMultiProcessRunner)
    (pipeline
     | beam.Create(list(range(40)))
     | beam.Reshuffle()
     | beam.Map(lambda n, marks=str(marks): __import__("atexit").register(
         lambda: Path(marks, str(os.getpid())).touch()) and n)
     | beam.Map(lambda n: f"{n * n}\t{os.getpid()}\t"
                f"{Path(f'/proc/{os.getppid()}/cmdline').read_bytes().replace(bytes(1), b' ').decode()}")
     | beam.io.WriteToText(str(out)))
    pipeline.run().wait_until_finish()
    rows = [line.split("\t") for path in tmp_path.glob("out*") for line in path.read_text().splitlines()]
    return sorted(int(square) for square, _, _ in rows), {parent for _, _, parent in rows}, {int(p) for _, p, _ in rows}


def test_workers_are_forked_by_the_warm_parent_and_end_as_cold_ones(tmp_path, temp_folder):
    squares, parents, workers = run_and_name_parents(tmp_path)
    assert squares == [n * n for n in range(40)]
    assert len(workers) == 2 and os.getpid() not in workers
    assert all(PARENT in parent for parent in parents), parents
    assert {int(mark.name) for mark in (tmp_path / "atexit").iterdir()} == workers  # their atexit handlers ran
    assert not list(temp_folder.iterdir())  # the socket's folder is gone


def test_workers_start_cold_when_the_warm_parent_cannot_serve(tmp_path, temp_folder, monkeypatch, capfd):
    monkeypatch.setattr(warm_workers, "PRELOAD", ("healthflow_no_such_module",))
    squares, parents, workers = run_and_name_parents(tmp_path)
    assert squares == [n * n for n in range(40)]
    assert not any(PARENT in parent for parent in parents), parents
    assert {int(mark.name) for mark in (tmp_path / "atexit").iterdir()} == workers
    assert ("worker processes start cold: the warm parent cannot import healthflow_no_such_module"
            in capfd.readouterr().err)


def test_a_prestarted_parent_serves_the_next_multi_process_run(tmp_path, temp_folder, monkeypatch):
    monkeypatch.setattr(warm_workers, "_prestarted", None)
    for other in (["--direct_num_workers=2"], [*MULTI_PROCESS, "--streaming"], [*MULTI_PROCESS, "--runner=Dataflow"],
                  [*MULTI_PROCESS, "--runner"]):  # the last is Beam's to refuse (no SystemExit here)
        assert not warm_workers.prestart(other)  # not the local multi-process runner: nothing started
    assert warm_workers._prestarted is None
    assert warm_workers.prestart(["--runner", "DirectRunner", "--direct_running_mode", "multi_processing"])
    prestarted = warm_workers._prestarted

    def command_line() -> str:  # empty until the exec has set it up, which may be just after Popen returns
        return Path(f"/proc/{prestarted.pid}/cmdline").read_bytes().replace(bytes(1), b" ").decode()

    wait_for(lambda: PARENT in command_line(), 10)
    parent = command_line()
    squares, parents, _ = run_and_name_parents(tmp_path)
    assert squares == [n * n for n in range(40)]
    assert parents == {parent}  # the run's workers were forked by the prestarted parent
    assert warm_workers._prestarted is None  # taken by the run, and ended with it
    wait_for(prestarted.ended, 10)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _state(pid: int) -> str:
    """A process's state letter (``Z``: ended, not yet reaped); "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def test_a_worker_ends_with_the_command_beam_started_for_it(temp_folder):
    """A worker whose runner never answers (a control endpoint that accepts and stays silent) is stopped by killing
    its command, as Beam does on failure: it must not live on, forked and alone."""
    warm = WarmWorkers()
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        env = dict(os.environ, CONTROL_API_SERVICE_DESCRIPTOR=f'url: "127.0.0.1:{silent.getsockname()[1]}"',
                   PIPELINE_OPTIONS="{}", WORKER_ID="worker_test")
        command = subprocess.Popen(warm.command, shell=True, env=env, start_new_session=True)
        parent = warm.pid
        wait_for(lambda: children(parent), timeout_s=30)
        (worker,) = children(parent)
        time.sleep(0.5)
        assert command.poll() is None and Path(f"/proc/{worker}").exists()  # waiting on the silent endpoint
        os.killpg(command.pid, signal.SIGKILL)
        command.wait()
        wait_for(lambda: not Path(f"/proc/{worker}").exists() or _state(worker) == "Z", timeout_s=10)
    finally:
        silent.close()
        warm.close()


def test_a_command_reports_its_forked_worker_failing(temp_folder, capfd):
    """A worker that cannot start (no control endpoint given) fails its command, so Beam sees the failure; the
    worker was forked (its traceback is on the warm parent's stderr, not on the command's as a cold worker's)."""
    warm = WarmWorkers()
    try:
        env = {k: v for k, v in os.environ.items() if k != "CONTROL_API_SERVICE_DESCRIPTOR"}
        result = subprocess.run(warm.command, shell=True, env=env, timeout=60, capture_output=True)
        assert result.returncode == 1
        assert b"CONTROL_API_SERVICE_DESCRIPTOR" not in result.stderr
        seen: list[str] = []
        wait_for(lambda: seen.append(capfd.readouterr().err) or "KeyError: 'CONTROL_API_SERVICE_DESCRIPTOR'"
                 in "".join(seen), timeout_s=10)
    finally:
        warm.close()


def test_a_stuck_warm_parent_leaves_the_command_to_start_a_cold_worker(temp_folder):
    warm = WarmWorkers(started_timeout_s=1.0)
    try:
        os.kill(warm.pid, signal.SIGSTOP)
        env = {k: v for k, v in os.environ.items() if k != "CONTROL_API_SERVICE_DESCRIPTOR"}
        result = subprocess.run(warm.command, shell=True, env=env, timeout=60, capture_output=True)
        assert result.returncode == 1
        assert b"CONTROL_API_SERVICE_DESCRIPTOR" in result.stderr  # the cold worker's own traceback
    finally:
        os.kill(warm.pid, signal.SIGCONT)
        warm.close()


@pytest.mark.parametrize("end", ["close", "collect", "idle", "terminated"])
def test_the_warm_parent_ends_with_its_run_or_idle(end, temp_folder):
    warm = WarmWorkers(idle_timeout_s=0.5 if end == "idle" else 60)
    pid = warm.pid
    if end == "close":
        warm.close()
    elif end == "collect":
        del warm
    elif end == "terminated":  # with its process group, say
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
    if end in ("idle", "terminated"):  # reaped: /proc shows an exiting process as a zombie before its C threads end
        wait_for(warm.ended, timeout_s=30)
        assert not list(temp_folder.iterdir())  # the parent removed its socket's folder itself
        assert not warm.claim()
        warm.close()
    assert not Path(f"/proc/{pid}").exists()
    assert not list(temp_folder.iterdir())  # its socket's folder is gone


def test_a_claimed_parent_does_not_end_idle(temp_folder):
    warm = WarmWorkers(idle_timeout_s=0.5)
    try:
        assert warm.claim()
        time.sleep(3)  # its imports (~1.3 s) and well past the idle timeout
        assert warm.claim() and _state(warm.pid) not in ("", "Z")
    finally:
        warm.close()


def test_the_warm_parent_of_a_killed_runner_ends_and_removes_its_socket(temp_folder):
    runner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipelines.warm_workers import WarmWorkers; "
         "w = WarmWorkers(); print(w.pid, flush=True); time.sleep(120)"],
        env=dict(os.environ, TMPDIR=str(temp_folder)), stdout=subprocess.PIPE, text=True)
    parent = int(runner.stdout.readline())
    assert list(temp_folder.iterdir())  # the socket's folder
    runner.kill()
    runner.wait()
    wait_for(lambda: not Path(f"/proc/{parent}").exists() or _state(parent) == "Z", timeout_s=30)
    wait_for(lambda: not list(temp_folder.iterdir()), timeout_s=5)
