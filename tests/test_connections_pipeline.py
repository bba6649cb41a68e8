"""Connect → push → normalize → deliver: events carry the connection's user id and reference id."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from connectors import registry
from connectors.base import terra_user_id
from connectors.oauth import ProviderSettings
from controlplane.auth import ControlPlane, MemoryCollector
from pipelines.normalize import FileSource, NormalizeJob, run_batch
from sinks.sql import SqlSink

pytest_plugins = ("servers.fake_provider",)
pytest.register_assert_rewrite("servers.fake_provider")
from servers.fake_provider import authorize, query_of  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "whoop" / "sleep.page.json"


def test_data_of_a_connected_account_is_delivered_under_its_connection(tmp_path, fake_provider):
    state = f"sqlite:///{tmp_path}/state.db"
    sleeps = json.loads(FIXTURE.read_text())["records"]
    account = str(sleeps[0]["user_id"])
    fake_provider.register("whoop-client", "whoop-secret", "body")
    fake_provider.next_account = account
    whoop = registry()["whoop"].manifest
    # WHOOP's real manifest, its OAuth paths as the fake provider serves them (its base URL overrides the host)
    auth = whoop.auth.model_copy(update={"authorize_url": "https://whoop.example/oauth/authorize",
                                         "token_url": "https://whoop.example/oauth/token"})
    plane = ControlPlane(state, Fernet.generate_key().decode(), public_url="http://127.0.0.1:9",
                         manifests={"whoop": whoop.model_copy(update={"auth": auth})}, environ={},
                         emit=MemoryCollector(),
                         settings={"whoop": ProviderSettings("whoop-client", "whoop-secret",
                                                             oauth_base=fake_provider.base_url)},
                         profile_fetchers={}).open()
    start = plane.start_auth("dev-1", "whoop", reference_id="athlete-42")
    assert plane.complete_auth("whoop", query_of(authorize(start.auth_url))).ok
    plane.close()

    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"provider": "whoop", "kind": "sleep", "received_at": 1710140000000,
                               "payload": {"records": sleeps, "next_token": None}}) + "\n")
    summary = run_batch(NormalizeJob(FileSource(str(raw)), [SqlSink("sql", f"sqlite:///{tmp_path}/out.db")],
                                     str(tmp_path / "dlq"), state_url=state))
    assert summary.get("delivered:sql") == len(sleeps)
    with sqlite3.connect(tmp_path / "out.db") as conn:
        users = dict(conn.execute("SELECT user_id, reference_id FROM healthflow_users").fetchall())
    others = {terra_user_id("whoop", str(s["user_id"])) for s in sleeps if str(s["user_id"]) != account}
    assert users[start.user_id] == "athlete-42"  # the connected account: its connection's user
    assert set(users) == {start.user_id, *others}  # accounts never connected keep their derived ids
