"""Avro schemas: the single source of truth for every shape healthflow reads, emits or keeps.

Layout: ``avro/models/<model>.avsc`` (Terra-compatible data models, version 2022-03-16, one
sub-namespace each) and ``avro/envelopes/*.avsc`` (raw event, normalized event, dead letter), with the earlier versions
of an envelope that messages may still be written with in ``avro/envelopes/history/<name>.<n>.avsc``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro

from core.events import DATA_MODEL_VERSION as DATA_MODEL_VERSION

AVRO_DIR = Path(__file__).parent / "avro"
MODEL_TYPES = ("activity", "sleep", "daily", "body", "menstruation", "nutrition", "athlete")
MODELS_NAMESPACE = "healthflow.models.v2022_03_16"


def model_fullname(model_type: str) -> str:
    """Fully qualified Avro name of a model record, e.g. ``...sleep.Sleep``."""
    return f"{MODELS_NAMESPACE}.{model_type}.{model_type.capitalize()}"


@cache
def _named_schemas() -> dict[str, Any]:
    named: dict[str, Any] = {}
    for model_type in MODEL_TYPES:
        fastavro.parse_schema(_read("models", model_type), named_schemas=named)
    return named


def _read(folder: str, name: str) -> dict[str, Any]:
    return json.loads((AVRO_DIR / folder / f"{name}.avsc").read_text())


@cache
def model_schema(model_type: str) -> dict[str, Any]:
    """Parsed Avro schema of one normalized model (``activity``, ``sleep``, ...)."""
    if model_type not in MODEL_TYPES:
        raise KeyError(f"unknown model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    return fastavro.parse_schema(_read("models", model_type), named_schemas={})


@cache
def envelope_schema(name: str) -> dict[str, Any]:
    """Parsed Avro schema of an envelope: ``raw_event``, ``normalized_event``, ``dead_letter``."""
    named = dict(_named_schemas())
    return fastavro.parse_schema(_read("envelopes", name), named_schemas=named)


@cache
def envelope_version(name: str, version: int) -> dict[str, Any]:
    """Parsed Avro schema of an earlier version of an envelope (``avro/envelopes/history/<name>.<version>.avsc``)."""
    named = dict(_named_schemas())
    return fastavro.parse_schema(_read("envelopes/history", f"{name}.{version}"), named_schemas=named)


@cache
def envelope_versions(name: str) -> tuple[dict[str, Any], ...]:
    """Every earlier version of an envelope kept in ``avro/envelopes/history``, oldest first."""
    numbers = sorted(int(path.stem.rsplit(".", 1)[1]) for path in (AVRO_DIR / "envelopes" / "history").glob(
        f"{name}.*.avsc"))
    return tuple(envelope_version(name, number) for number in numbers)
