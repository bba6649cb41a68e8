"""The destinations file: validated up front, secrets from the environment, clear errors."""

from __future__ import annotations

import json
import sqlite3

import pytest

from core.errors import FatalError
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from sinks.config import load_destinations, parse_destinations
from sinks.sql import SqlSink
from sinks.webhook import WebhookSink


def test_yaml_with_environment_secrets_builds_configured_targets(tmp_path, monkeypatch, webhook_secret):
    monkeypatch.setenv("HOOK_SECRET", webhook_secret)
    path = tmp_path / "destinations.yaml"
    path.write_text(f"""
destinations:
  - name: app
    type: webhook
    url: http://127.0.0.1:9/terra
    secret: ${{HOOK_SECRET}}
    event_types: [sleep, daily]
    retry: {{max_attempts: 7, initial_delay_s: 1, max_delay_s: 60}}
  - name: warehouse
    type: sqlite
    url: sqlite:///{tmp_path}/w.db
    batch_size: 50
""")
    app, warehouse = load_destinations(path).targets()
    assert isinstance(app.sink, WebhookSink) and app.sink.url == "http://127.0.0.1:9/terra"
    assert app.event_types == frozenset({"sleep", "daily"}) and app.retry.max_attempts == 7
    assert isinstance(warehouse.sink, SqlSink) and warehouse.batch_size == 50 and warehouse.event_types is None


def test_toml_is_accepted(tmp_path):
    path = tmp_path / "destinations.toml"
    path.write_text(f'[[destinations]]\nname = "lake"\ntype = "object_store"\nroot = "{tmp_path}/objects"\n')
    (lake,) = load_destinations(path).targets()
    assert lake.name == "lake"


@pytest.mark.parametrize(("document", "message"), [
    ({"destinations": []}, "at least 1 item"),
    ({"destinations": [{"name": "x", "type": "carrier-pigeon"}]}, "does not match any of the expected tags"),
    ({"destinations": [{"name": "x", "type": "postgres", "url": "mysql://db"}]}, "starts with postgresql://"),
    ({"destinations": [{"name": "x", "type": "webhook", "url": "ftp://h", "secret": "s"}]}, "url"),
    ({"destinations": [{"name": "x", "type": "sqlite", "url": "sqlite:///a", "event_types": ["slep"]}]},
     "unknown event types ['slep']"),
    ({"destinations": [{"name": "x", "type": "sqlite", "url": "sqlite:///a", "colour": "red"}]},
     "Extra inputs are not permitted"),
    ({"destinations": [{"name": "x", "type": "sqlite", "url": "sqlite:///a"},
                       {"name": "x", "type": "sqlite", "url": "sqlite:///b"}]}, "repeated: x"),
    ({"destinations": [{"name": "Bad Name", "type": "sqlite", "url": "sqlite:///a"}]}, "name"),
])
def test_invalid_files_say_what_to_fix(document, message):
    with pytest.raises(FatalError) as error:
        parse_destinations(document)
    assert message in str(error.value)


def test_webhook_lanes_default_to_the_sinks_and_are_bounded(webhook_secret):
    from sinks.webhook import DEFAULT_LANES, MAX_LANES

    entry = {"name": "h", "type": "webhook", "url": "http://127.0.0.1:9/", "secret": webhook_secret}
    (default,) = parse_destinations({"destinations": [entry]}).targets()
    (four,) = parse_destinations({"destinations": [{**entry, "lanes": 4}]}).targets()
    assert (default.sink.lanes, four.sink.lanes) == (DEFAULT_LANES, 4)
    for bad in (0, MAX_LANES + 1, "many"):
        with pytest.raises(FatalError, match=r"destinations\.0\.webhook\.lanes: Input should be"):
            parse_destinations({"destinations": [{**entry, "lanes": bad}]})


@pytest.mark.parametrize(("entry", "default_concurrency"), [
    ({"name": "lake", "type": "object_store", "root": "/tmp/objects"}, 1),  # a local folder: one at a time
    ({"name": "lake", "type": "s3", "bucket": "bucket"}, 8)])
def test_object_writes_at_once_default_to_the_sinks_and_are_bounded(entry, default_concurrency):
    from sinks.concurrent_writes import MAX_CONCURRENCY

    (default,) = parse_destinations({"destinations": [entry]}).targets()
    (three,) = parse_destinations({"destinations": [{**entry, "concurrency": 3}]}).targets()
    assert (default.sink.concurrency, three.sink.concurrency) == (default_concurrency, 3)
    for bad in (0, MAX_CONCURRENCY + 1, "many"):
        with pytest.raises(FatalError, match=rf"destinations\.0\.{entry['type']}\.concurrency: Input should be"):
            parse_destinations({"destinations": [{**entry, "concurrency": bad}]})


def test_missing_environment_variable_is_an_error_not_an_empty_secret(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(FatalError, match="NOT_SET_ANYWHERE is not set"):
        parse_destinations({"destinations": [{"name": "h", "type": "webhook", "url": "http://127.0.0.1:9/",
                                              "secret": "${NOT_SET_ANYWHERE}"}]})


def test_a_sink_that_refuses_its_settings_is_named(tmp_path):
    config = parse_destinations({"destinations": [{"name": "hook", "type": "webhook", "url": "http://127.0.0.1:9/",
                                                   "secret": "not-a-whsec-secret"}]})
    with pytest.raises(FatalError, match="destination 'hook'"):
        config.targets()


def test_event_type_filter_delivers_only_the_chosen_types(tmp_path, simulated_payloads):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(json.dumps({"provider": p.provider, "kind": p.kind, "user_id": p.user_id,
                                         "received_at": p.received_at_ms, "payload": p.payload.decode()})
                             for p in simulated_payloads) + "\n")
    targets = parse_destinations({"destinations": [
        {"name": "sleep_only", "type": "sqlite", "url": f"sqlite:///{tmp_path}/s.db", "event_types": ["sleep"]},
    ]}).targets()
    summary = run_batch(NormalizeJob(FileSource(str(raw)), targets, str(tmp_path / "dlq"),
                                     state_url=f"sqlite:///{tmp_path}/state.db"))
    sleeps = summary.with_prefix("normalized:")
    sleep_events = sum(v for k, v in sleeps.items() if k.endswith(":sleep"))
    assert summary.get("delivered:sleep_only") == sleep_events > 0
    assert summary.get("filtered:sleep_only") == sum(sleeps.values()) - sleep_events
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert {t for (t,) in conn.execute("SELECT DISTINCT type FROM healthflow_records")} == {"sleep"}


def test_sql_destinations_take_on_delete_hard_or_soft(tmp_path):
    entries = [{"name": "db", "type": "sqlite", "url": f"sqlite:///{tmp_path / 'a.db'}"},
               {"name": "soft", "type": "sqlite", "url": f"sqlite:///{tmp_path / 'b.db'}", "on_delete": "soft"},
               {"name": "supa", "type": "supabase", "url": "postgresql://u@127.0.0.1:5432/x", "on_delete": "soft"}]
    sinks = [target.sink for target in parse_destinations({"destinations": entries}).targets()]
    assert [sink.on_delete for sink in sinks] == ["hard", "soft", "soft"]
    with pytest.raises(FatalError, match="on_delete"):
        parse_destinations({"destinations": [{**entries[0], "on_delete": "archive"}]})
