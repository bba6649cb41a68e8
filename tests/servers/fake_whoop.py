"""A fake WHOOP API v2 on loopback: ``FakeProviderApi`` played from WHOOP's manifest, plus the by-id paths.

    with FakeWhoopApi(token_validator=fake_provider.is_live) as api:
        api.add("sleep", sleeps)          # collections by window: cycle/sleep/workout by start, recovery by created_at
        api.add("recovery", recoveries)   # {"records": [...], "next_token"} pages of at most 25 (limit > 25: 400)
        api.delete("sleep", sleep_id)     # gone: out of its collection, 404 by id

Single records as WHOOP serves them (https://developer.whoop.com/api): ``GET /v2/activity/sleep/{id}`` and
``/v2/activity/workout/{id}`` (the manifest's ``item_path``, served by ``FakeProviderApi``), ``/v2/cycle/{id}``, and
``/v2/cycle/{cycleId}/recovery`` (the cycle's recovery); an unknown or deleted id answers 404. Auth, 429s and
failures work as in ``FakeProviderApi``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from connectors.manifest import Endpoint, Manifest
from servers.fake_provider_api import FakeProviderApi

CYCLE = re.compile(r"/v2/cycle/(?P<id>[^/]+)")  # sleep and workout by id: the manifest's item_path
CYCLE_RECOVERY = re.compile(r"/v2/cycle/(?P<id>[^/]+)/recovery")


@dataclass
class FakeWhoopApi(FakeProviderApi):
    provider: str | Manifest = "whoop"

    def delete(self, kind: str, record_id: str) -> None:
        """The user deleted the record at WHOOP (for a sleep: its recovery goes with it; a recovery is named by its
        ``sleep_id``)."""
        field = "sleep_id" if kind == "recovery" else "id"
        with self._lock:
            self.documents[kind] = [d for d in self.documents.get(kind, []) if str(d.get(field)) != record_id]
            if kind == "sleep":
                self.documents["recovery"] = [d for d in self.documents.get("recovery", [])
                                              if str(d.get("sleep_id")) != record_id]

    def _item(self, path: str) -> Any:
        with self._lock:
            if match := CYCLE_RECOVERY.fullmatch(path):
                found = [d for d in self.documents.get("recovery", []) if str(d.get("cycle_id")) == match["id"]]
                return copy.deepcopy(found[0]) if found else None
            if match := CYCLE.fullmatch(path):
                found = [d for d in self.documents.get("cycle", []) if str(d.get("id")) == match["id"]]
                return copy.deepcopy(found[0]) if found else None
        return None

    def _answer(self, path: str, params: dict[str, str], token: str | None, kind: str | None,
                endpoint: Endpoint | None, match: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        status, headers, reply = super()._answer(path, params, token, kind, endpoint, match)
        if status != 404 or kind is not None:  # auth, 429s and failures first, as for any request
            return status, headers, reply
        item = self._item(path)
        return (200, {}, item) if item is not None else (404, {}, {"error": f"no such record {path}"})
