"""Devices and their states: enrollment, device credentials, deploys, reports, watches.

The cloud only ever says "your desired state is now generation G"; agents converge and
report back. Watchers block on one condition variable and wake within milliseconds of a
deploy.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from cloudsvc.errors import (
    CloudError,
    Forbidden,
    InvalidRequest,
    NotAuthenticated,
    NotReady,
    UnknownResource,
)
from cloudsvc.registry import DEFAULT_TARGET, Registry
from cloudsvc.store.metadata import (
    DeviceRecord,
    EnrollTokenRecord,
    MetadataStore,
)
from edgefleet.core.auth import hash_token, new_token, same_secret
from edgefleet.core.fleet import (
    Assignment,
    Capabilities,
    Deployment,
    DesiredState,
    Device,
    Enrollment,
    ReportedState,
)
from edgefleet.core.versions import Artifact, ModelVersion

log = logging.getLogger(__name__)

DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_LABELS = 64
MAX_TOKEN_TTL_S = 10 * 366 * 86_400
MAX_MODELS_REPORTED = 1024
# Writing last_seen on every chunk fetch would be an fsync per chunk; once a second is plenty
# for an "online within 30 s" view.
_TOUCH_EVERY_S = 1.0


def best_target(artifacts: Sequence[Artifact], caps: Capabilities) -> str | None:
    """The artifact target a device with these capabilities runs best; None if none fits."""
    providers = set(caps.execution_providers)
    ranked: list[tuple[int, str]] = []
    for a in artifacts:
        if a.format != "onnx":
            continue  # agents run ONNX graphs; a TensorRT plan is for TensorRT's own runtime
        t = a.target
        if t.startswith("tensorrt"):
            rank = 0 if "TensorrtExecutionProvider" in providers else -1
        elif "cuda" in t:
            rank = 1 if "CUDAExecutionProvider" in providers else -1
        elif t == DEFAULT_TARGET:
            rank = 2
        else:
            rank = 3
        if rank >= 0:
            ranked.append((rank, t))
    return min(ranked)[1] if ranked else None


class Fleet:
    def __init__(
        self,
        metadata: MetadataStore,
        registry: Registry,
        trusted_keys: Sequence[bytes],
        static_enroll_tokens: Sequence[str] = (),
        offline_after_s: float = 30.0,
    ) -> None:
        self.metadata = metadata
        self.registry = registry
        self.trusted_keys = list(trusted_keys)
        self.static_enroll_tokens = list(static_enroll_tokens)
        self.offline_after_s = offline_after_s
        self._changed = threading.Condition()
        self._closed = False
        self._deploy_lock = threading.Lock()
        self._touched: dict[str, float] = {}

    # enrollment ------------------------------------------------------------------------
    def create_enroll_token(self, ttl_seconds: int = 0, note: str = "") -> tuple[str, int]:
        """A new enrollment token (only its hash is kept) and its expiry (0 = never)."""
        if not 0 <= ttl_seconds <= MAX_TOKEN_TTL_S:
            raise InvalidRequest(
                f"a token's lifetime is 0 (no expiry) to {MAX_TOKEN_TTL_S} seconds (10 years); "
                f"got {ttl_seconds}"
            )
        if len(note) > 500:
            raise InvalidRequest("a token's note is at most 500 characters")
        token = new_token("enr")
        now = int(time.time())
        expires = now + ttl_seconds if ttl_seconds else 0
        self.metadata.add_enroll_token(EnrollTokenRecord(hash_token(token), now, expires, note))
        return token, expires

    def _check_enroll_token(self, token: str) -> None:
        if not token:
            raise NotAuthenticated(
                "enrollment needs an enroll token; create one with `edgefleet enroll-token`"
            )
        if any(same_secret(token, t) for t in self.static_enroll_tokens):
            return
        record = self.metadata.get_enroll_token(hash_token(token))
        if record is None:
            raise NotAuthenticated(
                "the enroll token is not valid; create one with `edgefleet enroll-token`"
            )
        if not record.valid_at(time.time()):
            raise NotAuthenticated(
                "the enroll token expired; create a new one with `edgefleet enroll-token`"
            )

    def enroll(
        self,
        enroll_token: str,
        device_id: str = "",
        labels: Mapping[str, str] | None = None,
        capabilities: Capabilities | None = None,
    ) -> Enrollment:
        """A device id and a fresh credential; re-enrolling an id rotates its credential."""
        self._check_enroll_token(enroll_token)
        if device_id and not DEVICE_ID_PATTERN.match(device_id):
            raise InvalidRequest(
                f"device id {device_id[:80]!r} is not valid: 1-63 characters of letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        check_labels(labels or {})
        device_id = device_id or self._new_device_id()
        token = new_token("dev")
        now = time.time()
        existing = self.metadata.get_device(device_id)
        record = DeviceRecord(
            device_id=device_id,
            token_hash=hash_token(token),
            enrolled_at=existing.enrolled_at if existing else int(now),
            labels=dict(labels or (existing.labels if existing else {})),
            capabilities=capabilities or (existing.capabilities if existing else Capabilities()),
            last_seen_at=now,
        )
        self.metadata.put_device(record)
        if existing is None:
            self._apply_standing_deployments(record)
        return Enrollment(device_id, token, tuple(self.trusted_keys))

    def _apply_standing_deployments(self, device: DeviceRecord) -> None:
        """Give a newly enrolled device what the deployments matching its labels say, the
        newest deployment of each model winning. One that cannot apply is logged, not fatal:
        enrollment must not fail because of an old deployment."""
        chosen: dict[str, Assignment] = {}
        for deployment in self.metadata.list_deployments():
            if not deployment.matches(device.labels):
                continue
            try:
                record = self.registry.get_version(deployment.model, deployment.version)
                chosen[deployment.model] = self._assignment(record, device, deployment.target)
            except CloudError as err:
                log.warning(
                    "deployment of %s to %s skipped: %s", deployment.model, device.device_id, err
                )
        if not chosen:
            return
        with self._deploy_lock:
            for assignment in chosen.values():
                self.metadata.assign({device.device_id: assignment})
        with self._changed:
            self._changed.notify_all()

    def _new_device_id(self) -> str:
        while True:
            candidate = f"dev-{secrets.token_hex(4)}"
            if self.metadata.get_device(candidate) is None:
                return candidate

    def authenticate(self, device_token: str | None) -> str:
        """The id of the device this credential belongs to; notes that it was seen."""
        if not device_token:
            raise NotAuthenticated(
                "this call needs the device token from enrollment as "
                "`authorization: Bearer <token>` metadata"
            )
        device = self.metadata.device_by_token_hash(hash_token(device_token))
        if device is None:
            raise NotAuthenticated(
                "the device token is not valid (revoked or rotated by a re-enroll); enroll again"
            )
        self.touch(device.device_id)
        return device.device_id

    @staticmethod
    def authorize(caller: str, requested: str) -> str:
        """The device id a call acts on: the caller's own (an empty request means itself)."""
        if requested and requested != caller:
            raise Forbidden(
                f"device {caller!r} may not act for device {requested!r}; "
                "each device reads and writes only its own state"
            )
        return caller

    def touch(self, device_id: str) -> None:
        now = time.time()
        if now - self._touched.get(device_id, 0.0) >= _TOUCH_EVERY_S:
            self._touched[device_id] = now
            self.metadata.touch_device(device_id, now)

    # deploys ---------------------------------------------------------------------------
    def deploy(
        self, model: str, version: int, selector: Mapping[str, str] | None = None, target: str = ""
    ) -> list[tuple[str, int]]:
        """Assign `model` v`version` to every device whose labels contain `selector`.

        Each matching device keeps its other models' assignments and gets its generation
        bumped by one. Returns (device id, new generation) per device.
        """
        selector = dict(selector or {})
        record = self.registry.get_version(model, version)
        if not record.artifacts:
            raise NotReady(f"{model} v{version} has no artifact to deploy; push it again")
        pinned = record.artifact(target) if target else None
        if target and pinned is None:
            have = ", ".join(a.target for a in record.artifacts)
            raise NotReady(
                f"{model} v{version} has no {target!r} artifact (it has: {have}); "
                "compile it for that target or deploy one of those"
            )
        if pinned is not None and pinned.format != "onnx":
            raise NotReady(
                f"the {target} artifact of {model} v{version} is a {pinned.format} file, which "
                "edgefleet agents do not run (they serve ONNX, on TensorRT through ONNX "
                "Runtime's TensorRT provider where the device has it); deploy an onnx-* target"
            )
        devices = [d for d in self.metadata.list_devices() if d.matches(selector)]
        if not devices:
            raise NotReady(self._no_match_message(selector))
        plan = {d.device_id: self._assignment(record, d, target) for d in devices}
        deployment = Deployment(model, selector, version, target, time.time())
        with self._deploy_lock:
            # One transaction: a crash leaves the whole deploy recorded or none of it.
            generations = self.metadata.assign(plan, deployment)
        with self._changed:
            self._changed.notify_all()
        return sorted(generations.items())

    def _assignment(self, record: ModelVersion, device: DeviceRecord, target: str) -> Assignment:
        chosen = target or best_target(record.artifacts, device.capabilities)
        artifact = record.artifact(chosen) if chosen else None
        if artifact is None:
            have = ", ".join(a.target for a in record.artifacts)
            raise NotReady(
                f"none of {record.model} v{record.version}'s artifacts ({have}) runs on "
                f"{device.device_id} (providers: {list(device.capabilities.execution_providers)})"
            )
        return Assignment(record.model, record.version, artifact.target, artifact.manifest_digest)

    def _no_match_message(self, selector: Mapping[str, str]) -> str:
        devices = self.metadata.list_devices()
        if not devices:
            return "no device is enrolled yet; start an agent with an enroll token first"
        pairs = sorted({f"{k}={v}" for d in devices for k, v in d.labels.items()})
        wanted = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return (
            f"no device matches the selector {wanted!r}; labels in use: "
            f"{', '.join(pairs[:50]) or '(none)'}"
        )

    # desired state and watches -------------------------------------------------------------
    def deployments(self) -> list[Deployment]:
        """Standing deployments, oldest first."""
        return self.metadata.list_deployments()

    def desired_state(self, device_id: str) -> DesiredState:
        return self.metadata.get_desired(device_id)

    def wait_for_change(
        self,
        device_id: str,
        known_generation: int,
        timeout: float,
        gone: Callable[[], bool] | None = None,
    ) -> int | None:
        """The device's generation once it exceeds `known_generation`, or the current one
        after `timeout` seconds. None when the fleet is closing or `gone()` turns true (checked
        on every wake-up): the stream should end."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self._closed or (gone is not None and gone()):
                    return None
                generation = self.metadata.get_desired(device_id).generation
                remaining = deadline - time.monotonic()
                if generation > known_generation or remaining <= 0:
                    return generation
                self._changed.wait(remaining)

    def wake(self) -> None:
        """Wake every watcher to re-check (e.g. because its caller went away)."""
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Wake every watcher so streams end before the server stops."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    # reports ---------------------------------------------------------------------------
    def report(self, state: ReportedState) -> int:
        """Store what the device runs; the cloud's desired generation for it."""
        device = self.metadata.get_device(state.device_id)
        if device is None:
            raise UnknownResource(f"device {state.device_id!r} is not enrolled; enroll it first")
        check_labels(state.labels)
        if len(state.models) > MAX_MODELS_REPORTED:
            raise InvalidRequest(
                f"the report lists {len(state.models)} models; at most {MAX_MODELS_REPORTED}"
            )
        now = time.time()
        self.metadata.put_reported(replace(state, reported_at=now))
        changed = replace(
            device,
            labels=dict(state.labels) if state.labels else device.labels,
            capabilities=state.capabilities or device.capabilities,
            last_seen_at=now,
        )
        if changed != device:
            self.metadata.put_device(changed)
        return self.metadata.get_desired(state.device_id).generation

    # listing ---------------------------------------------------------------------------
    def view(self, device: DeviceRecord, now: float | None = None) -> Device:
        now = time.time() if now is None else now
        return Device(
            device_id=device.device_id,
            labels=device.labels,
            capabilities=device.capabilities,
            online=now - device.last_seen_at <= self.offline_after_s,
            last_seen_at=device.last_seen_at,
            enrolled_at=device.enrolled_at,
            desired=self.metadata.get_desired(device.device_id),
            reported=self.metadata.get_reported(device.device_id),
        )

    def devices(self, selector: Mapping[str, str] | None = None) -> list[Device]:
        now = time.time()
        return [
            self.view(d, now) for d in self.metadata.list_devices() if d.matches(selector or {})
        ]

    def device(self, device_id: str) -> Device:
        device = self.metadata.get_device(device_id)
        if device is None:
            raise UnknownResource(
                f"no device {device_id[:80]!r} is enrolled; list them with `edgefleet devices`"
            )
        return self.view(device)


def check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"{len(labels)} labels; a device may have at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > 63 or len(value) > 255:
            raise InvalidRequest(
                f"label {key[:80]!r}={value[:80]!r} is not valid: keys need 1-63 characters, "
                "values at most 255"
            )
