"""The ``/v2`` API (Terra's shapes): connect widget, custom-UI authentication, OAuth callbacks, users.

Developer calls carry ``dev-id`` and ``x-api-key`` headers (missing → 401, wrong → 403; too many wrong
keys from one client or for one dev-id → 429 with Retry-After, see ``controlplane.auth.guard``). Browser
pages (the widget and the OAuth callback) carry no headers: a widget session id is a short-lived
capability, and a callback is bound to its single-use ``state``. Errors answer
``{"status": "error", "message": …}``; request validation errors answer 422 with the same fields
plus FastAPI's ``detail``. Request bodies are capped (``controlplane.limits``): more than 64 KiB → 413 before more is
read, JSON nested more than 64 levels → 400; the provider webhooks (``/v2/providers/``) cap theirs per provider.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import math
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.oauth import ProviderNotConfigured
from controlplane.api.widget import expired_page, page, widget_page
from controlplane.auth.control_plane import (
    WIDGET_SESSION_TTL_S,
    Connection,
    ControlPlane,
    UnknownProvider,
    UnknownUser,
    check_redirect_url,
)
from controlplane.auth.guard import ApiKeyGuard, AuthBusy, Throttled
from controlplane.limits import API_MAX_BODY_BYTES, MAX_JSON_DEPTH, RequestLimits
from core.errors import FatalError, PermanentError, RetryableError
from core.workqueue import QueueFull
from schemas import MODEL_TYPES

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.retry_after = status_code, message, retry_after


# ---------------------------------------------------------------------- request and response models
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("auth_success_redirect_url", "auth_failure_redirect_url", check_fields=False)
    @classmethod
    def _absolute_url(cls, value: str | None, info: Any) -> str | None:
        return check_redirect_url(value, info.field_name)


class WidgetSessionRequest(_Request):
    providers: str | None = Field(None, description="comma-separated providers (e.g. `GARMIN,OURA`); default: all",
                                  max_length=2000)
    language: str | None = Field(None, max_length=16)
    reference_id: str | None = Field(None, max_length=256, description="your own id of the end user")
    auth_success_redirect_url: str | None = Field(None, max_length=2000)
    auth_failure_redirect_url: str | None = Field(None, max_length=2000)


class WidgetSessionResponse(BaseModel):
    status: Literal["success"] = "success"
    session_id: str
    url: str
    expires_in: int = WIDGET_SESSION_TTL_S


class AuthenticateUserRequest(_Request):
    reference_id: str | None = Field(None, max_length=256)
    auth_success_redirect_url: str | None = Field(None, max_length=2000)
    auth_failure_redirect_url: str | None = Field(None, max_length=2000)
    language: str | None = Field(None, max_length=16)


class AuthenticateUserResponse(BaseModel):
    status: Literal["success"] = "success"
    user_id: str
    auth_url: str


class TerraUser(BaseModel):
    user_id: str
    provider: str
    reference_id: str | None = None
    scopes: str | None = None
    created_at: str | None = None
    last_webhook_update: str | None = None
    active: bool


class UserInfoResponse(BaseModel):
    status: Literal["success"] = "success"
    user: TerraUser
    is_authenticated: bool


class UserListResponse(BaseModel):
    status: Literal["success"] = "success"
    users: list[TerraUser]


class DeauthResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str


class Integration(BaseModel):
    provider: str
    name: str
    setup: str
    auth: str
    enabled: bool
    types: dict[str, bool]


class IntegrationsResponse(BaseModel):
    status: Literal["success"] = "success"
    providers: list[Integration]


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    message: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "dev-id or x-api-key header missing"},
    403: {"model": ErrorResponse, "description": "wrong x-api-key for this dev-id"},
    429: {"model": ErrorResponse, "description": "too many wrong keys from this client or for this dev-id "
                                                 "(see Retry-After)"},
}


# ---------------------------------------------------------------------- developer authentication
_dev_id_header = APIKeyHeader(name="dev-id", scheme_name="DevId", auto_error=False, description="your developer id")
_api_key_header = APIKeyHeader(name="x-api-key", scheme_name="ApiKey", auto_error=False,
                               description="your API key (secret)")


async def developer(request: Request, dev_id: Annotated[str | None, Security(_dev_id_header)],
                    api_key: Annotated[str | None, Security(_api_key_header)]) -> str:
    """The caller's dev-id once its x-api-key checks out (401 when a header is missing, 403 when wrong, 429 or 503
    with Retry-After when throttled or busy)."""
    if not dev_id or not api_key:
        raise ApiError(401, "authentication required: send your developer id in the dev-id header and your "
                            "API key in the x-api-key header")
    try:
        ok = await request.app.state.api_key_guard.authenticate(dev_id, api_key, client_address(request))
    except Throttled as exc:
        raise ApiError(429, str(exc), exc.retry_after) from exc
    except AuthBusy as exc:
        raise ApiError(503, str(exc), exc.retry_after) from exc
    if not ok:
        raise ApiError(403, f"x-api-key is not a valid API key for dev-id {dev_id!r} (check both headers; "
                            "revoked keys are refused)")
    return dev_id


def client_address(request: Request) -> str:
    """Who to count failures against: the client's IP address, an IPv6 one by its /64 (one host's usual share).
    Behind a proxy this is the proxy unless uvicorn trusts it for X-Forwarded-For (``FORWARDED_ALLOW_IPS``)."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return str(mapped) if mapped else str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


