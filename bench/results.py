"""The bench's figures as one JSON document, the targets they are held to, and comparison with an earlier run.

Every figure has a stable key (``pipeline.files``, ``destination.webhook``, ``memory.10x``...) so runs on different
commits can be compared. A figure that could not be measured is kept with its reason (``not_measured``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOOR_REFERENCE = 33_500.0  # payloads/s of the json floor on the machine the absolute targets were set on
SCHEMA = 1


def git(*args: str) -> str | None:
    """``git args`` in the repository (None when git or the repository is unavailable)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def new_document(users: int, days: int, quick: bool) -> dict[str, Any]:
    """The document's header: commit, date, machine, and the data sizes (raw/normalized counts are added later)."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "schema": SCHEMA,
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "argv": sys.argv[1:],
        "quick": quick,
        "data": {"users": users, "days": days},
        "figures": {},
        "targets": [],
    }


def add_rate(doc: dict[str, Any], key: str, label: str, items: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """Record ``items`` in ``seconds`` (rate = items/s) under ``key``; returns the figure."""
    figure = {"label": label, "items": items, "seconds": seconds,
              "rate": items / seconds if seconds > 0 else None, **extra}
    doc["figures"][key] = figure
    return figure


def add_missing(doc: dict[str, Any], key: str, label: str, reason: str) -> None:
    doc["figures"][key] = {"label": label, "not_measured": reason}


def rate(doc: dict[str, Any], key: str) -> float | None:
    return doc["figures"].get(key, {}).get("rate")


def floor_rate(doc: dict[str, Any]) -> float | None:
    return rate(doc, "floor.json")


def normalized(doc: dict[str, Any], value: float | None) -> float | None:
    """``value`` (events/s) as it would be on the reference machine: × reference floor / this run's floor."""
    floor = floor_rate(doc)
    if value is None or not floor:
        return None
    return value * FLOOR_REFERENCE / floor


@dataclass(frozen=True)
class Target:
    key: str  # the figure it reads
    label: str
    kind: str  # "rate" (events/s, compared after normalizing to the reference floor) or "ratio" (as measured)
    op: str  # ">=" or "<="
    goal: float
    stretch: bool = False
    field: str = "rate"  # for ratios: which field of the figure


TARGETS = (
    Target("pipeline.files", "files → SQL + object store, raw events/s", "rate", ">=", 5_000),
    Target("pipeline.topic_batch", "topic → webhook + SQL + objects, batch (Kafka), raw events/s", "rate", ">=",
           3_000),
    Target("pipeline.topic_stream_kafka", "topic → webhook + SQL + objects, streaming (Kafka), raw events/s",
           "rate", ">=", 3_000),
    Target("pipeline.topic_stream_pubsub", "topic → webhook + SQL + objects, streaming (Pub/Sub), raw events/s",
           "rate", ">=", 3_000),
    Target("workers", "two workers vs one (speed-up, one input file, 1x input)", "ratio", ">=", 1.6, field="speedup"),
    Target("workers_4x", "two workers vs one (speed-up, one input file, 4x input)", "ratio", ">=", 1.6,
           field="speedup"),
    Target("memory", "peak RSS at 10x input / at 1x", "ratio", "<=", 1.5, field="ratio"),
    Target("pipeline.files", "stretch: end to end (files → SQL + object store), raw events/s", "rate", ">=", 10_000,
           stretch=True),
    Target("pipeline.files", "stretch: pipeline time / bare mapper loop time (files → SQL + objects)", "ratio",
           "<=", 1.3, stretch=True, field="vs_mapper_loop"),
    Target("destination.webhook", "stretch: webhook sink write path, events/s", "rate", ">=", 5_000, stretch=True),
)


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value, its normalized value (rates) and whether it is met; stored in ``doc``."""
    rows = []
    for target in TARGETS:
        figure = doc["figures"].get(target.key, {})
        measured = figure.get(target.field)
        compared = normalized(doc, measured) if target.kind == "rate" else measured
        met = None
        if compared is not None and not (isinstance(compared, float) and math.isnan(compared)):
            met = compared >= target.goal if target.op == ">=" else compared <= target.goal
        rows.append({"key": target.key, "label": target.label, "kind": target.kind, "op": target.op,
                     "goal": target.goal, "stretch": target.stretch, "measured": measured,
                     "normalized": compared if target.kind == "rate" else None, "met": met,
                     "not_measured": figure.get("not_measured") if measured is None else None})
    doc["targets"] = rows
    return rows


def scalars(doc: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """Comparable numbers of a document: name → (value, higher is better)."""
    out: dict[str, tuple[float, bool]] = {}
    for key, figure in doc.get("figures", {}).items():
        for field_name, higher in (("rate", True), ("rate_with_startup", True), ("speedup", True),
                                   ("peak_mb", False), ("ratio", False), ("p50_ms", False), ("p99_ms", False)):
            value = figure.get(field_name)
            if isinstance(value, int | float) and not math.isnan(value):
                out[f"{key} {field_name}"] = (float(value), higher)
    return out


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """new/old for every number both runs have; rates also relative to each run's own json floor (less noise)."""
    before, after = scalars(old), scalars(new)
    old_floor, new_floor = floor_rate(old), floor_rate(new)
    rows = []
    for name, (value, higher) in after.items():
        if name not in before or not before[name][0]:
            continue
        ratio = value / before[name][0]
        floor_ratio = None
        if name.endswith(" rate") and not name.startswith("floor.") and old_floor and new_floor:
            floor_ratio = ratio * old_floor / new_floor
        rows.append({"name": name, "old": before[name][0], "new": value, "ratio": ratio,
                     "floor_ratio": floor_ratio, "higher_is_better": higher})
    return rows


def write_json(doc: dict[str, Any], path: str | Path) -> Path:
    """Write ``doc`` (NaN as null) to ``path``; returns it."""
    target = Path(path)
    target.write_text(json.dumps(_finite(doc), indent=2, ensure_ascii=False) + "\n")
    return target


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
