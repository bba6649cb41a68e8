"""Destinations file: which destinations a pipeline delivers to, validated before anything runs.

YAML or TOML (by file extension), one entry per destination:

    destinations:
      - name: app-webhook
        type: webhook
        url: https://example.test/terra
        secret: ${HEALTHFLOW_WEBHOOK_SECRET}      # ${VAR} is read from the environment
        event_types: [sleep, daily]               # optional: only these event types
      - name: warehouse
        type: postgres
        url: postgresql://healthflow:${PGPASSWORD}@db:5432/health

Errors name the entry and field and say what to fix; a missing environment variable is an error,
never an empty secret.
"""

from __future__ import annotations

import logging
import re
import tomllib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import FatalError
from core.secrets import hold_literal, hold_url_password, missing, resolve
from schemas import MODEL_TYPES
from sinks.base import Sink
from sinks.concurrent_writes import DEFAULT_CONCURRENCY, MAX_CONCURRENCY
from sinks.policy import SVIX_REDELIVERY_S, RetryPolicy, Target
from sinks.status import DEFAULT_DISABLE_AFTER_S

LIFECYCLE_TYPES = ("auth", "auth_cancelled", "deauth", "user_reauth", "access_revoked", "connection_error",
                   "permission_change")
NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
OBJECT_WRITES = "objects of a batch written at once (different objects only; 1: one after another)"


class RetryConfig(BaseModel):
    """Quick retries in the pipeline, then scheduled redeliveries from the dead-letter store."""

    model_config = ConfigDict(extra="forbid")
    max_attempts: int = Field(4, ge=1, le=20)
    initial_delay_s: float = Field(0.2, ge=0)
    max_delay_s: float = Field(5.0, ge=0)
    redelivery_schedule_s: list[float] = Field(default_factory=lambda: list(SVIX_REDELIVERY_S), max_length=50)
    disable_after_s: float = Field(DEFAULT_DISABLE_AFTER_S, gt=0)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.initial_delay_s, self.max_delay_s,
                           redelivery_schedule_s=tuple(self.redelivery_schedule_s),
                           disable_after_s=self.disable_after_s)


class _Destination(BaseModel, ABC):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME, description="unique, lower case: used in counters and dead letters")
    event_types: list[str] | None = Field(None, description="deliver only these event types (default: all)")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    batch_size: int = Field(200, ge=1, le=10_000)

    @field_validator("event_types")
    @classmethod
    def _known_types(cls, value: list[str] | None) -> list[str] | None:
        known = (*MODEL_TYPES, *LIFECYCLE_TYPES)
        unknown = sorted(set(value or []) - set(known))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {', '.join(known)}")
        return value

    @abstractmethod
    def build(self) -> Sink:
        """The destination's sink, built from this entry."""

    def target(self) -> Target:
        """The sink with this destination's own retry policy, batch size and type filter."""
        try:
            sink = self.build()
        except FatalError as exc:
            raise FatalError(f"destination {self.name!r}: {exc}") from exc
        types = frozenset(self.event_types) if self.event_types is not None else None
        return Target(sink, self.retry.policy(), self.batch_size, types)


class LargePayloadConfig(BaseModel):
    """An S3 bucket for bodies over the destination's size limit; the message then carries a URL."""

    model_config = ConfigDict(extra="forbid")
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    expires_in: int = Field(600, gt=0, le=7 * 24 * 3600)

    def build(self) -> Any:
        from sinks.large_payloads import LargePayloadS3

        return LargePayloadS3(self.bucket, self.prefix, self.endpoint_url, self.region, self.expires_in)


class WebhookDestination(_Destination):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^(https?://|\$\{)", description="a secret in it (user:password@, ?token=) is kept "
                     "out of the job graph: ${VAR} references are resolved where the sink runs")
    secret: str = Field(description="Standard Webhooks secret, whsec_…; signs both signature headers")
    timeout_s: float = Field(10.0, gt=0, le=120)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    large_payload_s3: LargePayloadConfig | None = None
    lanes: int = Field(8, ge=1, le=64,  # sinks.webhook's DEFAULT_LANES and MAX_LANES
                       description="connections used at once; one user's events still go one at a time, in order")

    def build(self) -> Sink:
        from sinks.webhook import WebhookSink

        return WebhookSink(self.name, self.url, self.secret, timeout_s=self.timeout_s,
                           max_body_bytes=self.max_body_bytes,
                           large_payload_s3=self.large_payload_s3.build() if self.large_payload_s3 else None,
                           lanes=self.lanes)


