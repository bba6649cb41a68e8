"""Bootstrap the normalized-model Avro files from Terra's official SDK (terra-python).

Run once per data-model version; afterwards the `.avsc` files under `schemas/avro/` are the
single source of truth and evolve by hand under the compatibility gate (tests/test_schemas.py).
Usage: python -m schemas.tools.generate_models [--out schemas/avro/models]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import typing
from pathlib import Path

import pydantic

MODELS = {
    "Activity": "terra.types.activity",
    "Sleep": "terra.types.sleep",
    "Daily": "terra.types.daily",
    "Body": "terra.types.body",
    "Menstruation": "terra.types.menstruation",
    "Nutrition": "terra.types.nutrition",
    "Athlete": "terra.types.athlete",
}
NAMESPACE = "healthflow.models.v2022_03_16"  # one sub-namespace per model keeps shared names apart
# The SDK types Terra's integer enums as `float` aliases; on the wire they are integers.
INT_ENUM_ALIASES = {
    "ActivityLevel", "Breath", "Had", "HeartRateContext", "High", "Hurling", "Inconclusive",
    "Indeterminate", "Low", "Muscle", "NutritionUnits", "Other", "RecoveryLevel", "SleepLevel",
    "Snack", "TimestampLocalization", "TrendArrow", "UploadType",
}
# Enums whose SDK and OpenAPI types disagree (string in the SDK, integer in the 2026 OpenAPI).
INT_OR_STRING = {("MenstruationData", "current_phase")}


def _annotation_sources(model: type) -> dict[str, str]:
    source = inspect.getsource(model)
    return {m.group(1): m.group(2) for m in re.finditer(r"^    (\w+): (.+?)(?: = |$)", source, re.M)}


def _doc(field: pydantic.fields.FieldInfo) -> str | None:
    return (field.description or "").strip() or None


class Generator:
    def __init__(self) -> None:
        self.defined: set[str] = set()

    def record(self, model: type) -> dict | str:
        name = model.__name__
        if name in self.defined:
            return name
        self.defined.add(name)
        sources = _annotation_sources(model)
        fields = []
        for attr, info in model.model_fields.items():
            wire_name = attr
            meta = typing.get_args(info.annotation)
            for extra in info.metadata + [m for m in meta if not isinstance(m, type)]:
                alias = getattr(extra, "alias", None)
                if alias:
                    wire_name = alias
            src = sources.get(attr, "")
            for m in re.finditer(r"FieldMetadata\(alias=\"(\w+)\"\)", src):
                wire_name = m.group(1)
            avro_type = self.type_of(info.annotation, src, (name, attr))
            required = info.is_required()
            field: dict = {"name": wire_name}
            if required:
                field["type"] = avro_type
            else:
                field["type"] = ["null"] + (avro_type if isinstance(avro_type, list) else [avro_type])
                field["default"] = None
            doc = _doc(info)
            if doc:
                field["doc"] = doc
            fields.append(field)
        out = {"type": "record", "name": name, "fields": fields}
        doc = (model.__doc__ or "").strip()
        if doc:
            out["doc"] = doc
        return out

    def type_of(self, annotation, src: str, where: tuple[str, str]):
        if where in INT_OR_STRING:
            return ["int", "string"]
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            return self.type_of(args[0], src, where)
        if origin is typing.Union:
            real = [a for a in args if a is not type(None)]
            literal = [a for a in real if typing.get_origin(a) is typing.Literal]
            if literal:
                return "string"
            return self.type_of(real[0], src, where)
        if origin in (list, list):
            item_src = src[src.find("[") + 1:] if "List[" in src else src
            return {"type": "array", "items": self.type_of(args[0], item_src, where)}
        if origin in (dict, dict):
            return {"type": "map", "values": self.type_of(args[1], src, where)}
        if annotation is typing.Any:
            return "double"
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            return self.record(annotation)
        if annotation is float:
            alias = re.findall(r"\b([A-Z]\w+)\b", src)
            return "int" if any(a in INT_ENUM_ALIASES for a in alias) else "double"
        return {int: "long", str: "string", bool: "boolean"}[annotation]


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, module in MODELS.items():
        model = getattr(importlib.import_module(module), name)
        schema = Generator().record(model)
        schema["namespace"] = f"{NAMESPACE}.{name.lower()}"
        schema["doc"] = f"Terra-compatible {name} record, data model version 2022-03-16."
        (out_dir / f"{name.lower()}.avsc").write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "avro" / "models")
    generate(parser.parse_args().out)
