"""WHOOP API v2 client code the manifest cannot express: the poll hook attaching each recovery's sleep."""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.hooks import Request, ResponseHook
from connectors.timeutil import parse_iso
from core.errors import PermanentError

log = logging.getLogger(__name__)

SLEEP_PATH = "/v2/activity/sleep/{id}"
SLEEPS_PATH = "/v2/activity/sleep"
CYCLE_RECOVERY_PATH = "/v2/cycle/{id}/recovery"
MAX_CACHED_PER_USER = 500  # sleeps remembered per user (about a year of nights and naps)
MAX_CACHED = 50_000  # sleeps remembered in all (the oldest users' go first)
SLEEP_TTL_S = 3600.0  # > 2 × the scheduler's poll interval (900 s ± 10 %): a round's sleep page serves its recoveries
PAGE_SIZE = 25  # WHOOP's largest page
MAX_SLEEP_PAGES = 8  # windowed sleep pages asked per recovery page (25 recoveries: 2 or 3 with naps)
SLEEP_BEFORE_RECOVERY = timedelta(days=1)  # a recovery is created when its sleep ends: the sleep started within a day


def _records(body: Any) -> list[Any] | None:
    """The records of a collection page, ``[body]`` for a single record, None for anything else."""
    if isinstance(body, dict) and isinstance(body.get("records"), list):
        return body["records"]
    return [body] if isinstance(body, dict) else None


def _is_sleep(doc: Any) -> bool:
    """A sleep record (``GET /v2/activity/sleep/{id}``), not a recovery: it has times and no ``sleep_id``."""
    return isinstance(doc, dict) and "sleep_id" not in doc and doc.get("id") is not None and "start" in doc