class SqlDestination(_Destination):
    type: Literal["postgres", "mysql", "sqlite"]
    url: str
    table_prefix: str = Field("healthflow_", pattern=r"^[a-z_][a-z0-9_]{0,30}$")
    on_delete: Literal["hard", "soft"] = "hard"  # a tombstone deletes the row, or sets its deleted_at

    @model_validator(mode="after")
    def _scheme_matches(self) -> SqlDestination:
        schemes = {"postgres": ("postgresql://", "postgres://"), "mysql": ("mysql://",), "sqlite": ("sqlite:///",)}
        if not resolve(self.url).startswith(schemes[self.type]):  # the value a ${VAR} names must fit too
            raise ValueError(f"a {self.type} url starts with {' or '.join(schemes[self.type])}")
        return self

    def build(self) -> Sink:
        from sinks.sql import SqlSink

        return SqlSink(self.name, self.url, table_prefix=self.table_prefix, on_delete=self.on_delete)


class SupabaseDestination(_Destination):
    """Supabase is PostgreSQL: Terra's table layout (terra_users, terra_data_payloads)."""

    type: Literal["supabase"]
    url: str

    @model_validator(mode="after")
    def _is_postgres(self) -> SupabaseDestination:
        if not resolve(self.url).startswith(("postgresql://", "postgres://")):  # the value a ${VAR} names too
            raise ValueError("a supabase url starts with postgresql:// or postgres://")
        return self
    db_schema: str = Field("public", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    on_delete: Literal["hard", "soft"] = "hard"  # a tombstone deletes the row, or sets its deleted_at

    def build(self) -> Sink:
        from sinks.sql import SqlSink

        return SqlSink(self.name, self.url, layout="terra", schema=self.db_schema, on_delete=self.on_delete)


class ObjectStoreDestination(_Destination):
    """Any Beam FileSystems root: a local path, gs://bucket/prefix, s3://bucket/prefix."""

    type: Literal["object_store"]
    root: str
    concurrency: int | None = Field(None, ge=1, le=MAX_CONCURRENCY,
                                    description=OBJECT_WRITES + "; default 8 on s3:// and gs://, 1 on a local folder")

    def build(self) -> Sink:
        from sinks.object_store import ObjectStoreSink

        return ObjectStoreSink(self.name, self.root, concurrency=self.concurrency)


class S3Destination(_Destination):
    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    formats: list[Literal["json", "parquet"]] = Field(default_factory=lambda: ["json"], min_length=1)
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY, description=OBJECT_WRITES)

    def build(self) -> Sink:
        from sinks.s3 import S3Sink

        return S3Sink(self.name, self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url, region=self.region,
                      formats=tuple(self.formats), concurrency=self.concurrency)


class SqsDestination(_Destination):
    type: Literal["sqs"]
    queue_url: str
    region: str | None = None
    endpoint_url: str | None = None
    large_payload_s3: LargePayloadConfig | None = None

    def build(self) -> Sink:
        from sinks.sqs import SqsSink

        return SqsSink(self.name, self.queue_url, endpoint_url=self.endpoint_url, region=self.region,
                       large_payload_s3=self.large_payload_s3.build() if self.large_payload_s3 else None)


class KafkaDestination(_Destination):
    type: Literal["kafka"]
    bootstrap_servers: str
    topic: str
    value_format: Literal["json", "avro"] = "json"
    producer_config: dict[str, Any] = Field(default_factory=dict)

    def build(self) -> Sink:
        from sinks.kafka import KafkaSink

        return KafkaSink(self.name, self.bootstrap_servers, self.topic, value_format=self.value_format,
                         producer_config=self.producer_config or None)


class PubSubDestination(_Destination):
    type: Literal["pubsub"]
    project: str
    topic: str
    emulator_host: str | None = None

    def build(self) -> Sink:
        from sinks.pubsub import PubSubSink

        return PubSubSink(self.name, self.project, self.topic, emulator_host=self.emulator_host)


