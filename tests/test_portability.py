"""Portable by construction: the graphs translate for Dataflow, every DoFn pickles without a secret in it,
nothing is contacted while a graph is built, process-local settings are refused on remote runners, and the
multi-process local runner gives exactly what one process gives (on a fresh PostgreSQL, several times)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from apache_beam.internal import pickler
from apache_beam.internal.cloudpickle import cloudpickle
from apache_beam.portability.api import beam_runner_api_pb2

from core.errors import FatalError
from pipelines.launch import make_pipeline
from pipelines.normalize import FileSource, KafkaSource, NormalizeJob, PubSubSource, build, run_batch
from sinks.config import parse_destinations
from transforms.deliver import DeliverInOrder, ToShards

DATAFLOW = ["--runner=DataflowRunner", "--dry_run=true", "--project=healthflow-test", "--region=us-central1",
            "--temp_location=gs://healthflow-test/tmp"]
PG_PASSWORD = "pg-Secret-never-pickled-41"
KAFKA_PASSWORD = "kafka-Secret-never-pickled-73"
WEBHOOK_SECRET = "whsec_bm90LXBpY2tsZWQtbm90LXBpY2tsZWQtbm90LXBpY2tsZWQ="
UNREACHABLE_KAFKA = "127.0.0.1:1"  # nothing listens: building a graph must not try


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("HF_TEST_PG_PASSWORD", PG_PASSWORD)
    monkeypatch.setenv("HF_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("HF_TEST_KAFKA_PASSWORD", KAFKA_PASSWORD)


def remote_job(source) -> NormalizeJob:
    targets = parse_destinations({"destinations": [
        {"name": "hook", "type": "webhook", "url": "https://example.invalid/hook",
         "secret": "${HF_TEST_WEBHOOK_SECRET}"},
        {"name": "pg", "type": "postgres", "url": "postgresql://healthflow:${HF_TEST_PG_PASSWORD}@db.internal:5432/hf"},
        {"name": "k", "type": "kafka", "bootstrap_servers": "kafka.internal:9092", "topic": "normalized",
         "producer_config": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "app",
                             "sasl.password": "${HF_TEST_KAFKA_PASSWORD}"}},
    ]}).targets()
    return NormalizeJob(source, targets, "gs://healthflow-test/dead-letters",
                        state_url="postgresql://healthflow:${HF_TEST_PG_PASSWORD}@db.internal:5432/hf")


SOURCES = {
    "pubsub-streaming": (PubSubSource("projects/healthflow-test/subscriptions/normalize"), True),
    "kafka-streaming": (KafkaSource(UNREACHABLE_KAFKA, "healthflow.raw"), True),
    "kafka-batch": (KafkaSource(UNREACHABLE_KAFKA, "healthflow.raw"), False),
    "files-batch": (FileSource("gs://healthflow-test/raw/*.jsonl"), False),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_dataflow_dry_run_translates_the_graph(name, secret_env):
    source, streaming = SOURCES[name]
    pipeline = make_pipeline(DATAFLOW, streaming=streaming)
    build(pipeline, remote_job(source), streaming=streaming)
    pipeline.run()  # translates the whole graph for Dataflow; dry_run submits nothing


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_dofn_round_trips_the_pickler_and_carries_no_secret(name, secret_env):
    source, streaming = SOURCES[name]
    pipeline = make_pipeline(DATAFLOW, streaming=streaming)
    build(pipeline, remote_job(source), streaming=streaming)
    dofns = 0
    for transform, payload in pardo_payloads(pipeline):
        fn = pickler.loads(payload.do_fn.payload)
        raw = cloudpickle.dumps(fn)
        assert PG_PASSWORD.encode() not in raw and KAFKA_PASSWORD.encode() not in raw, transform.unique_name
        assert WEBHOOK_SECRET.encode() not in raw and WEBHOOK_SECRET[6:].encode() not in raw, transform.unique_name
        dofns += 1
    assert dofns > 5


def pardo_payloads(pipeline) -> Iterator[tuple[Any, Any]]:
    """Each ParDo of the translated graph that carries a DoFn: (its transform, its ParDoPayload)."""
    for transform in pipeline.to_runner_api().components.transforms.values():
        if transform.spec.urn != "beam:transform:pardo:v1":
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
        if payload.do_fn.payload:
            yield transform, payload


def delivery_keys_of(pipeline) -> tuple[list[int | None], set[tuple[str, ...]]]:
    """The shard counts of the graph's ToShards steps, and the state names of its in-order delivery steps."""
    shards, states = [], set()
    for _, payload in pardo_payloads(pipeline):
        fn = pickler.loads(payload.do_fn.payload)[0]  # (DoFn, args, kwargs, side inputs, windowing)
        if isinstance(fn, ToShards):
            shards.append(fn.shards)
        elif isinstance(fn, DeliverInOrder):
            states.add(tuple(sorted(payload.state_specs)))
    return shards, states


