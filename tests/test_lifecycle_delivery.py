"""Connection lifecycle events reach destinations like data events: signed, stored, dead-lettered, replayable."""

from __future__ import annotations

import json
import sqlite3

import pytest
from cryptography.fernet import Fernet
from terra.utils.verify_signature import verify_terra_webhook_signature

from controlplane.auth import ControlPlane
from pipelines.replay import replay_deliveries, select
from pipelines.webhook_receiver import WebhookReceiver
from sinks.config import parse_destinations
from transforms.lifecycle import LifecycleDelivery

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider")
from servers.fake_provider import authorize, fake_manifests, fake_settings, query_of  # noqa: E402


def test_auth_and_deauth_events_are_delivered_to_every_destination(tmp_path, fake_provider, webhook_secret):
    dlq = str(tmp_path / "dlq")
    with WebhookReceiver(webhook_secret) as receiver:
        targets = parse_destinations({"destinations": [
            {"name": "hook", "type": "webhook", "url": receiver.url, "secret": webhook_secret,
             "retry": {"max_attempts": 2, "initial_delay_s": 0.01}},
            {"name": "db", "type": "sqlite", "url": f"sqlite:///{tmp_path}/out.db"},
            {"name": "lake", "type": "object_store", "root": str(tmp_path / "objects")},
            {"name": "sleep_only", "type": "sqlite", "url": f"sqlite:///{tmp_path}/sleep.db",
             "event_types": ["sleep"]},
        ]}).targets()
        delivery = LifecycleDelivery(targets, dlq)
        plane = ControlPlane(f"sqlite:///{tmp_path}/cp.db", Fernet.generate_key().decode(), environ={},
                             public_url="http://127.0.0.1:9", manifests=fake_manifests(),
                             settings=fake_settings(fake_provider), emit=delivery.emit).open()
        start = plane.start_auth("dev-1", "fakebody", reference_id="athlete-7")
        assert plane.complete_auth("fakebody", query_of(authorize(start.auth_url))).ok

        receiver.fail_next(10, 503)  # the webhook is down when the user disconnects
        plane.deauthenticate(start.user_id)
        plane.close()

        (auth,) = [e for e in receiver.events.values() if e["type"] == "auth"]
        assert auth["user"]["user_id"] == start.user_id and auth["reference_id"] == "athlete-7"
        (auth_id,) = [i for i, e in receiver.events.items() if e["type"] == "auth"]
        body = json.dumps(auth, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert verify_terra_webhook_signature(body, receiver.headers[auth_id]["terra-signature"],
                                              webhook_secret)
        with sqlite3.connect(tmp_path / "out.db") as conn:
            assert sorted(t for (t,) in conn.execute("SELECT type FROM healthflow_records")) == ["auth", "deauth"]
        with sqlite3.connect(tmp_path / "sleep.db") as conn:  # filtered: a sleep-only destination gets neither
            assert conn.execute("SELECT COUNT(*) FROM healthflow_records").fetchone()[0] == 0
        names = sorted(p.relative_to(tmp_path / "objects").parts[:2] for p in (tmp_path / "objects").rglob("*.json"))
        assert names == [("2022-03-16", "auth"), ("2022-03-16", "deauth")]

        (dead,) = select(dlq, destination="hook")
        assert json.loads(dead["original"])["type"] == "deauth" and delivery.dead_lettered == 1
        receiver.clear_failures()
        assert replay_deliveries(dlq, targets, destination="hook").delivered["hook"] == 1
        assert sorted(e["type"] for e in receiver.events.values()) == ["auth", "deauth"]
        delivery.close()
