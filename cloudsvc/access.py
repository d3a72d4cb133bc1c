"""Who may call what on the cloud's port, decided once per call by the server's one
interceptor (edgefleet.core.rpc.CallGuard), before any method runs.

Every method of the admin and job services states the role it needs (ROLES below: a method
missing from the table is refused to everyone, and a test fails); every method of the agent
service needs a device credential, but Enroll (an enroll token, or the device's own current
credential to re-enroll) and GetTrust (public keys). A service not listed is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from cloudsvc.errors import Forbidden, NotAuthenticated
from cloudsvc.fleet import Fleet
from cloudsvc.tokens import Tokens
from edgefleet.core.auth import token_from_metadata
from edgefleet.core.tls import peer_common_name
from edgefleet.core.tokens import Role
from protos.admin.v1 import admin_pb2, jobs_pb2
from protos.fleet.v1 import fleet_pb2


class Access(Enum):
    PUBLIC = "public"
    ENROLL = "enroll"
    DEVICE = "device"
    ADMIN = "admin"


@dataclass(frozen=True)
class AdminCaller:
    role: Role


@dataclass(frozen=True)
class DeviceCaller:
    device_id: str


@dataclass(frozen=True)
class EnrollCaller:
    """An enrollment: the bearer credential presented, if any (a device re-enrolling
    itself shows its current one)."""

    credential: str | None


ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
JOB_SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
AGENT_SERVICE = fleet_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

VIEW, OPERATE, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN
# The role each admin and job method needs.
ROLES: dict[str, Role] = {
    f"/{ADMIN_SERVICE}/{name}": role
    for name, role in {
        "ListModels": VIEW,
        "ListVersions": VIEW,
        "GetVersion": VIEW,
        # Model bytes are the users' IP: reading a whole artifact is an operator's.
        "GetManifest": OPERATE,
        "FetchChunks": OPERATE,
        "ListDeployments": VIEW,
        "ListDevices": VIEW,
        "GetDevice": VIEW,
        "PushModel": OPERATE,
        "Deploy": OPERATE,
        "Rollback": OPERATE,
        "LabelDevice": OPERATE,
        "RevokeDevice": ADMIN,
        "CreateEnrollToken": ADMIN,
        "ListEnrollTokens": ADMIN,
        "RevokeEnrollToken": ADMIN,
        "CreateAdminToken": ADMIN,
        "ListAdminTokens": ADMIN,
        "RevokeAdminToken": ADMIN,
        "RotateRootKey": ADMIN,
        "SetCapturePolicy": OPERATE,
        "ListDataSets": VIEW,
        "GetTelemetry": VIEW,
        "GetDrift": VIEW,
        # Captured rows are the users' data: exporting and labelling them is an operator's.
        "ExportCaptures": OPERATE,
        "LabelCaptures": OPERATE,
        "SetTraffic": OPERATE,
        "StartRollout": OPERATE,
        "GetRollout": VIEW,
        "ListRollouts": VIEW,
        "PauseRollout": OPERATE,
        "ResumeRollout": OPERATE,
        "AbortRollout": OPERATE,
        # The loop fine-tunes and rolls out on its own: switching it is an operator's.
        "EnableLoop": OPERATE,
        "DisableLoop": OPERATE,
        "RunLoop": OPERATE,
        "GetLoop": VIEW,
        "ListLoops": VIEW,
    }.items()
} | {
    f"/{JOB_SERVICE}/{name}": role
    for name, role in {
        "ListJobs": VIEW,
        "GetJob": VIEW,
        "WatchJob": VIEW,
        "Upload": OPERATE,
        "SubmitFineTune": OPERATE,
        "SubmitCompile": OPERATE,
        "SubmitEvaluate": OPERATE,
        "CancelJob": OPERATE,
        "RetryJob": OPERATE,
    }.items()
}

SERVICE_ACCESS: dict[str, Access] = {
    ADMIN_SERVICE: Access.ADMIN,
    JOB_SERVICE: Access.ADMIN,
    AGENT_SERVICE: Access.DEVICE,
    health.SERVICE_NAME: Access.PUBLIC,
    reflection.SERVICE_NAME: Access.PUBLIC,
}
METHOD_ACCESS: dict[str, Access] = {
    f"/{AGENT_SERVICE}/Enroll": Access.ENROLL,
    f"/{AGENT_SERVICE}/GetTrust": Access.PUBLIC,  # public keys, pinned by fingerprint
}


def access_of(method: str) -> Access | None:
    """The rule for a full method name ("/package.Service/Method"); None: not served."""
    if method in METHOD_ACCESS:
        return METHOD_ACCESS[method]
    service = method.strip("/").split("/")[0]
    return SERVICE_ACCESS.get(service)


class Gate:
    """The `authorize` of the cloud's CallGuard: the caller of each call, or an error."""

    def __init__(self, fleet: Fleet, tokens: Tokens, *, mutual_tls: bool = False) -> None:
        self._fleet = fleet
        self._tokens = tokens
        self._mutual_tls = mutual_tls

    def __call__(
        self, method: str, context: grpc.ServicerContext
    ) -> AdminCaller | DeviceCaller | EnrollCaller | None:
        access = access_of(method)
        if access is None:
            raise Forbidden(f"{method[:200]} is not served here")
        if access is Access.PUBLIC:
            return None
        token = token_from_metadata(context.invocation_metadata() or ())
        if access is Access.ENROLL:
            return EnrollCaller(token)
        if access is Access.ADMIN:
            role = self._tokens.admin_role(token)
            needed = ROLES.get(method)
            if needed is None:  # a method nobody gave a role: nobody may call it
                raise Forbidden(f"{method[:200]} states no role; it is refused")
            if not role.allows(needed):
                raise Forbidden(
                    f"{method.rsplit('/', 1)[-1]} needs the {needed.value} role; this token "
                    f"has {role.value} (`edgefleet admin-tokens create --role {needed.value}`)"
                )
            return AdminCaller(role)
        device_id = self._fleet.authenticate(token)
        if self._mutual_tls:
            # The credential and the certificate must name the same device: a stolen token
            # is useless without the device's key, and the reverse.
            name = peer_common_name(context)
            if name != device_id:
                raise NotAuthenticated(
                    f"with mutual TLS, device calls go to the device port with the certificate "
                    f"of {device_id} (this call showed {name[:64] or 'none'})"
                )
        return DeviceCaller(device_id)
