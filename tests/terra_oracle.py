"""Terra's official Python SDK (terra-python 1.1.0) as an external oracle for normalized records.

The SDK models accept any extra key (``extra="allow"``), so validation alone proves little:
``undeclared_keys`` walks ``model_fields`` recursively, by wire name (Fern ``FieldMetadata`` aliases
such as ``MET_data`` / ``TSS_data``), and ``extras`` asks pydantic what it could not place.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

import pydantic
from terra.core.serialization import FieldMetadata, convert_and_respect_annotation_metadata
from terra.types.activity import Activity
from terra.types.activity_event import ActivityEvent
from terra.types.athlete import Athlete
from terra.types.athlete_event import AthleteEvent
from terra.types.body import Body
from terra.types.body_event import BodyEvent
from terra.types.daily import Daily
from terra.types.daily_event import DailyEvent
from terra.types.menstruation import Menstruation
from terra.types.menstruation_event import MenstruationEvent
from terra.types.nutrition import Nutrition
from terra.types.nutrition_event import NutritionEvent
from terra.types.sleep import Sleep
from terra.types.sleep_event import SleepEvent

SDK_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "activity": Activity, "sleep": Sleep, "daily": Daily, "body": Body, "menstruation": Menstruation,
    "nutrition": Nutrition, "athlete": Athlete}
SDK_EVENTS: dict[str, type[pydantic.BaseModel]] = {
    "activity": ActivityEvent, "sleep": SleepEvent, "daily": DailyEvent, "body": BodyEvent,
    "menstruation": MenstruationEvent, "nutrition": NutritionEvent, "athlete": AthleteEvent}


# ----------------------------------------------------------------------------------------------------------------------
# the strict checker
# ----------------------------------------------------------------------------------------------------------------------
def wire_fields(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """``wire name → annotation``: the Fern alias when the field has one (``MET_data``), else its name."""
    fields = {}
    for name, info in model.model_fields.items():
        alias = next((m.alias for m in info.metadata if isinstance(m, FieldMetadata)), None)
        fields[alias or name] = info.annotation
    return fields


def nested_models(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """SDK models an annotation holds, through Optional / Union / List / Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    found: list[type[pydantic.BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in nested_models(arg) if m not in found]
    return found


def is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Dict, typing.Mapping):  # noqa: UP006
        return True
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(is_mapping(arg) for arg in typing.get_args(annotation))
    return annotation is typing.Any


def undeclared_keys(value: dict[str, Any], model: type[pydantic.BaseModel], path: str) -> list[str]:
    """Paths of every key in ``value`` (recursively) that the SDK ``model`` does not declare."""
    fields = wire_fields(model)
    problems: list[str] = []
    for key, child in value.items():
        if key not in fields:
            problems.append(f"{path}.{key}")
            continue
        items = child if isinstance(child, list) else [child]
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            where = f"{path}.{key}[{index}]" if isinstance(child, list) else f"{path}.{key}"
            candidates = nested_models(fields[key])
            if not candidates:
                if not is_mapping(fields[key]):
                    problems.append(f"{where}: an object where the SDK declares {fields[key]}")
                continue
            # a union of models: the record must fit one of them
            problems += min((undeclared_keys(item, m, where) for m in candidates), key=len)
    return problems


def extras(parsed: Any, path: str) -> Iterator[str]:
    """Second opinion from pydantic itself: keys that ended up in a parsed model's extras."""
    if isinstance(parsed, pydantic.BaseModel):
        for key in parsed.model_extra or {}:
            yield f"{path}.{key}"
        for name in type(parsed).model_fields:
            yield from extras(getattr(parsed, name), f"{path}.{name}")
    elif isinstance(parsed, list):
        for index, item in enumerate(parsed):
            yield from extras(item, f"{path}[{index}]")


def sdk_parse(model: type[pydantic.BaseModel], value: dict[str, Any]) -> pydantic.BaseModel:
    """Validate as the SDK reads a webhook body: wire aliases mapped to field names first."""
    return model.model_validate(convert_and_respect_annotation_metadata(object_=value, annotation=model,
                                                                        direction="read"))


def assert_terra_record(model_type: str, record: dict[str, Any]) -> None:
    """The record parses with its SDK model and uses only keys the SDK declares."""
    model = SDK_MODELS[model_type]
    problems = undeclared_keys(record, model, model_type)
    parsed = sdk_parse(model, record)
    problems += list(extras(parsed, model_type))
    assert not problems, f"keys Terra's SDK does not declare: {problems}"
