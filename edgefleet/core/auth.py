"""Credentials on the wire: `authorization: Bearer <token>` gRPC metadata."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from edgefleet.core.errors import InvalidArgument

AUTH_HEADER = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),)


def token_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
            return None
    return None


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    """Tokens are stored only as this hash, so a leaked database leaks no credentials."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def read_secret(path: Path, what: str) -> str:
    """A secret kept in a file (so that it never stands on a command line), stripped."""
    try:
        value = path.read_text().strip()
    except OSError as err:
        raise InvalidArgument(f"cannot read {what} from {path}: {err.strerror}") from None
    if not value:
        raise InvalidArgument(f"{path} is empty; it should hold {what}")
    return value


def secret_value(secret: SecretStr | None, path: Path | None, what: str) -> str:
    """A secret given inline (a setting, an environment variable) or in a file; "" if neither."""
    if secret is not None and secret.get_secret_value():
        return secret.get_secret_value()
    return read_secret(path, what) if path is not None else ""