Dev = Annotated[str, Depends(developer)]


# ---------------------------------------------------------------------- the app
class BackfillResponse(BaseModel):
    status: str
    type: str
    reference: str
    message: str
    user: TerraUser


def create_app(control_plane: ControlPlane, *, title: str = "healthflow", polling: Any = None,
               max_body_bytes: int = API_MAX_BODY_BYTES, max_json_depth: int = MAX_JSON_DEPTH,
               api_key_guard: ApiKeyGuard | None = None) -> FastAPI:
    """The API around an opened ``ControlPlane``; with ``polling`` (a ``ConnectionPolling``) it also
    answers historical requests (``GET /v2/{type}``). For a push provider (Garmin) a historical request
    asks the provider to push that history; it arrives through the webhook router as normal data, without
    ``terra-reference`` (nothing in it names the request). ``app.state.control_plane`` is what the webhook
    router (``controlplane.webhooks``) applies push lifecycle lists to. ``max_body_bytes`` and ``max_json_depth``
    cap every request body but the provider webhooks'. ``api_key_guard`` checks developer keys (default: an
    in-process ``ApiKeyGuard``)."""
    cp = control_plane
    app = FastAPI(title=f"{title} API", version="2", openapi_url="/v2/openapi.json", docs_url="/v2/docs",
                  redoc_url=None, description=__doc__)
    app.state.control_plane = cp
    app.state.api_key_guard = api_key_guard or ApiKeyGuard(cp.developers)
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes, max_json_depth=max_json_depth,
                       exempt_prefixes=("/v2/providers/",))

    @app.exception_handler(ApiError)
    def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after is not None else None
        return JSONResponse({"status": "error", "message": exc.message}, exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"status": "error", "message": f"invalid request: {problems}",
                             "detail": jsonable(exc.errors())}, 422)

    @app.exception_handler(UnknownProvider)
    def _unknown_provider(_: Request, exc: UnknownProvider) -> JSONResponse:
        return JSONResponse({"status": "error", "message": exc.args[0]}, 400)

    @app.exception_handler(UnknownUser)
    def _unknown_user(_: Request, exc: UnknownUser) -> JSONResponse:
        return JSONResponse({"status": "error", "message": exc.args[0]}, 404)

    @app.exception_handler(ProviderNotConfigured)
    def _not_configured(_: Request, exc: ProviderNotConfigured) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse({"status": "error", "message": f"provider not enabled on this server: {exc}"}, 400)

    @app.exception_handler(PermanentError)
    def _permanent(_: Request, exc: PermanentError) -> JSONResponse:
        return JSONResponse({"status": "error", "message": str(exc)}, 400)

    @app.exception_handler(RetryableError)
    def _retryable(_: Request, exc: RetryableError) -> JSONResponse:
        log.warning("temporary failure: %s", exc)
        return JSONResponse({"status": "error", "message": "temporarily unavailable, try again"}, 503)

    @app.exception_handler(FatalError)
    def _fatal(_: Request, exc: FatalError) -> JSONResponse:
        log.error("server misconfigured: %s", exc)
        return JSONResponse({"status": "error", "message": "server misconfigured; see its log"}, 500)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # ------------------------------------------------------------------ developer API
    @app.post("/v2/auth/generateWidgetSession", response_model=WidgetSessionResponse, responses=_ERRORS,
              tags=["authentication"], summary="A connect-widget session (open its url in a browser, 15 minutes)")
    def generate_widget_session(dev_id: Dev, body: WidgetSessionRequest) -> WidgetSessionResponse:
        providers = [p for p in (body.providers or "").split(",") if p.strip()] or None
        session = cp.create_widget_session(dev_id, reference_id=body.reference_id, providers=providers,
                                           language=body.language, success_url=body.auth_success_redirect_url,
                                           failure_url=body.auth_failure_redirect_url)
        return WidgetSessionResponse(session_id=session.session_id,
                                     url=f"{cp.public_url}/widget/session/{session.session_id}")

    @app.post("/v2/auth/authenticateUser", response_model=AuthenticateUserResponse, responses=_ERRORS,
              tags=["authentication"], summary="Start connecting one provider (custom UI): open auth_url")
    def authenticate_user(dev_id: Dev, resource: Annotated[str, Query(description="provider, e.g. OURA")],
                          body: Annotated[AuthenticateUserRequest | None, Body()] = None) -> AuthenticateUserResponse:
        body = body or AuthenticateUserRequest()
        start = cp.start_auth(dev_id, resource, reference_id=body.reference_id,
                              success_url=body.auth_success_redirect_url, failure_url=body.auth_failure_redirect_url)
        return AuthenticateUserResponse(user_id=start.user_id, auth_url=start.auth_url)

    @app.get("/v2/userInfo", response_model=UserInfoResponse | UserListResponse, responses=_ERRORS, tags=["users"],
             summary="One connection by user_id, or every connection of a reference_id")
    def user_info(dev_id: Dev, user_id: str | None = None,
                  reference_id: str | None = None) -> UserInfoResponse | UserListResponse:
        if bool(user_id) == bool(reference_id):
            raise ApiError(400, "give exactly one of the query parameters user_id and reference_id")
        if user_id:
            connection = cp.connection(user_id, dev_id)
            return UserInfoResponse(user=_user(connection), is_authenticated=connection.active)
        return UserListResponse(users=[_user(c) for c in cp.connections(dev_id, reference_id or "")])

    @app.delete("/v2/auth/deauthenticateUser", response_model=DeauthResponse, responses=_ERRORS,
                tags=["authentication"], summary="Disconnect a user: revoke at the provider, delete tokens")
    def deauthenticate_user(dev_id: Dev, user_id: Annotated[str, Query(min_length=1)]) -> DeauthResponse:
        cp.deauthenticate(user_id, dev_id)
        return DeauthResponse(message=f"user {user_id} deauthenticated")

    @app.get("/v2/integrations", response_model=IntegrationsResponse, responses=_ERRORS, tags=["providers"],
             summary="Providers, whether they are enabled here, and the data types each maps")
    def integrations(_dev: Dev) -> IntegrationsResponse:
        from connectors import registry

        providers = registry()
        out = []
        for slug, manifest in sorted(cp.manifests.items()):
            models = {m for spec in providers[slug].kinds.values() for m in spec.models} if slug in providers else set()
            out.append(Integration(provider=manifest.terra_name, name=manifest.display_name,
                                   setup=manifest.auth.type.upper(), auth=manifest.auth.type,
                                   enabled=slug in cp.connectable(), types={m: m in models for m in MODEL_TYPES}))
        return IntegrationsResponse(providers=out)

    @app.get("/v2/{data_type}", response_model=BackfillResponse, responses=_ERRORS, tags=["data"],
             summary="Historical data for a user, sent to the destinations (to_webhook=true) with terra-reference",
             description="One request covers at most 365 days (the default of `healthflow serve "
                         "--history-max-days`; longer ranges answer 400: split them). Requests are queued for a "
                         "few workers: when the queue is full the answer is 503 with Retry-After.")
    def historical(dev_id: Dev, data_type: str, user_id: str, start_date: str, end_date: str | None = None,
                   to_webhook: bool = True) -> BackfillResponse:
        if data_type not in MODEL_TYPES:
            raise ApiError(404, f"unknown data type {data_type!r}; one of: {', '.join(MODEL_TYPES)}")
        if not to_webhook:
            raise ApiError(400, "only to_webhook=true is supported: the data is delivered to your destinations")
        if polling is None:
            raise ApiError(503, "historical requests need the poller: start the API with --bootstrap-servers")
        start, end = _date_param(start_date, "start_date"), _date_param(end_date, "end_date") if end_date else None
        end = end or datetime.now(UTC)
        if start >= end:
            raise ApiError(400, "start_date must be before end_date")
        connection = cp.connection(user_id, dev_id)
        if not connection.active:
            raise ApiError(400, f"user {user_id} is not connected (state {connection.state})")
        try:
            reference, kinds = polling.backfill(user_id, data_type, start, end)
        except QueueFull as exc:
            raise ApiError(503, f"too many historical requests in progress: {exc}", exc.retry_after) from exc
        if not kinds:
            raise ApiError(400, f"Data type requested not available from provider {connection.terra_name}")
        return BackfillResponse(status="success", type=data_type, reference=reference,
                                message="Data sent to webhook", user=_user(connection))

    # ------------------------------------------------------------------ browser pages
    @app.get("/widget/session/{session_id}", response_class=HTMLResponse, tags=["widget"],
             summary="The connect widget: one link per provider")
    def widget(session_id: str) -> HTMLResponse:
        session = cp.widget_session(session_id)
        if session is None or session.expired:
            return expired_page(session.language if session else None, 410 if session else 404)
        providers = [(slug, cp.manifests[slug].display_name) for slug in session.providers]
        return widget_page(session.session_id, providers, session.language)

    @app.get("/widget/session/{session_id}/connect/{provider}", tags=["widget"], response_model=None,
             summary="Start authentication from the widget (redirects to the provider)")
    def widget_connect(session_id: str, provider: str) -> Response:
        session = cp.widget_session(session_id)
        if session is None or session.expired:
            return expired_page(session.language if session else None, 410 if session else 404)
        slug = cp.provider_slug(provider)
        if slug not in session.providers:
            return page("Not available", "<p>This service is not offered in this session.</p>", 404)
        start = cp.start_auth(session.dev_id, slug, reference_id=session.reference_id,
                              success_url=session.success_url, failure_url=session.failure_url,
                              widget_session_id=session.session_id)
        return RedirectResponse(start.auth_url, 302)

    @app.get("/v2/auth/callback/{provider}", tags=["authentication"], response_class=HTMLResponse,
             response_model=None, summary="OAuth redirect target: the provider sends the browser back here")
    def callback(provider: str, request: Request) -> Response:
        try:
            outcome = cp.complete_auth(provider, dict(request.query_params))
        except UnknownProvider:
            return page("Unknown provider", "<p>There is no such provider.</p>", 404)
        if outcome.redirect_url:
            return RedirectResponse(outcome.redirect_url, 302)
        if outcome.ok:
            return page("Connected", "<p>Your device is connected. You can close this window.</p>")
        return page("Connection failed", f"<p>{html.escape(outcome.message)}</p>", 400)

    return app


def _date_param(text: str, name: str) -> datetime:
    """``YYYY-MM-DD`` (UTC midnight) or unix seconds, as Terra's data endpoints take them."""
    try:
        if text.isdigit():
            return datetime.fromtimestamp(int(text), UTC)
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, f"{name} must be YYYY-MM-DD or unix seconds, got {text!r}") from exc


def _user(connection: Connection) -> TerraUser:
    return TerraUser(**connection.terra_user())


def jsonable(value: Any) -> Any:
    """Validation error details made JSON-safe (pydantic may put exceptions in ``ctx``; a body's NaN or Infinity,
    which JSON cannot hold, is echoed as its text)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)
