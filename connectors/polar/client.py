"""Polar AccessLink client code the manifest cannot express: the poll hook."""

from __future__ import annotations

from typing import Any

from connectors.polling.hooks import Request, ResponseHook


class PolarHook(ResponseHook):
    """Bare JSON arrays (``/v3/exercises``) are published item by item, as the Polar mappers expect."""

    def payloads(self, request: Request, body: Any) -> list[Any]:
        if isinstance(body, list):
            return [item for item in body if item is not None]
        return super().payloads(request, body)


POLL_HOOK = PolarHook
