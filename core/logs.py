"""One logging setup for every ``healthflow`` command: levels honoured, secrets redacted, text or JSON lines.

``configure_logging(level, fmt)`` installs one handler on the root logger (standard error) that

- shows WARNING and above by default (``--log-level`` / ``HEALTHFLOW_LOG_LEVEL`` change it);
- quiets Apache Beam's own records below ERROR (its import-time and runner chatter), whatever logger they
  use, and only those: healthflow's and other libraries' warnings stay visible;
- passes every record through ``RedactingFilter``: query values of secret parameters (``token``, ``code``,
  ``state``, ``secret``, ``api_key``, …, and a form body's first field), JSON fields holding secrets
  (``"access_token": "…"``, ``"client_secret"``, ``"password"``, …), API-key headers, URL passwords, widget
  session ids in paths and the input values pydantic quotes in its errors (which may be health data) become
  ``***``, in time linear in the message's length; the filter never raises into the code that logs;
- writes plain text or, with ``fmt="json"``, one JSON object per line (``ts``, ``level``, ``logger``,
  ``message``, and ``exc_info`` when there is one).

uvicorn's loggers (``uvicorn.error``, ``uvicorn.access``) propagate to this handler when the server is started
with ``log_config=None``, so the access log is redacted too.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime

from core.secrets import SECRET_PARAMETERS
from core.secrets import redact as redact_url_secrets

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
LEVEL_VARIABLE, FORMAT_VARIABLE = "HEALTHFLOW_LOG_LEVEL", "HEALTHFLOW_LOG_FORMAT"
REDACTED = "***"

# A query string's parameter, or a form body's first field (at the start of a line or of a quoted string).
_QUERY_SECRET = re.compile(r"(?im)((?:^|[?&;]|(?<=['\"]))(?:" + "|".join(re.escape(p) for p in SECRET_PARAMETERS)
                           + r")=)[^&\s\"'#]*")
# JSON (or Python dict) fields whose string values are secrets: ``"access_token": "…"``, ``'password': '…'``.
SECRET_FIELDS = ("access_token", "refresh_token", "id_token", "client_secret", "password", "secret", "api_key",
                 "apikey", "x-api-key", "token", "oauth_token", "oauth_token_secret", "verification_token")
_FIELD_SECRET = re.compile(r"(?i)([\"'](?:" + "|".join(re.escape(f) for f in SECRET_FIELDS) + r")[\"']\s*:\s*)"
                           r"(\"[^\"\\]*(?:\\.[^\"\\]*)*\"?|'[^'\\]*(?:\\.[^'\\]*)*'?)")
# Headers carrying credentials, written as ``name: value``, ``name=value`` or ``'name': 'value'``.
_HEADER_SECRET = re.compile(r"(?i)(['\"]?\b(?:x-api-key|authorization|cookie|set-cookie|proxy-authorization)['\"]?"
                            r"\s*[:=]\s*['\"]?)[^'\"\s,}]+(?:\s+[^'\"\s,}]+)?")
# Path segments that are bearer secrets: the widget session id (``/widget/session/<id>``).
_PATH_SECRET = re.compile(r"(/widget/session/)[^/?\s\"']+")
# pydantic quotes the offending input (``input_value=...``), which can be a health value or a secret.
_PYDANTIC_INPUT = re.compile(r"(input_value=).*?(?=, input_type=|\]$|$)", re.MULTILINE)


def redact(text: str) -> str:
    """``text`` with every secret this module knows of replaced by ``***`` (see the module doc), in time linear in
    its length: every pattern either always matches once it starts or stops at a delimiter before the next start."""
    text = _QUERY_SECRET.sub(r"\1" + REDACTED, text)
    text = _FIELD_SECRET.sub(lambda found: found[1] + found[2][0] + REDACTED + found[2][0], text)
    text = _HEADER_SECRET.sub(r"\1" + REDACTED, text)
    text = redact_url_secrets(text)  # user:password@ and secret query parameters (core.secrets.SECRET_PARAMETERS)
    text = _PATH_SECRET.sub(r"\1" + REDACTED, text)
    return _PYDANTIC_INPUT.sub(r"\1" + REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message, formatted exception and stack with ``redact``; drops nothing and never
    raises: a message its arguments cannot be formatted into (``log.info("%d", "x")``) goes out as its redacted
    format string with the arguments dropped and the formatting error named."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format, or an argument whose str() raises
            dropped = f"[log arguments dropped: {type(exc).__name__}: {_printable(exc)}]"
            record.msg, record.args = redact(f"{_printable(record.msg)} {dropped}"), None
        else:
            cleaned = redact(message)
            if cleaned != message or record.args:
                record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _printable(value: object) -> str:
    """``str(value)``, or a placeholder naming its type when that raises."""
    try:
        return str(value)
    except Exception as exc:
        return f"<{type(value).__name__} not printable: {type(exc).__name__}>"


class QuietBeam(logging.Filter):
    """Drops Apache Beam's records below ERROR, whichever logger they went to (Beam also logs to the root)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return not (record.name.startswith("apache_beam") or f"{os.sep}apache_beam{os.sep}" in record.pathname)


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message``[, ``exc_info``]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


_HANDLER_NAME = "healthflow"


def configured() -> bool:
    """Whether ``configure_logging`` installed its handler in this process."""
    return any(h.get_name() == _HANDLER_NAME for h in logging.getLogger().handlers)


def configure_logging(level: str | None = None, fmt: str | None = None) -> logging.Handler:
    """Install (or replace) healthflow's handler on the root logger; ``None`` reads the environment, then
    defaults to WARNING and text. A bad level or format is a ValueError naming the choices."""
    level = (level or os.environ.get(LEVEL_VARIABLE) or "WARNING").upper()
    fmt = (fmt or os.environ.get(FORMAT_VARIABLE) or "text").lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for existing in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(existing)
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(QuietBeam())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonLinesFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