@pytest.mark.parametrize("name", ["kafka-streaming", "pubsub-streaming"])
def test_streaming_delivery_is_keyed_by_user_on_dataflow_and_by_one_shard_locally(name, secret_env):
    source, _ = SOURCES[name]
    pipeline = make_pipeline(DATAFLOW, streaming=True)
    build(pipeline, remote_job(source), streaming=True)
    shards, states = delivery_keys_of(pipeline)
    assert shards == [None]  # the key is the user id, as before delivery shards: no cap on parallelism
    assert states == {("backlog", "held", "waiting")}  # "backlog": the per-user version's state, taken over
    local = make_pipeline(streaming=True)
    build(local, NormalizeJob(source, remote_job(source).targets, "dead-letters"), streaming=True)
    assert delivery_keys_of(local)[0] == [1]
    chosen = make_pipeline(DATAFLOW, streaming=True)
    job = remote_job(source)
    job.delivery_shards = 16
    build(chosen, job, streaming=True)
    assert delivery_keys_of(chosen)[0] == [16]


LITERAL_PG = "pg-Literal-never-pickled-58"
LITERAL_KAFKA = "kafka-Literal-never-pickled-16"
LITERAL_WEBHOOK = "whsec_bGl0ZXJhbC1ub3QtcGlja2xlZC1saXRlcmFsLW5vdC1waWNrbGVk"


def literal_job(source, pg_host: str = "db.internal:5432/hf", webhook_url: str = "https://example.invalid/hook"
                ) -> NormalizeJob:
    """``remote_job`` with every secret written literally, as a destinations file and ``--state`` may."""
    url = f"postgresql://postgres:{LITERAL_PG}@{pg_host}"
    targets = parse_destinations({"destinations": [
        {"name": "hook", "type": "webhook", "url": webhook_url, "secret": LITERAL_WEBHOOK},
        {"name": "pg", "type": "postgres", "url": url},
        {"name": "k", "type": "kafka", "bootstrap_servers": "kafka.internal:9092", "topic": "normalized",
         "producer_config": {"security.protocol": "SASL_SSL", "sasl.username": "app", "sasl.password": LITERAL_KAFKA}},
    ]}, "destinations.yaml").targets()
    return NormalizeJob(source, targets, "gs://healthflow-test/dead-letters", state_url=url)


def graph_contents(pipeline) -> list[tuple[str, bytes]]:
    """Every byte of the job graph a runner receives: the serialized proto, each transform's payload, and each
    DoFn unpickled and pickled again uncompressed (Beam bz2-compresses what it pickles)."""
    proto = pipeline.to_runner_api()
    contents = [("proto", proto.SerializeToString())]
    for transform in proto.components.transforms.values():
        contents.append((transform.unique_name, transform.spec.payload))
        if transform.spec.urn == "beam:transform:pardo:v1":
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if payload.do_fn.payload:
                contents.append((transform.unique_name, cloudpickle.dumps(pickler.loads(payload.do_fn.payload))))
    return contents


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_secrets_written_literally_are_not_in_the_job_graph_either(name, secret_env):
    source, streaming = SOURCES[name]
    pipeline = make_pipeline(DATAFLOW, streaming=streaming)
    build(pipeline, literal_job(source), streaming=streaming)
    contents = graph_contents(pipeline)
    assert len(contents) > 20
    for where, raw in contents:
        for secret in (LITERAL_PG, LITERAL_KAFKA, LITERAL_WEBHOOK, LITERAL_WEBHOOK[6:]):
            assert secret.encode() not in raw, f"{secret} is in {where}"


QUERY_PG = "pg-Query-never-pickled-29"
HOOK_PASSWORD = "hook-Userinfo-never-pickled-84"
HOOK_TOKEN = "hook-Token-never-pickled-35"
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nkey-Pem-never-pickled-62\n-----END PRIVATE KEY-----"


