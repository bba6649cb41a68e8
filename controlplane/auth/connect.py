"""Connecting a user: ``start_auth`` creates a pending connection and its authorization (a single-use state, PKCE
where the manifest asks); ``complete_auth`` handles the provider's redirect back and activates the connection,
superseding the developer's older connections of the same provider account."""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from connectors.oauth import ProviderOAuth
from controlplane.auth import events as ev
from controlplane.auth.connections import Connections
from controlplane.auth.model import DEAUTH, PENDING, AuthOutcome, AuthStart, Flow, check_redirect_url, with_query
from controlplane.auth.outbox import Outbox
from controlplane.auth.providers import Providers
from controlplane.auth.secrets import TokenCipher, sha256_hex
from controlplane.auth.sessions import AuthFlows
from controlplane.auth.tables import Tables
from controlplane.auth.tokens import TokenStore
from core.errors import HealthflowError, PermanentError
from core.store import now_ms

log = logging.getLogger(__name__)

_REASON = re.compile(r"^[a-z0-9_.-]{1,64}$")


class Connect:
    def __init__(self, tables: Tables, providers: Providers, connections: Connections, tokens: TokenStore,
                 flows: AuthFlows, outbox: Outbox, cipher: TokenCipher, public_url: str,
                 state_ttl_s: float = 900.0) -> None:
        self.tables, self.providers, self.connections, self.tokens = tables, providers, connections, tokens
        self.flows, self.outbox, self.cipher = flows, outbox, cipher
        self.public_url, self.state_ttl_s = public_url, state_ttl_s

    def callback_url(self, slug: str) -> str:
        return f"{self.public_url}/v2/auth/callback/{slug}"

    def start_auth(self, dev_id: str, provider: str, *, reference_id: str | None = None,
                   success_url: str | None = None, failure_url: str | None = None,
                   widget_session_id: str | None = None) -> AuthStart:
        """Create a pending connection and the provider's authorize URL (with a single-use state)."""
        oauth = self.providers.oauth(provider)
        slug = oauth.slug
        success_url = check_redirect_url(success_url, "auth_success_redirect_url")
        failure_url = check_redirect_url(failure_url, "auth_failure_redirect_url")
        user_id, flow_id, secret = str(uuid.uuid4()), uuid.uuid4().hex, secrets.token_urlsafe(32)
        state = f"{flow_id}.{secret}"
        verifier = oauth.new_code_verifier()
        redirect_uri = self.callback_url(slug)
        auth_url = oauth.authorization_url(redirect_uri, state, verifier)
        at = now_ms()
        with self.tables.store.transaction() as cur:
            self.connections.insert_pending(cur, user_id, dev_id, slug, reference_id, widget_session_id, at)
            self.flows.insert(cur, Flow(flow_id, sha256_hex(secret), user_id, dev_id, slug, reference_id,
                                        widget_session_id, redirect_uri, success_url, failure_url,
                                        self.cipher.encrypt(flow_id, verifier) if verifier else None,
                                        at + int(self.state_ttl_s * 1000), None), at)
        return AuthStart(user_id, auth_url, flow_id)

    def complete_auth(self, provider: str, params: Mapping[str, str]) -> AuthOutcome:
        """Handle the provider's redirect back (``code``/``state`` or ``error``).

        Only the state's secret (issued in the authorize URL, stored as a hash) can end an authorization: a state
        naming an existing flow with a wrong secret is answered like an unknown one (``invalid_state``, no redirect
        that would reveal the developer's URLs) and changes nothing, so knowing a flow id (it is in lifecycle
        events) does not let anyone cancel someone else's login. A wrong secret cannot be guessed (256 bits), so
        wrong tries are logged rather than counted toward expiring the flow, which would let them burn it again.
        """
        slug = self.providers.provider_slug(provider)
        flow_id, _, secret = (params.get("state") or "").partition(".")
        at = now_ms()
        pending: list[dict[str, Any]] = []
        with self.tables.store.transaction() as cur:
            flow = self.flows.lock(cur, flow_id)
            if flow is None or not hmac.compare_digest(sha256_hex(secret), flow.state_hash):
                if flow is not None:  # someone knows the flow id but not its secret: they change nothing
                    log.warning("auth %s: callback with a wrong state secret refused; the authorization stays "
                                "open", flow.flow_id)
                return AuthOutcome(False, None, reason="invalid_state",
                                   message="unknown or malformed state: start the connection again")
            reason, message = self._check_callback(flow, slug, params, at)
            if flow.used_at_ms is None:
                self.flows.mark_used(cur, flow.flow_id, at)
            if reason:
                if reason != "state_reused":
                    self.connections.delete_pending(cur, flow.user_id)
                pending.append(self.outbox.add(cur, self._cancelled(flow, reason, message)))
        if reason:
            self.outbox.deliver(pending)
            return self._failure(flow, reason, message)
        oauth = self.providers.clients[slug]
        try:
            verifier = self.cipher.decrypt(flow.flow_id, flow.verifier) if flow.verifier else None
            token = oauth.exchange_code(params["code"], flow.redirect_uri, verifier)
            provider_user_id = oauth.provider_user_id(token)
            if not provider_user_id:
                raise PermanentError(f"{slug}: cannot tell which provider account connected (no user id in the "
                                     "token response and no profile call)")
            oauth.after_connect(token, provider_user_id)
        except HealthflowError as exc:
            log.warning("auth %s for %s failed: %s", flow.flow_id, slug, exc)
            return self._abandon(flow, "token_exchange_failed", f"the provider did not grant access: {exc}")
        return self._activate(flow, token, provider_user_id)

    def _check_callback(self, flow: Flow, slug: str, params: Mapping[str, str], at: int) -> tuple[str | None, str]:
        """Why a callback carrying the flow's right secret fails, or None."""
        if flow.used_at_ms is not None:
            return "state_reused", "this authorization was already completed or abandoned; start again"
        if flow.provider != slug:
            return "state_mismatch", "the state sent back does not match the one issued"
        if at > flow.expires_at_ms:
            return "state_expired", "the authorization took too long; start again"
        if params.get("error"):
            error = params["error"]
            return (error if _REASON.match(error) else "provider_error"), (
                f"the provider answered {error[:64]}: {(params.get('error_description') or '')[:200]}".rstrip(": "))
        if not params.get("code"):
            return "missing_code", "the provider sent neither a code nor an error"
        return None, ""

    def _cancelled(self, flow: Flow, reason: str, message: str) -> dict[str, Any]:
        return ev.auth_cancelled(reason, self.providers.manifests[flow.provider].terra_name, flow.reference_id,
                                 flow.widget_session_id, flow.flow_id, message)

    def _failure(self, flow: Flow, reason: str, message: str) -> AuthOutcome:
        url = flow.failure_url and with_query(flow.failure_url, {
            "reason": reason, "resource": self.providers.manifests[flow.provider].terra_name,
            "reference_id": flow.reference_id})
        return AuthOutcome(False, url, reason=reason, message=message)

    def _abandon(self, flow: Flow, reason: str, message: str) -> AuthOutcome:
        with self.tables.store.transaction() as cur:
            self.connections.delete_pending(cur, flow.user_id)
            event = self.outbox.add(cur, self._cancelled(flow, reason, message))
        self.outbox.deliver([event])
        return self._failure(flow, reason, message)

    def _activate(self, flow: Flow, token: dict[str, Any], provider_user_id: str) -> AuthOutcome:
        at = now_ms()
        scopes = _scopes(token.get("scope"), self.providers.clients[flow.provider])
        pending: list[dict[str, Any]] = []
        with self.tables.store.transaction() as cur:
            if self.connections.lock_state(cur, flow.user_id) != PENDING:
                return self._failure(flow, "state_expired", "the pending connection no longer exists; start again")
            olds = self.connections.others_of_account(cur, flow.dev_id, flow.provider, provider_user_id,
                                                      flow.user_id)
            for old in olds:  # superseded locally; not revoked at the provider, which could end the new grant too
                self.connections.set_state(cur, old.user_id, DEAUTH, at)
                self.tokens.delete(cur, old.user_id)
            self.connections.activate(cur, flow.user_id, provider_user_id, scopes, at)
            self.tokens.write(cur, flow.user_id, token, None, version=1, insert=True)
            connection = self.connections.read(cur, flow.user_id)
            for old in olds:
                superseded = replace(old, state=DEAUTH)
                pending.append(self.outbox.add(cur, ev.user_reauth(connection.terra_user(), superseded.terra_user())))
            pending.append(self.outbox.add(cur, ev.auth_success(connection.terra_user(), flow.widget_session_id,
                                                                flow.flow_id)))
        self.outbox.deliver(pending)
        url = flow.success_url and with_query(flow.success_url, {
            "user_id": connection.user_id, "resource": connection.terra_name, "reference_id": connection.reference_id})
        return AuthOutcome(True, url, connection, message="connected")


def _scopes(granted: Any, oauth: ProviderOAuth) -> str | None:
    """Terra's comma-separated scope string: what the provider granted, else what was asked for."""
    if isinstance(granted, list | tuple):
        parts = [str(s) for s in granted]
    elif isinstance(granted, str) and granted.strip():
        parts = re.split(r"[\s,]+", granted.strip())
    else:
        parts = list(oauth.auth.scopes)
    return ",".join(p for p in parts if p) or None
