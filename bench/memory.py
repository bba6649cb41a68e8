"""Peak memory of the files → SQL + object store pipeline, each input size in a fresh process.

``python -m bench.memory --users 300`` writes the simulated raw events to a file (streamed, never all in memory),
prints ``ready``, runs the batch pipeline (SQLite + an object store folder) and prints its summary as one JSON line.
``peak_rss`` runs that command and samples the resident memory of its whole process tree (the process and every
descendant, from /proc) every ``interval_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after ``pid (comm)``: state, ppid, ... (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, frontier = {pid}, [pid]
    while frontier:
        below = [child for child in children.get(frontier.pop(), ()) if child not in tree]
        tree.update(below)
        frontier.extend(below)
    return tree


def resident(pids: set[int]) -> int:
    """Resident bytes of ``pids`` summed (the rss field of /proc/PID/stat; ended processes count 0)."""
    return sum(int(fields[21]) * PAGE for pid in pids if (fields := _stat(pid)) is not None)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    return resident(descendants(pid))


class RssSampler:
    """Samples the resident bytes of ``pid``'s process tree every ``interval_s`` on a thread; ``peak`` is the
    largest sample. The tree is re-listed every ``rescan_s`` (a scan of /proc), its members read every sample."""

    def __init__(self, pid: int, interval_s: float = 0.05, rescan_s: float = 0.5) -> None:
        self.pid, self.interval_s, self.rescan_s = pid, interval_s, rescan_s
        self.peak, self.last, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rss {pid}")

    def _run(self) -> None:
        tree, rescan_at = {self.pid}, 0.0
        while True:
            if time.monotonic() >= rescan_at:
                tree, rescan_at = descendants(self.pid), time.monotonic() + self.rescan_s
            self.last = resident(tree)
            self.peak, self.samples = max(self.peak, self.last), self.samples + 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Memory:
    """One pipeline run in a fresh process: peak and start (after imports and data, before the run) RSS in MB."""

    users: int
    raw_events: int
    peak_mb: float
    start_mb: float
    seconds: float  # the pipeline's own time (run_batch)
    samples: int
    summary: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def peak_rss(users: int, days: int, beam_args: Sequence[str] = (), interval_s: float = 0.05,
             timeout_s: float = 1800.0) -> Memory:
    """Run ``python -m bench.memory`` for ``users`` × ``days`` in a fresh process, sampling its tree's RSS."""
    command = [sys.executable, "-m", "bench.memory", "--users", str(users), "--days", str(days),
               *(f"--beam-arg={a}" for a in beam_args)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    start_mb, result = 0.0, None
    watchdog = threading.Timer(timeout_s, process.kill)
    watchdog.start()
    assert process.stdout is not None
    try:
        with RssSampler(process.pid, interval_s) as sampler:
            for line in process.stdout:  # ends when the child closes stdout (it exits)
                if line.strip() == "ready":
                    start_mb = tree_rss(process.pid) / MB
                elif line.startswith("{"):
                    result = json.loads(line)
            code = process.wait()
    finally:
        watchdog.cancel()
    if code != 0 or result is None:
        raise RuntimeError(f"bench.memory --users {users} failed (exit code {code})")
    return Memory(users, result["raw_events"], sampler.peak / MB, start_mb, result["seconds"], sampler.samples,
                  result["summary"])


def main(argv: list[str] | None = None) -> None:
    """Generate the input file, then run files → SQLite + object store once (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--beam-arg", action="append", default=[], help="a Beam argument for run_batch (repeat)")
    args = parser.parse_args(argv)

    from core.logs import configure_logging
    from pipelines.demo_data import Simulator
    from pipelines.normalize import FileSource, NormalizeJob, run_batch
    from sinks.object_store import ObjectStoreSink
    from sinks.sql import SqlSink

    configure_logging()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = work / "raw.jsonl"
        count = 0
        with raw.open("w") as handle:
            for payload in Simulator(args.users, args.days).payloads():
                handle.write(raw_line(payload) + "\n")
                count += 1
        print("ready", flush=True)
        summary = run_batch(NormalizeJob(FileSource(str(raw)),
                                         [SqlSink("sqlite", f"sqlite:///{work / 'out.db'}"),
                                          ObjectStoreSink("object_store", str(work / "objects"))],
                                         str(work / "dlq"), state_url=f"sqlite:///{work / 'state.db'}"),
                            args.beam_arg)
        print(json.dumps({"raw_events": count, "seconds": summary.seconds, "summary": summary.counters}), flush=True)


def raw_line(payload) -> str:
    """One raw event as a line of the files source."""
    return json.dumps({"provider": payload.provider, "kind": payload.kind, "user_id": payload.user_id,
                       "received_at": payload.received_at_ms, "payload": payload.payload.decode(errors="replace")})


if __name__ == "__main__":
    main()