Destination = Annotated[
    WebhookDestination | SqlDestination | SupabaseDestination | ObjectStoreDestination | S3Destination
    | SqsDestination | KafkaDestination | PubSubDestination,
    Field(discriminator="type"),
]


class DestinationsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destinations: list[Destination] = Field(min_length=1)

    def targets(self, only: str | None = None) -> list[Target]:
        """Build every destination (or just ``only``); FatalError names the one that failed."""
        chosen = [d for d in self.destinations if only is None or d.name == only]
        if not chosen:
            names = ", ".join(d.name for d in self.destinations)
            raise FatalError(f"no destination named {only!r}; configured: {names}")
        return [d.target() for d in chosen]

    @model_validator(mode="after")
    def _unique_names(self) -> DestinationsFile:
        names = [d.name for d in self.destinations]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicated)}")
        return self


def _interpolate(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return resolve(value, where)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


log = logging.getLogger(__name__)

# Fields that hold secrets keep their ${VAR} references: sinks resolve them where they run (never pickled).
SECRET_FIELDS = {"webhook": ("secret", "url"), "postgres": ("url",), "mysql": ("url",), "supabase": ("url",),
                 "kafka": ("producer_config",)}
SECRET_PRODUCER_KEYS = re.compile(r"password|secret|token|sasl\.jaas\.config|ssl\.key\.pem", re.IGNORECASE)


def _held(value: Any, key: str, where: str) -> Any:
    """A secret field's value with any secret written literally held out of the job graph (``core.secrets``),
    and a warning saying how to write it instead."""
    if key == "url" and isinstance(value, str):
        kept = hold_url_password(value, where)
    elif key == "secret" and isinstance(value, str):
        kept = hold_literal(value, where)
    elif key == "producer_config" and isinstance(value, dict):
        kept = {k: hold_literal(v, f"{where}.{k}") if isinstance(v, str) and SECRET_PRODUCER_KEYS.search(k) else v
                for k, v in value.items()}
    else:
        return value
    if kept != value:
        log.warning("%s: a secret is written in the file; it is kept out of the job graph, in this process's "
                    "environment (local runners only). Write it as ${VAR} and set VAR where the job runs.", where)
    return kept


def _interpolate_document(raw: dict[str, Any], source: str) -> dict[str, Any]:
    document = {k: v for k, v in raw.items() if k != "destinations"}
    entries = raw.get("destinations")
    if not isinstance(entries, list):
        return _interpolate(raw, source)
    resolved = []
    for index, entry in enumerate(entries):
        where = f"{source}.destinations[{index}]"
        if not isinstance(entry, dict):
            resolved.append(entry)
            continue
        kept = SECRET_FIELDS.get(str(entry.get("type")), ())
        out = {}
        for key, value in entry.items():
            if key in kept:
                texts = value.values() if isinstance(value, dict) else [value]
                absent = [name for text in texts if isinstance(text, str) for name in missing(text)]
                if absent:
                    raise FatalError(f"{where}.{key}: environment variable {absent[0]} is not set")
                out[key] = _held(value, key, f"{where}.{key}")
            else:
                out[key] = _interpolate(value, f"{where}.{key}")
        resolved.append(out)
    return {**_interpolate(document, source), "destinations": resolved}


def parse_destinations(raw: dict[str, Any], source: str = "destinations") -> DestinationsFile:
    """Validate a decoded destinations document; FatalError lists every problem with its location.

    ``${VAR}`` is read from the environment; in secret fields (a webhook's ``secret``, a database ``url``)
    the reference is kept and resolved by the sink where it runs, so no secret is pickled into a job. A secret
    written literally there is held in this process's environment instead (``core.secrets.hold``), with a
    warning: never pickled, and refused on runners whose workers are other machines.
    """
    try:
        return DestinationsFile.model_validate(_interpolate_document(raw, source))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = ".".join(str(p) for p in error["loc"] if not str(p).endswith("Destination"))
            problems.append(f"  {location}: {error['msg']}")
        raise FatalError(f"{source} is not valid:\n" + "\n".join(problems)) from exc


def load_destinations(path: str | Path) -> DestinationsFile:
    """Read and validate a YAML (.yaml/.yml) or TOML (.toml) destinations file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FatalError(f"cannot read destinations file {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise FatalError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise FatalError(f"{path}: expected a mapping with a 'destinations' list")
    return parse_destinations(raw, str(path))
