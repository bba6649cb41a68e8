"""Connecting in progress: widget sessions (table ``widget_sessions``) and pending authorizations, one per OAuth
authorization-code flow with its single-use state (table ``oauth_flows``). Both expire and are purged."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

from controlplane.auth.model import WIDGET_SESSION_TTL_S, Flow, WidgetSession, check_redirect_url
from controlplane.auth.providers import Providers
from controlplane.auth.tables import Tables
from core.store import now_ms

_FLOW_COLUMNS = ("flow_id, state_hash, user_id, dev_id, provider, reference_id, widget_session_id, redirect_uri, "
                 "success_url, failure_url, verifier, expires_at_ms, used_at_ms")


class WidgetSessions:
    def __init__(self, tables: Tables, providers: Providers) -> None:
        self.tables, self.providers = tables, providers

    def ddl(self) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {self.tables.sessions} (session_id TEXT PRIMARY KEY, dev_id TEXT NOT "
                "NULL, reference_id TEXT, providers TEXT NOT NULL, language TEXT, success_url TEXT, failure_url TEXT, "
                "created_at_ms BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL)"]

    def create_widget_session(self, dev_id: str, *, reference_id: str | None = None,
                              providers: Iterable[str] | None = None, language: str | None = None,
                              success_url: str | None = None, failure_url: str | None = None,
                              ttl_s: int = WIDGET_SESSION_TTL_S) -> WidgetSession:
        slugs = tuple(dict.fromkeys(self.providers.provider_slug(p) for p in providers)) if providers else tuple(
            self.providers.connectable())
        for slug in slugs:
            self.providers.oauth(slug)._require_client()
        session = WidgetSession(secrets.token_urlsafe(24), dev_id, reference_id, slugs, language,
                                check_redirect_url(success_url, "auth_success_redirect_url"),
                                check_redirect_url(failure_url, "auth_failure_redirect_url"),
                                now_ms() + ttl_s * 1000)
        self.tables.store.execute(
            f"INSERT INTO {self.tables.sessions} (session_id, dev_id, reference_id, providers, language, success_url, "
            "failure_url, created_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [session.session_id, dev_id, reference_id, ",".join(slugs), language, session.success_url,
             session.failure_url, now_ms(), session.expires_at_ms])
        return session

    def widget_session(self, session_id: str) -> WidgetSession | None:
        rows = self.tables.store.query(f"SELECT session_id, dev_id, reference_id, providers, language, success_url, "
                                       f"failure_url, expires_at_ms FROM {self.tables.sessions} WHERE session_id = ?",
                                       [session_id])
        if not rows:
            return None
        sid, dev, ref, providers, language, ok_url, fail_url, expires = rows[0]
        return WidgetSession(sid, dev, ref, tuple(p for p in providers.split(",") if p), language, ok_url, fail_url,
                             expires)

    def purge(self, cur: Any, cutoff: int) -> None:
        cur.execute(f"DELETE FROM {self.tables.sessions} WHERE expires_at_ms < ?", [cutoff])


class AuthFlows:
    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    def ddl(self) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {self.tables.flows} (flow_id TEXT PRIMARY KEY, state_hash TEXT NOT "
                "NULL, user_id TEXT NOT NULL, dev_id TEXT NOT NULL, provider TEXT NOT NULL, reference_id TEXT, "
                "widget_session_id TEXT, redirect_uri TEXT NOT NULL, success_url TEXT, failure_url TEXT, verifier "
                "TEXT, created_at_ms BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL, used_at_ms BIGINT)"]

    def insert(self, cur: Any, flow: Flow, created_at_ms: int) -> None:
        cur.execute(f"INSERT INTO {self.tables.flows} ({_FLOW_COLUMNS}, created_at_ms) VALUES "
                    f"({', '.join('?' * 14)})",
                    [flow.flow_id, flow.state_hash, flow.user_id, flow.dev_id, flow.provider, flow.reference_id,
                     flow.widget_session_id, flow.redirect_uri, flow.success_url, flow.failure_url, flow.verifier,
                     flow.expires_at_ms, flow.used_at_ms, created_at_ms])

    def lock(self, cur: Any, flow_id: str) -> Flow | None:
        """The pending authorization, its row locked; None when there is none."""
        rows = cur.execute(f"SELECT {_FLOW_COLUMNS} FROM {self.tables.flows} WHERE flow_id = ?"
                           f"{self.tables.for_update}", [flow_id]).fetchall()
        return Flow(*rows[0]) if rows else None

    def mark_used(self, cur: Any, flow_id: str, at: int) -> None:
        cur.execute(f"UPDATE {self.tables.flows} SET used_at_ms = ? WHERE flow_id = ?", [at, flow_id])

    def purge(self, cur: Any, cutoff: int) -> None:
        """Delete expired authorizations and those whose pending connection is gone."""
        cur.execute(f"DELETE FROM {self.tables.flows} WHERE expires_at_ms < ? OR user_id NOT IN "
                    f"(SELECT user_id FROM {self.tables.users})", [cutoff])
