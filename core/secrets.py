"""Secret references: ``${NAME}`` in configuration, resolved from the environment where it is used.

Configuration keeps the reference (``postgresql://app:${PG_PASSWORD}@db:5432/hf``, ``${WEBHOOK_SECRET}``),
never the value, so nothing that is pickled into a job graph or written to a log holds a secret: a
worker resolves the reference in its ``setup()``/``open()`` from its own environment.
"""

from __future__ import annotations

import os
import re

from core.errors import FatalError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
    """A URL or message with any ``user:password@`` password replaced by ``***``."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)
