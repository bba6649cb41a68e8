"""A provider's manifest: what can be declared instead of coded (``connectors/providers/<slug>/manifest.yaml``).

Auth (OAuth 2 / OAuth 1.0a / none), the pull API (base URL, one endpoint per raw kind with its time
window and item field, pagination, rate limits), how the provider pushes (webhooks or push bodies,
and how they are signed). Mappers stay in code (``__init__.py``); everything a connection, poller
or webhook receiver needs to know about the provider's API lives here, validated when loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from core.errors import FatalError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Profile(_Strict):
    """The call that names the connected account when the token response does not."""

    path: str = Field(pattern=r"^/", description="GET api.base_url + path with the new access token")
    user_field: str = Field(description="dotted path of the account id in the JSON answer")


class OAuth2(_Strict):
    type: Literal["oauth2"]
    authorize_url: HttpUrl
    token_url: HttpUrl
    scopes: list[str] = Field(default_factory=list)
    scope_separator: str = " "
    pkce: bool = False
    client_auth: Literal["basic", "body"] = "body"
    refresh_token_rotates: bool = True
    revoke_url: HttpUrl | None = None
    authorize_params: dict[str, str] = Field(default_factory=dict,
                                            description="extra query parameters of the authorization URL "
                                                        "(Google: access_type=offline)")
    token_params: dict[str, str] = Field(default_factory=dict,
                                        description="extra form fields of every token request (Withings action)")
    profile: Profile | None = None


class OAuth1(_Strict):
    type: Literal["oauth1"]
    request_token_url: HttpUrl
    authorize_url: HttpUrl
    access_token_url: HttpUrl


class NoAuth(_Strict):
    """Data arrives from a companion app or an SDK (HealthKit, Health Connect), not from an API."""

    type: Literal["none"]


class Window(_Strict):
    """The time window of a request: query parameters, or ``{start}``/``{end}`` in the path."""

    start_param: str | None = None
    end_param: str | None = None
    format: Literal["date", "datetime", "unix"] = "date"
    max_days: int = Field(30, ge=1)


class Endpoint(_Strict):
    path: str = Field(pattern=r"^/", description="may hold {start} and {end} placeholders")
    method: Literal["GET", "POST"] = "GET"
    window: Window | None = None
    params: dict[str, str] = Field(default_factory=dict)
    item_path: str | None = Field(None, pattern=r"^/.*\{id\}", description="one document by the id a notification "
                                  "names (webhooks.id_field), e.g. /v2/usercollection/sleep/{id}: fetched instead of "
                                  "a live poll")


class Pagination(_Strict):
    style: Literal["none", "token", "offset", "page"] = "none"
    request_param: str | None = None
    response_field: str | None = None
    page_size_param: str | None = None
    page_size: int | None = None


class RateLimit(_Strict):
    requests: int = Field(ge=1)
    per_seconds: float = Field(gt=0)
    scope: Literal["app", "user"] = "app"


class Api(_Strict):
    base_url: HttpUrl
    endpoints: dict[str, Endpoint] = Field(default_factory=dict, description="raw kind → endpoint")
    pagination: Pagination = Field(default_factory=Pagination)
    rate_limits: list[RateLimit] = Field(default_factory=list)


class Signature(_Strict):
    header: str
    algorithm: Literal["hmac-sha256", "hmac-sha1"] = "hmac-sha256"
    encoding: Literal["hex", "hex-upper", "base64"] = "hex"
    timestamp_header: str | None = None
    message: Literal["body", "timestamp+body"] = "body"
    key: Literal["client_secret", "client_secret&", "webhook_secret"] = "client_secret"
    tolerance_s: int = Field(300, ge=1, le=3600, description="timestamp+body: how far timestamp_header may be from "
                                                             "now (either way) for the notification to be accepted")


class Replay(_Strict):
    """How a replayed notification is recognized: acknowledged, not published again."""

    id_fields: list[str] = Field(default_factory=list,
                                 description="notification fields that together name the event (WHOOP trace_id); "
                                             "without them, or when the body lacks one, the id is a SHA-256 of the "
                                             "signed message (timestamp and body)")
    window_s: int = Field(600, ge=1, description="how long an accepted id is remembered; a timestamped scheme keeps "
                                                 "it at least twice its tolerance, so a replay is refused at any time")


class Deletions(_Strict):
    """Notifications saying a record is gone: published on the raw topic as raw kind ``kind`` (mapped to
    ``connectors.base.Deletion``s), never fetched: the object no longer exists at the provider."""

    kind: str = Field(description="the raw kind the notification is published as")
    when: list[dict[str, str]] = Field(min_length=1, description="a notification is a deletion when all fields of "
                                                                 "one entry match (WHOOP {type: sleep.deleted}, Oura "
                                                                 "{event_type: delete})")

    def matches(self, note: object) -> bool:
        return matches_any(note, self.when)


def matches_any(note: object, entries: list[dict[str, str]]) -> bool:
    """Whether the notification ``note`` has every field of one of ``entries`` (compared as text)."""
    return isinstance(note, dict) and any(
        all(note.get(name) is not None and str(note[name]) == value for name, value in entry.items())
        for entry in entries)


class Webhooks(_Strict):
    mode: Literal["push", "ping", "notification"] = Field(
        description="push: the data itself; ping: a callback URL to fetch; notification: ids to fetch")
    signature: Signature | None = None
    replay: Replay | None = Field(None, description="how replays are recognized; signed schemes default to a hash "
                                                    "of the signed message remembered for 600 s")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="the largest body accepted (413 above it)")
    body: Literal["json", "form"] = Field("json", description="how a notification is encoded: a JSON object or "
                                                               "array (Fitbit), or form fields (Withings)")
    user_field: str | None = Field(None, description="notification field holding the provider's user id")
    kind_field: str | None = Field(None, description="notification field saying what changed")
    kinds: dict[str, list[str]] = Field(default_factory=dict,
                                        description="value of kind_field → raw kinds to fetch (others are ignored)")
    id_field: str | None = Field(None, description="notification field naming the changed document (WHOOP id, Oura "
                                                   "object_id): a kind whose endpoint has an item_path fetches that "
                                                   "document, not the live window")
    deletions: Deletions | None = Field(None, description="notifications saying a record is gone: published as a raw "
                                                          "kind, not fetched")
    ignored: list[dict[str, str]] = Field(
        default_factory=list, description="notifications (not deletions) with nothing to fetch or map: those "
                                          "matching all fields of one entry are counted as ignored by the fetcher "
                                          "(Oura {event_type: delete} of a day-keyed collection)")
    revoked: list[str | dict[str, str]] = Field(
        default_factory=list, description="notifications saying the user withdrew access: a kind_field value "
                                          "(Fitbit userRevokedAccess), or fields that must all match "
                                          "(Withings {appli: '46', action: unlink})")
    date_field: str | None = Field(None, description="notification field naming the one day that changed "
                                                     "(Fitbit date): that day is fetched, not the live window")
    start_field: str | None = Field(None, description="notification field where the changed span starts "
                                                      "(Withings startdate; unix seconds, a date or a datetime)")
    end_field: str | None = Field(None, description="notification field where the changed span ends (Withings "
                                                    "enddate, inclusive)")
    verify_param: str | None = Field(None, description="query parameter of the provider's subscriber check (Fitbit "
                                                       "verify): 204 when it equals HEALTHFLOW_<PROVIDER>_"
                                                       "VERIFICATION_CODE, 404 otherwise")
    accept_status: Literal[200, 204] = Field(200, description="the answer to an accepted notification (Fitbit: 204, "
                                                              "no body)")
    callback_field: str | None = Field(None, description="push mode: the entry field holding a callback URL (Garmin "
                                                         "callbackURL). Entries with it are pings: queued as "
                                                         "notifications, the URL fetched with the user's token (only "
                                                         "on api.base_url's origin and path) and its answer published "
                                                         "as a push body")
    lifecycle: dict[str, Literal["deregistration", "permissions_change"]] = Field(
        default_factory=dict, description="push mode: push-body lists that are account events, not data (Garmin "
                                          "deregistrations, userPermissionsChange) → the action taken; never "
                                          "published as data")


HOOK_NAME = r"^[a-z_][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$"


class Hooks(_Strict):
    """Code the manifest cannot express, named ``module.Attribute`` within the provider's folder (``client.PolarHook``
    is ``connectors/providers/polar/client.py``'s ``PolarHook``). Only named hooks are used: the registry imports each
    when it loads and refuses to start when one is missing or of the wrong kind."""

    oauth: str | None = Field(None, pattern=HOOK_NAME,
                              description="a connectors.oauth.ProviderOAuth subclass (non-standard token answers, "
                                          "registration at connect, deregistration at disconnect)")
    poll: str | None = Field(None, pattern=HOOK_NAME,
                             description="a connectors.hooks.ResponseHook subclass (request headers, the context a "
                                         "mapper needs attached to polled pages, statuses sent inside HTTP 200)")


class Manifest(_Strict):
    provider: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    terra_name: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    display_name: str
    docs: HttpUrl | None = None
    auth: OAuth2 | OAuth1 | NoAuth = Field(discriminator="type")
    api: Api | None = None
    webhooks: Webhooks | None = None
    hooks: Hooks = Field(default_factory=Hooks)


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; FatalError names the file and every problem."""
    try:
        return Manifest.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise FatalError(f"cannot read provider manifest {path}: {exc}") from exc
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise FatalError(f"provider manifest {path} is not valid:\n{problems}") from exc
