"""The ``healthflow`` command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
EXE = shutil.which("healthflow") or str(Path(sys.executable).with_name("healthflow"))


def healthflow(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], input=stdin.decode() if stdin else None, capture_output=True, text=True,
                          timeout=120)


def test_providers_lists_every_provider_and_kind():
    out = healthflow("providers")
    assert out.returncode == 0, out.stderr
    for line in ("garmin (GARMIN)", "oura (OURA)", "whoop (WHOOP)", "dailies", "sleeps", "daily_activity", "recovery"):
        assert line in out.stdout


GARMIN_PUSH = {"sleeps": [{"userId": "d3315b", "summaryId": "x3a9f1b2-65ee3030", "calendarDate": "2024-03-11",
                           "startTimeInSeconds": 1710108720, "startTimeOffsetInSeconds": 3600,
                           "durationInSeconds": 25800, "deepSleepDurationInSeconds": 5400,
                           "lightSleepDurationInSeconds": 14100, "remSleepInSeconds": 6300,
                           "awakeDurationInSeconds": 2160, "validation": "ENHANCED_FINAL",
                           "sleepLevelsMap": {"deep": [{"startTimeInSeconds": 1710111120,
                                                        "endTimeInSeconds": 1710114720}]}}]}


def test_normalize_prints_terra_envelopes_as_json_lines():
    out = healthflow("normalize", "--provider", "garmin", "-", stdin=json.dumps(GARMIN_PUSH).encode())
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    event = json.loads(line)
    assert set(event) == {"type", "user", "data", "version"}
    assert event["type"] == "sleep" and event["version"] == "2022-03-16" and event["user"]["provider"] == "GARMIN"
    metadata = event["data"][0]["metadata"]
    assert metadata["start_time"] == "2024-03-10T23:12:00.000000+01:00"
    assert metadata["end_time"] == "2024-03-11T06:58:00.000000+01:00"
    assert metadata["upload_type"] == 2


@pytest.mark.parametrize(("provider", "kind", "user", "fixture"), [
    ("oura", "sleep", "oura-user-1", "oura/sleep.page.json"),
    ("whoop", "sleep", None, "whoop/sleep.page.json"),
])
def test_normalize_oura_and_whoop_documents(provider, kind, user, fixture):
    args = ["normalize", "--provider", provider, "--kind", kind, *(["--user", user] if user else []),
            str(FIXTURES / fixture)]
    out = healthflow(*args)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events and all(e["type"] == "sleep" and e["data"][0]["metadata"]["summary_id"] for e in events)


def test_normalize_explains_what_is_wrong():
    no_user = healthflow("normalize", "--provider", "oura", "--kind", "sleep", str(FIXTURES / "oura/sleep.page.json"))
    assert no_user.returncode == 1
    assert "no user id" in no_user.stderr
    unknown = healthflow("normalize", "--provider", "nope", "-", stdin=b"{}")
    assert unknown.returncode == 1 and "unknown provider 'nope'" in unknown.stderr
    bad_json = healthflow("normalize", "--provider", "garmin", "-", stdin=b"{not json")
    assert bad_json.returncode == 1 and "[parse]" in bad_json.stderr


def _destinations(tmp_path: Path, text: str) -> str:
    path = tmp_path / "destinations.yaml"
    path.write_text(text)
    return str(path)


def test_run_fails_at_start_with_what_to_fix(tmp_path):
    sqlite_only = _destinations(tmp_path, f"destinations:\n  - {{name: db, type: sqlite, url: 'sqlite:///{tmp_path}/x.db'}}\n")
    no_source = healthflow("run", "normalize", "--destinations", sqlite_only)
    assert no_source.returncode == 2 and "no source" in no_source.stderr
    (tmp_path / "raw.jsonl").write_text("")
    missing_env = _destinations(tmp_path, "destinations:\n  - {name: hook, type: webhook, url: 'http://127.0.0.1:9/h',"
                                          " secret: '${HEALTHFLOW_TEST_UNSET_SECRET}'}\n")
    out = healthflow("run", "normalize", "--input", str(tmp_path / "raw.jsonl"), "--destinations", missing_env)
    assert out.returncode == 2 and "HEALTHFLOW_TEST_UNSET_SECRET is not set" in out.stderr
    typo = _destinations(tmp_path, "destinations:\n  - {name: hook, type: webhok, url: 'http://127.0.0.1:9/h'}\n")
    out = healthflow("run", "normalize", "--input", str(tmp_path / "raw.jsonl"), "--destinations", typo)
    assert out.returncode == 2 and "'webhok'" in out.stderr and "expected tags" in out.stderr


def test_run_normalize_on_files_with_beam_options(tmp_path):
    raw = {"provider": "garmin", "received_at": 1710140000000, "payload": GARMIN_PUSH}
    (tmp_path / "raw.jsonl").write_text(json.dumps(raw) + "\nnot json\n")
    destinations = _destinations(tmp_path, f"""destinations:
  - name: sql
    type: sqlite
    url: sqlite:///{tmp_path}/out.db
  - name: object_store
    type: object_store
    root: {tmp_path}/objects
""")
    out = healthflow("run", "normalize", "--input", str(tmp_path / "raw.jsonl"), "--destinations", destinations,
                     "--dead-letters", str(tmp_path / "dlq"), "--state", f"sqlite:///{tmp_path}/state.db",
                     "--runner=DirectRunner")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["raw_in"] == 2 and summary["delivered:sql"] == 1 and summary["delivered:object_store"] == 1
    assert summary["dead_letter:decode"] == 1
    assert len(list((tmp_path / "dlq" / "decode").glob("*.json"))) == 1
    listed = healthflow("deadletters", "list", "--dead-letters", str(tmp_path / "dlq"))
    assert listed.returncode == 0 and "decode" in listed.stdout and "SchemaMismatch" in listed.stdout
    dead_id = listed.stdout.split()[0]
    shown = json.loads(healthflow("deadletters", "show", dead_id[:12], "--dead-letters", str(tmp_path / "dlq")).stdout)
    assert shown["original_text"] == "not json" and shown["source"]["line"] == "2"
