"""`healthflow serve` under abuse, as a separate process on loopback: a flood of wrong API keys (finding 4 of issue
10) and the housekeeping it runs on a schedule (finding 10)."""

from __future__ import annotations

import http.client
import itertools
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.fernet import Fernet

from controlplane.auth import ControlPlane
from controlplane.auth.secrets import hash_api_key

ROOT = Path(__file__).resolve().parents[1]
SECRET = Fernet.generate_key().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(state: str, *flags: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """`healthflow serve` on a free loopback port until the block ends: (process, port)."""
    port = free_port()
    env = {**os.environ, "HEALTHFLOW_SECRET_KEY": SECRET, "PYTHONPATH": f"{ROOT}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    log = open(Path(state.removeprefix("sqlite:///")).with_suffix(".log"), "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "runners.cli", "serve", "--port", str(port), "--state", state,
                                *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, Path(log.name).read_text()
            try:
                if get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "healthflow serve did not start"
            time.sleep(0.1)
        yield process, port
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def get(port: int, path: str, headers: dict[str, str] | None = None, *,
        connection: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one GET."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        if connection is None:
            conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p50_latency(port: int, headers: dict[str, str], count: int = 60) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    took = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            status, _, _ = get(port, "/v2/userInfo?user_id=nobody", headers, connection=conn)
            took.append(time.perf_counter() - started)
            assert status == 404  # authenticated, then no such user
    finally:
        conn.close()
    return statistics.median(took)


def test_a_wrong_key_flood_is_throttled_and_valid_requests_keep_answering(tmp_path):
    state = f"sqlite:///{tmp_path}/state.db"
    with ControlPlane(state, SECRET, manifests={}) as plane:
        dev_id = plane.create_developer(name="acme")
        key = plane.create_api_key(dev_id)
    valid = {"dev-id": dev_id, "x-api-key": key}
    key_id = key.split(".")[0]
    wrong_keys = itertools.cycle([
        {"dev-id": dev_id, "x-api-key": f"{key_id}.{secrets.token_urlsafe(32)}"},  # a real key id: the costly path
        {"dev-id": dev_id, "x-api-key": f"hfk_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"},
        {"dev-id": f"dev-{secrets.token_hex(6)}", "x-api-key": f"hfk_{secrets.token_hex(8)}.x{'y' * 40}"},
        {"dev-id": dev_id, "x-api-key": "not-a-key"},
    ])
    clients = [f"127.0.0.{10 + i}" for i in range(4)]  # four client addresses, four connections each

    with serve(state) as (process, port):
        idle = p50_latency(port, valid)

        stop, lock = threading.Event(), threading.Lock()
        answers: list[tuple[int, dict[str, str], bytes]] = []

        def flood(source: str) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
            try:
                while not stop.is_set():
                    with lock:
                        headers = next(wrong_keys)
                    answer = get(port, "/v2/userInfo?user_id=nobody", headers, connection=conn)
                    with lock:
                        answers.append(answer)
            finally:
                conn.close()

        threads = [threading.Thread(target=flood, args=(clients[i % 4],), daemon=True) for i in range(16)]
        cpu_before = cpu_seconds(process.pid)
        for thread in threads:
            thread.start()
        while len(answers) < 100:  # the flood is under way
            time.sleep(0.01)
        flooded = p50_latency(port, valid)
        while len(answers) < 400:
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(60)
        server_cpu = cpu_seconds(process.pid) - cpu_before
        peak_rss = next(line.split()[1] for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                        if line.startswith("VmHWM:"))

    started = time.process_time()
    hash_api_key(key)
    scrypt_cpu = time.process_time() - started
    statuses = Counter(status for status, _, _ in answers)
    per_request_cpu = server_cpu / len(answers)
    print(f"\nvalid p50 idle {idle * 1000:.1f} ms, under a flood of {len(answers)} wrong-key requests "
          f"({dict(statuses)}) {flooded * 1000:.1f} ms (x{flooded / idle:.1f}); server CPU {server_cpu:.2f} s, "
          f"{per_request_cpu * 1000:.2f} ms per flood request; one scrypt {scrypt_cpu * 1000:.1f} ms CPU; server peak "
          f"RSS {int(peak_rss) // 1024} MiB")
    assert set(statuses) <= {403, 429, 503}
    assert statuses[429] > len(answers) / 2
    assert all(int(h["retry-after"]) >= 1 for status, h, _ in answers if status in (429, 503))
    assert statuses[403] <= 4 * 20 + 16  # each client's 20 failures a minute (+ racing in-flight checks)
    assert per_request_cpu < scrypt_cpu / 4  # most wrong keys cost no scrypt
    assert flooded <= 10 * idle, f"valid p50 went from {idle:.4f} s to {flooded:.4f} s under the flood"


def from_address(url: str, source: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` from the loopback address ``source`` (127.0.0.0/8 all reach the server: one client each)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        return get(int(port), "/" + url.split("/", 3)[3], headers, connection=conn)
    finally:
        conn.close()


def test_failures_are_throttled_per_client_and_per_dev_id_without_locking_out_working_keys_or_clean_clients(tmp_path):
    from controlplane.api import BackgroundServer, create_app
    from controlplane.auth.guard import ApiKeyGuard, FailureThrottle

    plane = ControlPlane(f"sqlite:///{tmp_path}/state.db", SECRET, manifests={}).open()
    dev_id = plane.create_developer()
    key, second_key = plane.create_api_key(dev_id), plane.create_api_key(dev_id)
    guard = ApiKeyGuard(plane.developers, FailureThrottle(per_client="3/minute", per_developer="3/minute"))
    with BackgroundServer() as server:
        server.start(create_app(plane, api_key_guard=guard))
        url = f"{server.url}/v2/userInfo?user_id=nobody"
        right = {"dev-id": dev_id, "x-api-key": key}
        made_up = {"dev-id": dev_id, "x-api-key": f"hfk_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"}
        assert from_address(url, "127.0.0.2", right)[0] == 404  # verified once: remembered

        # one client's made-up keys: 3 refusals, then 429 with Retry-After, without a key check
        assert [from_address(url, "127.0.0.3", made_up)[0] for _ in range(3)] == [403, 403, 403]
        status, headers, body = from_address(url, "127.0.0.3", made_up)
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60 and b"for this client" in body
        assert from_address(url, "127.0.0.3", right)[0] == 404  # a working key still works from there
        assert from_address(url, "127.0.0.3", {"dev-id": dev_id, "x-api-key": second_key})[0] == 429  # not checked
        # made-up keys from many clients do not lock the dev-id out ...
        assert from_address(url, "127.0.0.4", {"dev-id": dev_id, "x-api-key": second_key})[0] == 404
        # ... and wrong secrets for its real keys (a dev-id and key id are all an outsider needs) lock out no one
        # but the clients that failed: 3 of them from any clients use up the dev-id's budget ...
        wrong_secret = {"dev-id": dev_id, "x-api-key": f"{key.split('.')[0]}.{secrets.token_urlsafe(32)}"}
        assert [from_address(url, f"127.0.0.{5 + i}", wrong_secret)[0] for i in range(3)] == [403, 403, 403]
        third_key, fourth_key = plane.create_api_key(dev_id), plane.create_api_key(dev_id)
        # ... a client that failed in the window is refused for the dev-id's failures, even with a live new key ...
        status, headers, body = from_address(url, "127.0.0.5", {"dev-id": dev_id, "x-api-key": third_key})
        assert status == 429 and b"for this dev-id" in body and int(headers["retry-after"]) >= 1
        # ... while a client with no failures of its own still gets its new key checked (on the hash gate)
        assert from_address(url, "127.0.0.9", {"dev-id": dev_id, "x-api-key": third_key})[0] == 404
        assert from_address(url, "127.0.0.10", {"dev-id": dev_id, "x-api-key": fourth_key})[0] == 404
        assert from_address(url, "127.0.0.10", wrong_secret)[0] == 403  # its own first failure, then ...
        assert from_address(url, "127.0.0.10", wrong_secret)[0] == 429  # ... the dev-id's budget applies to it
        assert from_address(url, "127.0.0.5", right)[0] == 404  # remembered keys are never throttled
    guard.close()
    plane.close()


def add_leftovers(plane: ControlPlane, tag: str, *, expired: bool = True) -> None:
    """A widget session and a pending connection as a login abandoned long ago leaves them (or fresh ones)."""
    at = 0 if expired else int(time.time() * 1000)
    with plane.store.transaction() as cur:
        cur.execute(f"INSERT INTO {plane.t_sessions} (session_id, dev_id, providers, created_at_ms, expires_at_ms) "
                    "VALUES (?, ?, ?, ?, ?)", [f"session-{tag}", "dev-1", "oura", at, at + 900_000])
        plane.connections_repo.insert_pending(cur, f"user-{tag}", "dev-1", "oura", None, None, at)


def leftovers(plane: ControlPlane) -> tuple[list[str], list[str]]:
    sessions = [r[0] for r in plane.store.query(f"SELECT session_id FROM {plane.t_sessions} ORDER BY 1")]
    users = [r[0] for r in plane.store.query(f"SELECT user_id FROM {plane.t_users} ORDER BY 1")]
    return sessions, users


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_serve_purges_expired_sessions_and_abandoned_logins_at_start_and_on_a_schedule(tmp_path):
    state = f"sqlite:///{tmp_path}/state.db"
    with ControlPlane(state, SECRET, manifests={}) as plane:
        add_leftovers(plane, "old-1")
        add_leftovers(plane, "old-2")
        add_leftovers(plane, "fresh", expired=False)
        with serve(state, "--purge-interval", "0.5"):
            wait_for(lambda: leftovers(plane) == (["session-fresh"], ["user-fresh"]))  # purged at start
            add_leftovers(plane, "old-3")
            wait_for(lambda: leftovers(plane) == (["session-fresh"], ["user-fresh"]))  # and again on schedule


def test_a_failing_purge_is_tried_again_and_bad_intervals_fail_at_start(tmp_path):
    from controlplane.auth.housekeeping import Housekeeping
    from core.errors import FatalError

    with ControlPlane(f"sqlite:///{tmp_path}/state.db", SECRET, manifests={}) as plane:
        plane.drop_tables()  # the store cannot purge for now
        with Housekeeping(plane, interval_s=0.1).start() as housekeeping:
            wait_for(lambda: housekeeping.runs >= 2)
            plane.open()
            add_leftovers(plane, "old")
            wait_for(lambda: leftovers(plane) == ([], []))
    for interval in (0, -1, float("nan")):
        try:
            Housekeeping(plane, interval_s=interval)
        except FatalError as exc:
            assert "positive number of seconds" in str(exc)
        else:
            raise AssertionError(f"interval {interval} accepted")
    assert subprocess.run([sys.executable, "-m", "runners.cli", "serve", "--purge-interval", "0", "--state",
                           f"sqlite:///{tmp_path}/other.db"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HEALTHFLOW_SECRET_KEY": SECRET}).stderr.strip() == \
        "healthflow: --purge-interval must be a positive number of seconds, got 0.0"


def test_failure_counts_are_shared_through_redis_and_an_unreachable_redis_fails_open(caplog):
    """Two API processes with --redis count one client's failures together; without Redis they are not refused."""
    from controlplane.auth.guard import FailureThrottle, Throttled

    first, second = (FailureThrottle("3/minute", "3/minute", "redis://127.0.0.1:6379/0") for _ in range(2))
    client, dev_id = f"198.51.100.{secrets.randbelow(250)}-{secrets.token_hex(4)}", f"dev-{secrets.token_hex(4)}"
    first.failed(client)
    second.failed(client, dev_id)
    first.failed(client)
    second.check("192.0.2.1", dev_id)  # another client, one dev-id failure: fine
    try:
        second.check(client, dev_id)
    except Throttled as exc:
        assert 1 <= exc.retry_after <= 60 and "client" in str(exc)
    else:
        raise AssertionError("three failures through two processes were not throttled")

    down = FailureThrottle("1/minute", "1/minute", "redis://127.0.0.1:1/0")
    down.failed(client, dev_id)
    down.check(client, dev_id)  # not refused: the hash gate still bounds the work
    assert "API-key throttle unavailable" in caplog.text


@contextmanager
def unanswering_redis(accepts: bool) -> Iterator[str]:
    """A redis:// URL of a loopback socket that never answers: connections are accepted by the kernel and never
    read (``accepts``), or its accept queue is full, so connecting hangs."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8 if accepts else 0)
        filler = None if accepts else socket.create_connection(blackhole.getsockname(), timeout=1)
        try:
            yield f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0"
        finally:
            if filler is not None:
                filler.close()


def timed(call, *args) -> float:
    """Seconds ``call(*args)`` took (on a daemon thread: a call that hangs fails the test instead of hanging it)."""
    done = threading.Event()
    started = time.monotonic()
    threading.Thread(target=lambda: (call(*args), done.set()), daemon=True).start()
    assert done.wait(5), f"{call.__name__} did not return within 5 s"
    return time.monotonic() - started


def test_an_unanswering_redis_fails_open_within_a_second_and_is_left_alone_for_a_while(caplog):
    from controlplane.auth.guard import FailureThrottle

    for accepts in (True, False):
        with unanswering_redis(accepts) as url:
            throttle = FailureThrottle("1/minute", "1/minute", url, backoff_s=0.5)
            client, dev_id = "192.0.2.7", "dev-1"
            assert timed(throttle.check, client, dev_id) < 1.0  # the first check waits for the timeout ...
            assert timed(throttle.failed, client, dev_id) < 0.05  # ... then the storage is left alone
            assert timed(throttle.check, client, dev_id) < 0.05
            time.sleep(0.6)
            assert timed(throttle.check, client, dev_id) < 1.0  # tried again after the backoff, failing open again
    assert caplog.text.count("API-key throttle unavailable") == 4, caplog.text
