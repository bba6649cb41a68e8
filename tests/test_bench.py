"""The bench's cheap parts: the RSS sampler of a process tree, the drain arithmetic, the JSON document and targets."""

from __future__ import annotations

import itertools
import json
import math
import resource
import subprocess
import sys
import time

import pytest

from bench import results, streaming
from bench.memory import MB, RssSampler, tree_rss

CHILD = 120  # MB a grandchild holds
PARENT = 60  # MB its parent holds


def test_the_sampler_sums_a_process_and_its_children():
    script = ("import subprocess, sys, time\n"
              f"held = b'x' * ({PARENT} << 20)\n"
              "child = subprocess.Popen([sys.executable, '-c', "
              f"\"import sys, time; held = b'x' * ({CHILD} << 20); print('up', flush=True); time.sleep(5)\"], "
              "stdout=subprocess.PIPE, text=True)\n"
              "child.stdout.readline()\n"
              "print('ready', flush=True)\n"
              "time.sleep(1)\n"
              "child.kill()\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    with RssSampler(process.pid, interval_s=0.02, rescan_s=0.1) as sampler:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        during = tree_rss(process.pid)
        process.wait(timeout=20)
    assert during >= (CHILD + PARENT) * MB  # both processes counted
    assert sampler.peak >= (CHILD + PARENT) * MB
    assert sampler.peak < (CHILD + PARENT) * MB + 200 * MB  # nothing else (two interpreters)
    assert sampler.samples >= 5
    assert tree_rss(process.pid) == 0  # gone


def test_a_drain_reports_the_rate_after_the_first_ended_message(monkeypatch):
    monkeypatch.setattr(streaming, "POLL_S", 0.01)
    counts = itertools.chain([0, 0, 100], itertools.count(200, 100))
    started = time.perf_counter()
    figures = streaming._watch("kafka", 1000, lambda: min(next(counts), 1000), started, 0.1, timeout_s=30)
    assert figures.first_ended == 100 and figures.ended == 1000
    assert figures.startup_s < figures.total_s
    after_s = figures.total_s - figures.startup_s
    assert figures.rate == pytest.approx(900 / after_s)
    assert figures.rate_with_startup == pytest.approx(1000 / figures.total_s)


def test_a_drain_that_stalls_is_not_measured(monkeypatch):
    monkeypatch.setattr(streaming, "POLL_S", 0.01)
    with pytest.raises(RuntimeError, match="10 of 1,000"):
        streaming._watch("pubsub", 1000, lambda: 10, time.perf_counter(), 0.1, timeout_s=0.1)


def _document() -> dict:
    doc = results.new_document(300, 4, quick=False)
    results.add_rate(doc, "floor.json", "floor", 33_500, 2.0)  # half the reference machine's floor
    results.add_rate(doc, "pipeline.files", "files", 6_000, 2.0, vs_mapper_loop=1.2)  # 3,000/s → 6,000/s there
    results.add_rate(doc, "destination.webhook", "webhook", 1_000, 1.0)
    doc["figures"]["workers"] = {"label": "workers", "speedup": 1.7}
    results.add_missing(doc, "memory", "memory", "boom")
    return doc


def test_targets_normalize_rates_to_the_reference_floor_and_keep_ratios_as_measured():
    rows = {row["label"]: row for row in results.evaluate_targets(_document())}
    files = rows["files → SQL + object store, raw events/s"]
    assert files["measured"] == 3_000 and files["normalized"] == pytest.approx(6_000) and files["met"] is True
    assert rows["stretch: end to end (files → SQL + object store), raw events/s"]["met"] is False
    assert rows["stretch: pipeline time / bare mapper loop time (files → SQL + objects)"]["met"] is True
    assert rows["two workers vs one (speed-up, one input file, 1x input)"]["met"] is True
    assert rows["two workers vs one (speed-up, one input file, 4x input)"]["met"] is None  # not measured
    memory = rows["peak RSS at 10x input / at 1x"]
    assert memory["met"] is None and memory["not_measured"] == "boom"
    assert rows["topic → webhook + SQL + objects, batch (Kafka), raw events/s"]["met"] is None


def test_the_document_is_json_with_its_commit_and_machine_and_nan_as_null(tmp_path):
    doc = _document()
    doc["figures"]["latency.kafka"] = {"label": "latency", "p50_ms": math.nan}
    path = results.write_json(doc, tmp_path / "bench.json")
    back = json.loads(path.read_text())
    assert back["figures"]["latency.kafka"]["p50_ms"] is None
    assert back["machine"]["cpus"] >= 1 and back["machine"]["python"]
    assert back["commit"] is None or len(back["commit"]) == 40
    assert back["data"] == {"users": 300, "days": 4}


def test_compare_gives_new_over_old_and_relative_to_each_runs_floor():
    old, new = _document(), _document()
    results.add_rate(new, "floor.json", "floor", 33_500, 1.0)  # a machine twice as fast...
    results.add_rate(new, "pipeline.files", "files", 6_000, 1.0)  # ...and the pipeline twice as fast: no change
    rows = {row["name"]: row for row in results.compare(old, new)}
    assert rows["pipeline.files rate"]["ratio"] == pytest.approx(2.0)
    assert rows["pipeline.files rate"]["floor_ratio"] == pytest.approx(1.0)
    assert rows["destination.webhook rate"]["floor_ratio"] == pytest.approx(0.5)
    assert rows["workers speedup"]["ratio"] == pytest.approx(1.0)
    assert "memory ratio" not in rows


def test_a_run_notes_its_user_and_kernel_cpu_and_what_a_new_file_cost_before_it(tmp_path):
    from bench.run import NEW_FILE_PROBES, _costs, _note

    figure = {}
    with _costs(tmp_path, figure):
        deadline = resource.getrusage(resource.RUSAGE_SELF).ru_utime + 0.05
        while resource.getrusage(resource.RUSAGE_SELF).ru_utime < deadline:  # user CPU
            pass
        for n in range(300):  # kernel CPU: files made and removed
            (tmp_path / f"{n}").write_bytes(b"x")
            (tmp_path / f"{n}").unlink()
    assert figure["cpu_user_s"] >= 0.04 and figure["cpu_kernel_s"] > 0
    assert 0 < figure["new_file_us"] < 1e6
    (probes,) = tmp_path.glob("new-files-*")  # kept: deleting them would slow the run after the probe
    assert len(list(probes.iterdir())) == NEW_FILE_PROBES
    assert "s kernel; a new file" in _note("pipeline.files", dict(figure, vs_mapper_loop=1.3))