def url_secrets_job(source, pg_host: str = "db.internal:5432/hf",
                    webhook_url: str = "https://example.invalid/hook") -> NormalizeJob:
    """Secrets written literally elsewhere in a URL: libpq's ``?password=``, a webhook URL's userinfo and query
    token; and a Kafka client's private key (``ssl.key.pem``)."""
    url = f"postgresql://postgres@{pg_host}?password={QUERY_PG}&sslmode=disable"
    hook = webhook_url.replace("://", f"://hook:{HOOK_PASSWORD}@", 1) + f"?token={HOOK_TOKEN}"
    targets = parse_destinations({"destinations": [
        {"name": "hook", "type": "webhook", "url": hook, "secret": LITERAL_WEBHOOK},
        {"name": "pg", "type": "postgres", "url": url},
        {"name": "k", "type": "kafka", "bootstrap_servers": "kafka.internal:9092", "topic": "normalized",
         "producer_config": {"security.protocol": "SSL", "ssl.key.pem": KEY_PEM}},
    ]}, "destinations.yaml").targets()
    return NormalizeJob(source, targets, "gs://healthflow-test/dead-letters", state_url=url)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_secrets_in_url_queries_userinfo_and_key_pems_are_not_in_the_job_graph(name, secret_env):
    source, streaming = SOURCES[name]
    pipeline = make_pipeline(DATAFLOW, streaming=streaming)
    build(pipeline, url_secrets_job(source), streaming=streaming)
    for where, raw in graph_contents(pipeline):
        for secret in (QUERY_PG, HOOK_PASSWORD, HOOK_TOKEN, "key-Pem-never-pickled-62"):
            assert secret.encode() not in raw, f"{secret} is in {where}"


def test_a_query_password_is_redacted_in_messages_and_refused_on_remote_runners():
    from core.secrets import redact

    assert QUERY_PG not in redact(f"cannot open store postgresql://app@db/hf?password={QUERY_PG}&sslmode=require")
    assert "sslmode=require" in redact("postgresql://app@db/hf?password=x&sslmode=require")
    # libpq takes ? and # in a password (it looks for the @ before the first /): held and redacted whole
    for url, secret in (("postgresql://app:S3cr#t@db/app", "S3cr#t"), ("postgresql://app:a?b@db:5432/app", "a?b"),
                        ("postgresql://app@db/hf?password=ab#cd", "ab#cd")):
        assert secret not in redact(url) and "#cd" not in redact(url), url
    with pytest.raises(FatalError) as refused:
        run_batch(url_secrets_job(FileSource("gs://healthflow-test/raw/*.jsonl")), DATAFLOW)
    for where in ("--state", "destinations.yaml.destinations[0].url", "destinations.yaml.destinations[1].url",
                  "destinations.yaml.destinations[2].producer_config.ssl.key.pem"):
        assert where in str(refused.value)


def test_url_secrets_written_literally_still_work_on_the_local_runner(tmp_path, simulated_payloads):
    delivers_on_the_local_runner(tmp_path, simulated_payloads, url_secrets_job)


def test_remote_runners_refuse_secrets_written_literally(caplog):
    with caplog.at_level("WARNING", logger="sinks.config"):
        job = literal_job(FileSource("gs://healthflow-test/raw/*.jsonl"))
    assert "destinations.yaml.destinations[0].secret: a secret is written in the file" in caplog.text
    with pytest.raises(FatalError) as refused:
        run_batch(job, DATAFLOW)
    message = str(refused.value)
    for where in ("--state", "destinations.yaml.destinations[0].secret", "destinations.yaml.destinations[1].url",
                  "destinations.yaml.destinations[2].producer_config.sasl.password"):
        assert where in message
    assert "write them as ${VAR}" in message


def test_secrets_written_literally_still_work_on_the_local_runner(tmp_path, simulated_payloads):
    delivers_on_the_local_runner(tmp_path, simulated_payloads, literal_job)


def delivers_on_the_local_runner(tmp_path, simulated_payloads, make_job) -> None:
    """A job ``make_job`` builds with secrets written literally delivers to PostgreSQL and a signature-checking
    webhook receiver on the local runner (the held secrets reach its workers)."""
    from test_streaming import write_jsonl

    from pipelines.webhook_receiver import WebhookReceiver

    raw_file = tmp_path / "raw.jsonl"
    write_jsonl(raw_file, simulated_payloads[:20])
    name = fresh_database()  # trust authentication: any password is accepted, it only has to reach the worker
    try:
        with WebhookReceiver(LITERAL_WEBHOOK) as receiver:
            job = make_job(FileSource(str(raw_file)), pg_host=f"127.0.0.1:5432/{name}", webhook_url=receiver.url)
            job.sinks = job.sinks[:2]
            job.dead_letter_root = str(tmp_path / "dead-letters")
            summary = run_batch(job, [])
            assert summary.get("delivered:hook") == summary.get("delivered:pg") > 0
            assert receiver.unique == summary.get("delivered:hook")  # each signature verified with the secret
    finally:
        drop_database(name)


