"""Tokens as the cloud keeps them (hashes only, never the secrets): the enrollment tokens
devices enroll with, and the admin tokens operators call with, each with a role."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.core.compat import StrEnum


class Role(StrEnum):
    """What an admin token may do; each role may do what the ones before it may."""

    VIEWER = "viewer"  # read: models, devices, jobs, deployments
    OPERATOR = "operator"  # change the fleet: push, deploy, roll back, fine-tune, label
    ADMIN = "admin"  # trust: tokens, revocations, key rotation

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True)
class EnrollToken:
    """An enrollment token: expiry, maximum uses, the labels it grants; or, with
    `device_id`, a re-enroll token bound to one enrolled device."""

    token_id: str
    created_at: float
    expires_at: float = 0.0  # 0: never
    note: str = ""
    max_uses: int = 0  # 0: any number
    uses: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    revoked: bool = False
    device_id: str = ""

    def refusal(self, now: float | None = None) -> str:
        """Why the token cannot be used now ("" when it can)."""
        now = time.time() if now is None else now
        if self.revoked:
            return "was revoked"
        if self.expires_at and now >= self.expires_at:
            return "expired"
        if self.max_uses and self.uses >= self.max_uses:
            return f"was used its {self.max_uses} time(s) already"
        return ""


@dataclass(frozen=True)
class AdminToken:
    token_id: str
    name: str
    role: Role
    created_at: float
    revoked: bool = False
