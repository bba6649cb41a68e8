"""Secret references: ``${NAME}`` in configuration, resolved from the environment where it is used.

Configuration keeps the reference (``postgresql://app:${PG_PASSWORD}@db:5432/hf``, ``${WEBHOOK_SECRET}``),
never the value, so nothing that is pickled into a job graph or written to a log holds a secret: a
worker resolves the reference in its ``setup()``/``open()`` from its own environment.

A secret written literally (a password in a URL, a webhook secret in a destinations file) is *held*: put in this
process's environment under a generated ``HEALTHFLOW_HELD_SECRET_…`` name and replaced by its reference, so it is
never pickled either. Local workers (threads, or processes started from this one) inherit it; workers on other
machines do not, so a job using a held secret is refused on a remote runner (``held_in`` says where they came from).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

from core.errors import FatalError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# ``scheme://user:password@``: the password stops at ``/`` (libpq takes ``?`` and ``#`` in a password: it looks only
# for the ``@`` before the first ``/``), so a scan from one ``://`` never runs past the next and redaction is linear
# (``[^@\s]+`` scanned to the end from every ``://``: 2,600 of them in one request line took 0.5 s per log record).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s/]+)(@)")
# Query parameters whose values are secrets: libpq's password/sslpassword, webhook URL tokens, OAuth codes and states,
# verification codes. Held like a URL's password; redacted in messages and logs (``core.logs``).
SECRET_PARAMETERS = ("token", "code", "state", "secret", "api_key", "apikey", "x-api-key", "key", "password",
                     "sslpassword", "access_token", "refresh_token", "id_token", "client_secret", "verify",
                     "verification_token", "challenge", "oauth_token", "oauth_verifier", "signature", "sig")
QUERY_SECRET = re.compile(r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMETERS) + r")=)([^&\s\"']*)")


def missing(template: str) -> list[str]:
    """The environment variables ``template`` names that are not set here."""
    return [name for name in REFERENCE.findall(template) if name not in os.environ]


def resolve(template: str, where: str = "configuration") -> str:
    """``template`` with every ``${NAME}`` replaced by its environment value; FatalError names a missing one."""

    def value(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1))
        if found is None:
            raise FatalError(f"{where}: environment variable {match.group(1)} is not set")
        return found

    return REFERENCE.sub(value, template)


def redact(text: str) -> str:
    """A URL or message with any ``user:password@`` password, and the value of any secret query parameter
    (``?password=``, ``&token=``, see ``SECRET_PARAMETERS``), replaced by ``***`` (time linear in its length)."""
    text = QUERY_SECRET.sub(r"\1***", text)
    return _URL_PASSWORD.sub(r"\1***\3", text)


HELD_PREFIX = "HEALTHFLOW_HELD_SECRET_"
_held: dict[str, list[str]] = {}  # generated variable name -> where the literal secret was written
_held_names: dict[str, str] = {}  # literal value -> its variable name (one name per value)


def hold(value: str, where: str) -> str:
    """Move the literal secret ``value`` into this process's environment; its ``${NAME}`` reference.

    ``where`` (e.g. ``destinations.yaml.destinations[0].secret``) is remembered for ``held_in``."""
    name = _held_names.get(value)
    if name is None:
        name = _held_names[value] = HELD_PREFIX + secrets.token_hex(6).upper()
        os.environ[name] = value
    if where not in _held.setdefault(name, []):
        _held[name].append(where)
    return "${" + name + "}"


def hold_literal(value: str, where: str) -> str:
    """``value`` unchanged when it is written with ``${VAR}`` references (or empty); otherwise held whole."""
    return value if not value or REFERENCE.search(value) else hold(value, where)


def hold_url_password(url: str, where: str) -> str:
    """``url`` with a literal ``user:password@`` password and the literal values of its secret query parameters
    (``?password=``, ``&token=``...) held; ``${VAR}`` values, or none, stay as given."""
    url = _hold_query_secrets(url, where)
    match = _URL_PASSWORD.search(url)
    if match is None or REFERENCE.search(match.group(2)):
        return url
    return url[:match.start(2)] + hold(match.group(2), where) + url[match.end(2):]


def _hold_query_secrets(url: str, where: str) -> str:
    """``url`` with the literal value of each secret query parameter (``SECRET_PARAMETERS``) held."""

    def held(match: re.Match[str]) -> str:
        value = match.group(2)
        return match.group(0) if not value or REFERENCE.search(value) else match.group(1) + hold(value, where)

    return QUERY_SECRET.sub(held, url)


def held_in(*values: object) -> list[str]:
    """Where the held secrets referenced in ``values`` (strings, or dicts and lists of them) were written."""
    found: list[str] = []
    for value in values:
        if isinstance(value, str):
            found += [where for name in REFERENCE.findall(value) for where in _held.get(name, ())]
        elif isinstance(value, dict):
            found += held_in(*value.values())
        elif isinstance(value, list | tuple):
            found += held_in(*value)
    return list(dict.fromkeys(found))


PRIVATE_MODE = 0o600
PRIVATE_FOLDER_MODE = 0o700
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_folder(folder: str | Path) -> None:
    """Create ``folder`` and each missing parent only their owner may enter (0700); existing folders stay as they
    are (a folder another worker creates at the same moment is fine)."""
    missing_folders = []
    folder = Path(folder)
    while not folder.exists():
        missing_folders.append(folder)
        folder = folder.parent
    for each in reversed(missing_folders):
        with contextlib.suppress(FileExistsError):
            each.mkdir(mode=PRIVATE_FOLDER_MODE)


def private_file(path: str | Path, companions: tuple[str, ...] = SQLITE_COMPANIONS) -> None:
    """Make ``path`` a file only its owner can read and write (0600): created so when missing (its folder too,
    0700), tightened to it when it exists with group or other access, and the same for existing companions
    (SQLite's ``-wal``/``-shm``/``-journal``, which SQLite creates with the database file's mode)."""
    path = Path(path)
    if not path.exists():
        private_folder(path.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_MODE))  # created 0600 (a umask only removes bits)
    for each in (path, *(path.with_name(path.name + suffix) for suffix in companions)):
        if each.exists() and stat.S_IMODE(each.stat().st_mode) & 0o077:
            each.chmod(PRIVATE_MODE)
