"""Enrollment tokens and admin tokens: made here, shown once, kept only as hashes.

An enrollment token has an expiry, a maximum number of uses and the labels it grants; a
re-enroll token is bound to one enrolled device id. An admin token has a role. The cloud's
own first admin token (data_dir/admin-token or the admin_token setting) has the admin role
and is not stored here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from cloudsvc.errors import InvalidRequest, NotAuthenticated, UnknownResource
from cloudsvc.store.metadata import AdminTokenRecord, EnrollTokenRecord, MetadataStore
from edgefleet.core.auth import hash_token, new_token, same_secret
from edgefleet.core.tokens import AdminToken, EnrollToken, Role

MAX_TOKEN_TTL_S = 10 * 366 * 86_400
TOKEN_ID_CHARS = 12
MAX_NOTE = 500


def token_id(token_hash: str) -> str:
    return "tok-" + token_hash[:TOKEN_ID_CHARS]


class Tokens:
    def __init__(self, metadata: MetadataStore, bootstrap_admin_token: str) -> None:
        self.metadata = metadata
        self._bootstrap = bootstrap_admin_token

    # enrollment tokens -------------------------------------------------------------------
    def create_enroll_token(
        self,
        ttl_seconds: int = 0,
        note: str = "",
        max_uses: int = 0,
        labels: Mapping[str, str] | None = None,
        device_id: str = "",
    ) -> tuple[str, EnrollToken]:
        """A new enrollment token (the secret, shown once) and what the cloud keeps of it."""
        from cloudsvc.fleet import check_labels

        if not 0 <= ttl_seconds <= MAX_TOKEN_TTL_S:
            raise InvalidRequest(
                f"a token's lifetime is 0 (no expiry) to {MAX_TOKEN_TTL_S} seconds (10 years); "
                f"got {ttl_seconds}"
            )
        if len(note) > MAX_NOTE:
            raise InvalidRequest(f"a token's note is at most {MAX_NOTE} characters")
        check_labels(labels or {})
        if device_id and self.metadata.get_device(device_id) is None:
            raise UnknownResource(
                f"no device {device_id[:80]!r} is enrolled; a re-enroll token is for an "
                "enrolled device (a new one enrolls with an ordinary token)"
            )
        secret = new_token("enr")
        token_hash = hash_token(secret)
        now = time.time()
        token = EnrollToken(
            token_id=token_id(token_hash),
            created_at=now,
            expires_at=now + ttl_seconds if ttl_seconds else 0.0,
            note=note,
            max_uses=1 if device_id else max_uses,
            labels=dict(labels or {}),
            device_id=device_id,
        )
        self.metadata.add_enroll_token(EnrollTokenRecord(token_hash, token))
        return secret, token

    def enroll_tokens(self) -> list[EnrollToken]:
        return self.metadata.list_enroll_tokens()

    def revoke_enroll_token(self, token_id: str) -> EnrollToken:
        record = self.metadata.find_enroll_token(token_id)
        if record is None:
            raise UnknownResource(
                f"no enrollment token {token_id[:40]!r}; see `edgefleet tokens list`"
            )
        revoked = dataclasses.replace(record.token, revoked=True)
        self.metadata.put_enroll_token(EnrollTokenRecord(record.token_hash, revoked))
        return revoked

    def use_enroll_token(self, secret: str) -> EnrollToken:
        """Count one use of the token; NotAuthenticated saying why it cannot be used."""
        if not secret:
            raise NotAuthenticated(
                "enrollment needs an enroll token; create one with `edgefleet tokens create`"
            )
        token, refusal = self.metadata.use_enroll_token(hash_token(secret), time.time())
        if refusal or token is None:
            raise NotAuthenticated(
                f"the enroll token {refusal or 'is not valid'}; create a new one with "
                "`edgefleet tokens create`"
            )
        return token

    # admin tokens ------------------------------------------------------------------------
    def create_admin_token(self, name: str, role: Role) -> tuple[str, AdminToken]:
        if not name or len(name) > 64:
            raise InvalidRequest("name the token (1-64 characters), e.g. --name ci-pipeline")
        secret = new_token("adm")
        token_hash = hash_token(secret)
        token = AdminToken(token_id(token_hash), name, role, time.time())
        self.metadata.add_admin_token(AdminTokenRecord(token_hash, token))
        return secret, token

    def admin_tokens(self) -> list[AdminToken]:
        return self.metadata.list_admin_tokens()

    def revoke_admin_token(self, token_id: str) -> AdminToken:
        record = self.metadata.find_admin_token(token_id)
        if record is None:
            raise UnknownResource(
                f"no admin token {token_id[:40]!r}; see `edgefleet admin-tokens list`"
            )
        revoked = dataclasses.replace(record.token, revoked=True)
        self.metadata.put_admin_token(AdminTokenRecord(record.token_hash, revoked))
        return revoked

    def admin_role(self, secret: str | None) -> Role:
        """The role of the admin token presented; NotAuthenticated when there is none."""
        if not secret:
            raise NotAuthenticated(
                "admin calls need `authorization: Bearer <admin token>` metadata; the cloud's "
                "first token is in its data_dir/admin-token (EDGEFLEET_ADMIN_TOKEN_FILE)"
            )
        if same_secret(secret, self._bootstrap):
            return Role.ADMIN
        record = self.metadata.get_admin_token(hash_token(secret))
        if record is None or record.token.revoked:
            raise NotAuthenticated("the admin token is not valid (wrong, or revoked)")
        return record.token.role