def test_remote_runners_refuse_process_local_settings(tmp_path):
    job = NormalizeJob(FileSource("gs://healthflow-test/raw/*.jsonl"),
                       parse_destinations({"destinations": [
                           {"name": "s", "type": "sqlite", "url": f"sqlite:///{tmp_path}/x.db"},
                           {"name": "folder", "type": "object_store", "root": str(tmp_path / "objects")}]}).targets(),
                       "dead-letters", state_url="sqlite:///state.db")
    with pytest.raises(FatalError) as refused:
        run_batch(job, DATAFLOW)
    message = str(refused.value)
    assert "--state" in message and "--dead-letters" in message
    assert "destination s:" in message and "destination folder:" in message


def test_pubsub_is_read_on_dataflow_only(secret_env):
    job = remote_job(PubSubSource("projects/healthflow-test/subscriptions/normalize"))
    with pytest.raises(FatalError, match="cannot read Pub/Sub"):
        run_batch(job, ["--runner=FlinkRunner", "--streaming"])


def test_a_database_url_given_whole_as_a_reference_is_accepted(monkeypatch):
    monkeypatch.setenv("HF_TEST_DATABASE_URL", "postgresql://app:pw@db.internal:5432/hf")
    (target,) = parse_destinations({"destinations": [
        {"name": "pg", "type": "postgres", "url": "${HF_TEST_DATABASE_URL}"}]}).targets()
    assert target.sink.url == "${HF_TEST_DATABASE_URL}"  # resolved where the sink connects
    monkeypatch.setenv("HF_TEST_DATABASE_URL", "mysql://app@db.internal/hf")
    with pytest.raises(FatalError, match="a postgres url starts with"):
        parse_destinations({"destinations": [{"name": "pg", "type": "postgres", "url": "${HF_TEST_DATABASE_URL}"}]})


def fresh_database() -> str:
    name = f"hf_mp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


def drop_database(name: str) -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_on_fresh_postgres(tmp_path, raw_file, beam_args) -> dict:
    name = fresh_database()
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        targets = parse_destinations({"destinations": [{"name": "pg", "type": "postgres", "url": url}]}).targets()
        summary = run_batch(NormalizeJob(FileSource(str(raw_file)), targets, str(tmp_path / f"dlq-{name}"),
                                         state_url=url), beam_args)
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT user_id, type, natural_key, event_id, payload FROM healthflow_records"
                                ).fetchall()
        return {"rows": {(u, t, k): (e, json.dumps(p, sort_keys=True)) for u, t, k, e, p in rows},
                "delivered": summary.get("delivered:pg"), "dead": summary.get("dead_letter:decode")}
    finally:
        drop_database(name)


def test_multi_process_runner_matches_one_process_on_fresh_postgres(tmp_path, simulated_payloads):
    from test_streaming import write_jsonl

    raw_file = tmp_path / "raw.jsonl"
    write_jsonl(raw_file, simulated_payloads)
    single = run_on_fresh_postgres(tmp_path, raw_file, [])
    assert single["rows"] and single["delivered"] == len(single["rows"])
    for _ in range(3):  # concurrent CREATE TABLE in two workers used to fail one run in two
        multi = run_on_fresh_postgres(tmp_path, raw_file, ["--direct_num_workers=2",
                                                           "--direct_running_mode=multi_processing"])
        assert multi == single


@pytest.mark.parametrize("source", [["--input", "gs://healthflow-test/raw/*.jsonl"],
                                    ["--streaming", "--subscription", "projects/healthflow-test/subscriptions/s"]])
def test_the_cli_translates_for_dataflow_without_submitting(source, secret_env, tmp_path, capsys):
    from runners.cli import main

    destinations = tmp_path / "destinations.yaml"
    destinations.write_text("destinations:\n  - {name: pg, type: postgres, "
                            "url: 'postgresql://app:${HF_TEST_PG_PASSWORD}@db.internal:5432/hf'}\n")
    code = main(["run", "normalize", *source, "--destinations", str(destinations),
                 "--state", "postgresql://app:${HF_TEST_PG_PASSWORD}@db.internal:5432/hf",
                 "--dead-letters", "gs://healthflow-test/dead-letters", *DATAFLOW])
    assert code == 0
    assert "translated (--dry_run)" in capsys.readouterr().err
