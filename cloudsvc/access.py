"""Who may call what on the cloud's port, decided once per call by the server's one
interceptor (edgefleet.core.rpc.CallGuard), before any method runs.

Access is by service: every method of the admin and job services needs the admin token,
every method of the agent service but Enroll needs a device credential. A method added to
a service inherits its service's rule, and a service not listed here is refused outright,
so a forgotten check cannot leave a method open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from cloudsvc.errors import Forbidden, NotAuthenticated
from cloudsvc.fleet import Fleet
from edgefleet.core.auth import same_secret, token_from_metadata
from protos.admin.v1 import admin_pb2, jobs_pb2
from protos.fleet.v1 import fleet_pb2


class Access(Enum):
    PUBLIC = "public"
    DEVICE = "device"
    ADMIN = "admin"


@dataclass(frozen=True)
class AdminCaller:
    pass


@dataclass(frozen=True)
class DeviceCaller:
    device_id: str


ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
JOB_SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
AGENT_SERVICE = fleet_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

SERVICE_ACCESS: dict[str, Access] = {
    ADMIN_SERVICE: Access.ADMIN,
    JOB_SERVICE: Access.ADMIN,
    AGENT_SERVICE: Access.DEVICE,
    health.SERVICE_NAME: Access.PUBLIC,
    reflection.SERVICE_NAME: Access.PUBLIC,
}
METHOD_ACCESS: dict[str, Access] = {
    f"/{AGENT_SERVICE}/Enroll": Access.PUBLIC,  # the enroll token is checked by Fleet.enroll
}


def access_of(method: str) -> Access | None:
    """The rule for a full method name ("/package.Service/Method"); None: not served."""
    if method in METHOD_ACCESS:
        return METHOD_ACCESS[method]
    service = method.strip("/").split("/")[0]
    return SERVICE_ACCESS.get(service)


class Gate:
    """The `authorize` of the cloud's CallGuard: the caller of each call, or an error."""

    def __init__(self, fleet: Fleet, admin_token: str) -> None:
        self._fleet = fleet
        self._admin_token = admin_token

    def __call__(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> AdminCaller | DeviceCaller | None:
        access = access_of(method)
        if access is None:
            raise Forbidden(f"{method[:200]} is not served here")
        if access is Access.PUBLIC:
            return None
        token = token_from_metadata(metadata)
        if access is Access.ADMIN:
            if not token:
                raise NotAuthenticated(
                    "admin calls need `authorization: Bearer <admin token>` metadata; the token "
                    "is in the cloud's data_dir/admin-token or EDGEFLEET_ADMIN_TOKEN"
                )
            if not same_secret(token, self._admin_token):
                raise NotAuthenticated("the admin token is wrong; check EDGEFLEET_ADMIN_TOKEN")
            return AdminCaller()
        return DeviceCaller(self._fleet.authenticate(token))
