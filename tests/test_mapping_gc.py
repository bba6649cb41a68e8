"""The garbage collector fits mapping: a worker raises its young-generation threshold once (the mapping DoFns'
setup), and the in-memory loop raises it only while it runs."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from core.raw import RawMessage, RawPayload
from schemas.serde import encode_raw
from transforms.normalize import MAPPING_GC_THRESHOLD, normalize_in_memory

ROOT = Path(__file__).resolve().parents[1]


def test_a_mapping_worker_collects_young_objects_less_often_and_sets_setup_aside():
    probe = ("import gc; from transforms.normalize import SplitByUser, tune_gc_for_mapping; SplitByUser().setup(); "
             "frozen = gc.get_freeze_count(); tune_gc_for_mapping(); "
             "print(gc.get_threshold()[0], frozen > 0, gc.get_freeze_count() == frozen)")
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.split() == [str(MAPPING_GC_THRESHOLD), "True", "True"]  # once: a second setup is a no-op


def test_the_in_memory_loop_gives_the_collector_back_as_it_found_it():
    before = gc.get_threshold()
    seen = []

    def messages():
        seen.append(gc.get_threshold()[0])
        epoch = b'{"epochs": [{"userId": "u", "startTimeInSeconds": 1710162000}]}'
        yield RawMessage(encode_raw(RawPayload("garmin", epoch)), {"partition": 0, "offset": 0})

    events, failures = normalize_in_memory(messages())
    assert len(events) == 1 and not failures
    assert seen == [MAPPING_GC_THRESHOLD] and gc.get_threshold() == before