def _iso(moment: datetime) -> str:
    """WHOOP's date-time parameter form: UTC with milliseconds and ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _path(template: str, identifier: Any) -> str:
    return template.replace("{id}", urllib.parse.quote(str(identifier), safe=""))


class WhoopPollHook(ResponseHook):
    """Attaches to every recovery its sleep (``sleep``: ``GET /v2/activity/sleep/{sleep_id}``), which the recovery
    mapper needs for the Sleep's times.

    Sleeps come from the sleep pages this hook saw, remembered per user for ``sleep_ttl_s`` (an hour: more than two
    poll intervals, as each kind is polled on its own timer) and at most ``MAX_CACHED_PER_USER`` per user and
    ``MAX_CACHED`` in all (expired entries are pruned). The sleeps of a recovery page not remembered (first poll after
    connecting, a restart) are asked with one windowed ``GET /v2/activity/sleep?start=&end=`` (paged, at most
    ``MAX_SLEEP_PAGES``) from a day before the first recovery's ``created_at`` to the last one's; only the sleeps that
    misses are fetched by id, once per page, through ``request.fetch`` (rate limited, retried: WHOOP allows 100
    requests a minute app-wide). A sleep that cannot be fetched for good (404: deleted at WHOOP;
    403: no ``read:sleep`` scope) leaves its recovery without ``sleep`` and with ``_sleep_missing`` saying why: the
    mapper refuses it with that reason and the pipeline dead-letters it with its bytes. Transient failures raise, so
    the window is polled again.

    A sleep fetched by id (``sleep.updated``, ``recovery.deleted``) gets its cycle's recovery attached as
    ``_recovery`` (``GET /v2/cycle/{cycle_id}/recovery``; None when the cycle has none of this sleep): the mapper
    makes the whole Sleep of it, replacing the stored one, so a deleted recovery's fields are cleared.

    A recovery fetched by id (a ``recovery.updated`` notification names the sleep's UUID; the manifest's
    ``item_path`` is the sleep) arrives here as that sleep: the hook asks ``GET /v2/cycle/{cycle_id}/recovery`` and
    publishes that recovery with the sleep attached (nothing when the cycle has no recovery: a nap, or deleted).
    """

    attaches = {"recovery": ("sleep",)}

    def __init__(self, sleep_ttl_s: float = SLEEP_TTL_S) -> None:
        self.sleep_ttl_s = sleep_ttl_s
        self._sleeps: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}  # user → sleep id → (at, sleep)
        self._pruned_at = time.monotonic()
        self._lock = threading.Lock()

    def cached(self) -> int:
        """How many sleeps are remembered, in all users."""
        with self._lock:
            return sum(len(cache) for cache in self._sleeps.values())

    def payloads(self, request: Request, body: Any) -> list[Any]:
        if body is None:
            return []
        user = str(request.connection.user_id)
        if request.kind == "sleep":
            self._remember(user, [doc for doc in _records(body) or [] if _is_sleep(doc)])
            if request.start is None and request.end is None and _is_sleep(body):  # by id: a notification's
                return [self._with_recovery(request, user, body)]
            return [body]
        if request.kind != "recovery":
            return [body]
        if _is_sleep(body):
            return self._recovery_of(request, user, body)
        records = _records(body)
        if records is None:
            return [body]  # not WHOOP's shape: published as is, the pipeline dead-letters it with its reason
        attached = self._attach(request, user, records)
        if all(new is old for new, old in zip(attached, records, strict=True)):
            return [body]  # nothing to attach (an empty page, sleeps already there): the provider's bytes as they are
        return [{**body, "records": attached} if "records" in body else attached[0]]

    # ------------------------------------------------------------------------------------------------ internals
    def _remember(self, user: str, sleeps: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._pruned_at >= min(self.sleep_ttl_s, 600):
                self._prune(now)
            cache = self._sleeps.pop(user, {})
            self._sleeps[user] = cache  # the users last remembered come last
            for sleep in sleeps:
                cache.pop(str(sleep["id"]), None)
                cache[str(sleep["id"])] = (now, sleep)
            while len(cache) > MAX_CACHED_PER_USER:
                cache.pop(next(iter(cache)))
            total = sum(len(found) for found in self._sleeps.values())
            while total > MAX_CACHED:  # the users remembered longest ago go first
                oldest = next(iter(self._sleeps))
                total -= len(self._sleeps.pop(oldest))

    def _prune(self, now: float) -> None:
        """Forget expired sleeps, and users with none left (under the lock)."""
        self._pruned_at = now
        for user in list(self._sleeps):
            cache = self._sleeps[user]
            for sleep_id in [i for i, (at, _) in cache.items() if now - at >= self.sleep_ttl_s]:
                del cache[sleep_id]
            if not cache:
                del self._sleeps[user]

    def _cached(self, user: str, sleep_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._sleeps.get(user, {}).get(sleep_id)
        return found[1] if found and time.monotonic() - found[0] < self.sleep_ttl_s else None

    def _attach(self, request: Request, user: str, records: list[Any]) -> list[Any]:
        """Each recovery with ``sleep`` (or ``_sleep_missing``); one request per sleep not seen, however many
        recoveries of the page name it."""
        fetched: dict[str, dict[str, Any] | str] = {}  # sleep id → sleep, or why it cannot be had
        unknown = [r for r in records if isinstance(r, dict) and r.get("sleep_id") not in (None, "")
                   and "sleep" not in r and self._cached(user, str(r["sleep_id"])) is None]
        if unknown:
            fetched.update(self._sleeps_of_window(request, user, unknown))
        out = []
        for record in records:
            if not isinstance(record, dict) or record.get("sleep_id") in (None, "") or "sleep" in record:
                out.append(record)
                continue
            sleep_id = str(record["sleep_id"])
            if sleep_id not in fetched:
                fetched[sleep_id] = self._cached(user, sleep_id) or self._fetch_sleep(request, user, sleep_id)
            found = fetched[sleep_id]
            out.append({**record, "sleep": found} if isinstance(found, dict) else {**record, "_sleep_missing": found})
        return out

    def _sleeps_of_window(self, request: Request, user: str, recoveries: list[dict[str, Any]],
                          ) -> dict[str, dict[str, Any]]:
        """The sleeps of ``recoveries`` found in one windowed, paged ``GET /v2/activity/sleep`` (by sleep id); none
        when the recoveries carry no ``created_at`` or the sleeps cannot be listed (then they are fetched by id)."""
        created = []
        for recovery in recoveries:
            try:
                created.append(parse_iso(str(recovery["created_at"])).astimezone(UTC))
            except (KeyError, ValueError):
                continue
        if not created:
            return {}
        wanted = {str(r["sleep_id"]) for r in recoveries}
        params = {"start": _iso(min(created) - SLEEP_BEFORE_RECOVERY), "end": _iso(max(created) + timedelta(
            minutes=1)), "limit": str(PAGE_SIZE)}
        found: dict[str, dict[str, Any]] = {}
        for _ in range(MAX_SLEEP_PAGES):
            try:
                page = request.fetch(SLEEPS_PATH, params)
            except PermanentError as exc:  # e.g. no read:sleep scope: by id, which says why for each recovery
                log.warning("whoop %s: GET %s %s failed (%s); the sleeps are asked by id", user, SLEEPS_PATH,
                            params, exc)
                break
            sleeps = [doc for doc in _records(page) or [] if _is_sleep(doc)]
            self._remember(user, sleeps)
            found.update((str(sleep["id"]), sleep) for sleep in sleeps if str(sleep["id"]) in wanted)
            token = page.get("next_token") if isinstance(page, dict) else None
            if not token or wanted <= found.keys():
                break
            params = {**params, "nextToken": str(token)}
        return found

    def _fetch_sleep(self, request: Request, user: str, sleep_id: str) -> dict[str, Any] | str:
        path = _path(SLEEP_PATH, sleep_id)
        try:
            sleep = request.fetch(path)
        except PermanentError as exc:
            status = getattr(exc, "status", None)
            why = "the sleep was deleted at WHOOP" if status == 404 else str(exc)
            log.warning("whoop %s: recovery of sleep %s without its sleep: GET %s failed: %s", user, sleep_id, path,
                        exc)
            return f"GET {path} answered {status or 'an error'}: {why}"
        if not _is_sleep(sleep):
            return f"GET {path} did not answer a sleep record"
        self._remember(user, [sleep])
        return sleep

    def _with_recovery(self, request: Request, user: str, sleep: dict[str, Any]) -> dict[str, Any]:
        """A sleep fetched by id with ``_recovery``: its cycle's recovery, or None when the cycle has none of this
        sleep (deleted, or a nap). A recovery that cannot be asked for good (no ``read:recovery`` scope) leaves the
        sleep as it is (merged, not replacing); transient failures raise."""
        if sleep.get("cycle_id") is None:
            return sleep
        path = _path(CYCLE_RECOVERY_PATH, sleep["cycle_id"])
        try:
            found = request.fetch(path)
        except PermanentError as exc:
            if getattr(exc, "status", None) != 404:
                log.warning("whoop %s: GET %s failed (%s); sleep %s merged without knowing its recovery", user,
                            path, exc, sleep.get("id"))
                return sleep
            found = None
        mine = isinstance(found, dict) and str(found.get("sleep_id")) == str(sleep["id"])
        return {**sleep, "_recovery": found if mine else None}

    def _recovery_of(self, request: Request, user: str, sleep: dict[str, Any]) -> list[Any]:
        """The recovery of a sleep fetched by id, with the sleep attached."""
        self._remember(user, [sleep])
        if sleep.get("cycle_id") is None:
            log.warning("whoop %s: sleep %s names no cycle_id; its recovery cannot be asked", user, sleep.get("id"))
            return []
        path = _path(CYCLE_RECOVERY_PATH, sleep["cycle_id"])
        try:
            recovery = request.fetch(path)
        except PermanentError as exc:
            if getattr(exc, "status", None) == 404:
                log.info("whoop %s: cycle %s has no recovery (nap, or deleted): nothing to publish", user,
                         sleep["cycle_id"])
                return []
            raise
        if not isinstance(recovery, dict):
            return []
        if str(recovery.get("sleep_id")) != str(sleep["id"]):
            log.info("whoop %s: the recovery of cycle %s is of sleep %s, not %s (a nap's notification)", user,
                     sleep["cycle_id"], recovery.get("sleep_id"), sleep["id"])
            return self._attach(request, user, [recovery])
        return [{**recovery, "sleep": sleep}]

