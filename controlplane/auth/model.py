"""What the control plane keeps and hands out: connection states, connections, tokens, widget sessions, pending
authorizations, the outcome of a connect, and the errors callers see."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from core.errors import PermanentError
from core.store import now_ms

PENDING, ACTIVE, DEAUTH, REVOKED = "pending", "active", "deauth", "revoked"
WIDGET_SESSION_TTL_S = 900

Emit = Callable[[dict[str, Any]], None]


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="microseconds")


class UnknownUser(KeyError):
    """No such connection (or it belongs to another developer)."""


class UnknownProvider(KeyError):
    """No provider of that name."""


class ConnectionInactive(PermanentError):
    """The connection has no usable tokens (pending, deauthenticated or revoked)."""


class ConnectionRevoked(ConnectionInactive):
    """The provider refused the refresh: the user must connect again."""


@dataclass(frozen=True)
class Connection:
    user_id: str
    dev_id: str
    provider: str  # slug
    terra_name: str
    reference_id: str | None
    provider_user_id: str | None
    scopes: str | None
    state: str
    widget_session_id: str | None
    created_at_ms: int
    last_webhook_update_ms: int | None

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def terra_user(self) -> dict[str, Any]:
        """Terra's ``TerraUser``."""
        return {"user_id": self.user_id, "provider": self.terra_name, "reference_id": self.reference_id,
                "scopes": self.scopes, "created_at": iso(self.created_at_ms),
                "last_webhook_update": iso(self.last_webhook_update_ms), "active": self.active}


@dataclass(frozen=True)
class Tokens:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    token_type: str
    expires_at_ms: int | None
    version: int

    @property
    def token(self) -> dict[str, Any]:
        """The RFC 6749 token fields, as the OAuth client takes them."""
        found = {"access_token": self.access_token, "token_type": self.token_type}
        return found | ({"refresh_token": self.refresh_token} if self.refresh_token else {})


@dataclass(frozen=True)
class WidgetSession:
    session_id: str
    dev_id: str
    reference_id: str | None
    providers: tuple[str, ...]  # slugs
    language: str | None
    success_url: str | None
    failure_url: str | None
    expires_at_ms: int

    @property
    def expired(self) -> bool:
        return now_ms() >= self.expires_at_ms


@dataclass(frozen=True)
class AuthStart:
    user_id: str
    auth_url: str
    flow_id: str


@dataclass(frozen=True)
class AuthOutcome:
    """How a callback ended: where to send the browser (None: nowhere known) and why."""

    ok: bool
    redirect_url: str | None
    connection: Connection | None = None
    reason: str | None = None
    message: str = ""


@dataclass
class Flow:
    """A pending authorization: one OAuth authorization-code flow, from ``start_auth`` to its callback."""

    flow_id: str
    state_hash: str
    user_id: str
    dev_id: str
    provider: str
    reference_id: str | None
    widget_session_id: str | None
    redirect_uri: str
    success_url: str | None
    failure_url: str | None
    verifier: str | None
    expires_at_ms: int
    used_at_ms: int | None


def check_redirect_url(url: str | None, what: str) -> str | None:
    """Absolute http(s) URLs only (never ``javascript:`` and the like)."""
    if url in (None, ""):
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute http(s) URL, got {url!r}")
    return url


def with_query(url: str, params: Mapping[str, str | None]) -> str:
    parts = urlsplit(url)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, f"{parts.query}&{extra}" if parts.query else extra,
                       parts.fragment))
