"""Secrets at rest: provider tokens encrypted with Fernet, API keys kept only as slow salted hashes.

``HEALTHFLOW_SECRET_KEY`` holds one Fernet key, or several separated by commas to rotate keys
(the first encrypts, every one decrypts; re-encryption happens whenever a token is written again).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.errors import FatalError

SECRET_KEY_ENV = "HEALTHFLOW_SECRET_KEY"
GENERATE_HINT = ("generate one with: python -c 'from cryptography.fernet import Fernet; "
                 "print(Fernet.generate_key().decode())'")

# scrypt (RFC 7914) cost: 2**14 x 8 x 1 ≈ 16 MiB and tens of milliseconds per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
API_KEY_PREFIX = "hfk_"
_API_KEY = re.compile(r"^hfk_([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")


class TokenCipher:
    """Encrypts a JSON value bound to an owner id (a ciphertext moved to another row does not decrypt)."""

    def __init__(self, secret_key: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        raw = secret_key if secret_key is not None else (environ if environ is not None else os.environ).get(
            SECRET_KEY_ENV)
        if not raw or not raw.strip():
            raise FatalError(f"no secret key: set {SECRET_KEY_ENV} (a Fernet key, used to encrypt provider tokens "
                             f"at rest); {GENERATE_HINT}")
        keys = []
        for part in raw.split(","):
            try:
                keys.append(Fernet(part.strip().encode()))
            except (ValueError, TypeError) as exc:
                raise FatalError(f"{SECRET_KEY_ENV} is not a valid Fernet key (32 url-safe base64-encoded bytes); "
                                 f"{GENERATE_HINT}") from exc
        self._fernet = MultiFernet(keys)

    def encrypt(self, owner: str, value: Any) -> str:
        payload = json.dumps({"owner": owner, "value": value}, separators=(",", ":")).encode()
        return self._fernet.encrypt(payload).decode()

    def decrypt(self, owner: str, token: str) -> Any:
        try:
            payload = json.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken as exc:
            raise FatalError(f"cannot decrypt the secrets of {owner}: {SECRET_KEY_ENV} does not hold the key they "
                             "were encrypted with (keep old keys after the new one, comma-separated)") from exc
        if payload.get("owner") != owner:
            raise FatalError(f"encrypted secrets stored for {owner} belong to {payload.get('owner')!r}")
        return payload["value"]


def new_api_key() -> tuple[str, str]:
    """A fresh ``(key_id, plaintext)``; the key id is public, the plaintext is shown once."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"


def parse_api_key(plaintext: str) -> str | None:
    """The key id of a well-formed key, else None."""
    match = _API_KEY.match(plaintext or "")
    return match.group(1) if match else None


def hash_api_key(plaintext: str, salt: bytes | None = None) -> tuple[str, str]:
    """``(salt, hash)`` as base64 strings (scrypt)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(plaintext.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN,
                            maxmem=64 * 1024 * 1024)
    return base64.b64encode(salt).decode(), base64.b64encode(digest).decode()


def verify_api_key(plaintext: str, salt_b64: str | None, hash_b64: str | None) -> bool:
    """Constant-time check; hashes a dummy when there is no stored key so timing does not tell."""
    salt = base64.b64decode(salt_b64) if salt_b64 else b"\0" * 16
    _, digest = hash_api_key(plaintext, salt)
    return hmac.compare_digest(digest, hash_b64 or "") and hash_b64 is not None


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
