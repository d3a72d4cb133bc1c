"""Devices and their states: enrollment, device credentials, deploys, reports, watches.

The cloud only ever says "your desired state is now generation G"; agents converge and
report back. Watchers block on one condition variable and wake within milliseconds of a
deploy.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from cloudsvc.errors import (
    CloudError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotAuthenticated,
    NotReady,
    UnknownResource,
)
from cloudsvc.registry import Registry
from cloudsvc.signing import RootKeys
from cloudsvc.store.metadata import (
    DeviceRecord,
    MetadataStore,
)
from cloudsvc.targets_choice import choose_target
from cloudsvc.tokens import Tokens
from edgefleet.core.auth import hash_token, new_token, same_secret
from edgefleet.core.certs import CertificateAuthority
from edgefleet.core.data import CapturePolicy, InputBins
from edgefleet.core.fleet import (
    Assignment,
    Capabilities,
    Deployment,
    DesiredState,
    Device,
    Enrollment,
    MqttAccess,
    ReportedState,
    TrafficVariant,
    Variant,
)
from edgefleet.core.jobs import JobState
from edgefleet.core.tokens import EnrollToken
from edgefleet.core.trust import SignedDesiredState
from edgefleet.core.versions import ModelVersion

log = logging.getLogger(__name__)

DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_LABELS = 64
MAX_MODELS_REPORTED = 1024
# Generations are stored as signed 64-bit integers; the wire's uint64 can say more.
MAX_GENERATION = 2**63 - 1
# How many of a model's newest jobs say why a target was not built.
_JOBS_SEARCHED = 50
# Writing last_seen on every chunk fetch would be an fsync per chunk; once a second is plenty
# for an "online within 30 s" view.
_TOUCH_EVERY_S = 1.0


class Fleet:
    def __init__(
        self,
        metadata: MetadataStore,
        registry: Registry,
        tokens: Tokens,
        static_enroll_tokens: Sequence[str] = (),
        offline_after_s: float = 30.0,
        certificate_authority: CertificateAuthority | None = None,
        device_port: int = 0,
        keys: RootKeys | None = None,
        desired_state_ttl_s: float = 86_400.0,
    ) -> None:
        self.keys = keys or RootKeys.generate()
        self.desired_state_ttl_s = desired_state_ttl_s
        self.metadata = metadata
        self.registry = registry
        self.tokens = tokens
        self.static_enroll_tokens = list(static_enroll_tokens)
        self.offline_after_s = offline_after_s
        self.certificate_authority = certificate_authority
        self.device_port = device_port
        self._changed = threading.Condition()
        self._closed = False
        # Who holds devices of a model (a rollout engine): "" when they are free, else why not.
        self.claims: Callable[[str, Sequence[str]], str] | None = None
        self._deploy_lock = threading.Lock()
        self._touched: dict[str, float] = {}
        # Issues a device's MQTT account at enrollment (set when the cloud has a broker).
        self.mqtt_issuer: Callable[[str], MqttAccess | None] | None = None

    # enrollment ------------------------------------------------------------------------
    def enroll(
        self,
        enroll_token: str,
        device_id: str = "",
        capabilities: Capabilities | None = None,
        *,
        current_credential: str | None = None,
        certificate_request: bytes = b"",
    ) -> Enrollment:
        """A device id and a fresh credential.

        A new device gets the labels its token grants. An enrolled id is re-enrolled (its
        credential rotated) only with its current credential or a re-enroll token bound to
        it: holding a fleet-wide token is not enough to take a device's identity.
        """
        if device_id and not DEVICE_ID_PATTERN.match(device_id):
            raise InvalidRequest(
                f"device id {device_id[:80]!r} is not valid: 1-63 characters of letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        existing = self.metadata.get_device(device_id) if device_id else None
        if existing is not None:
            labels = dict(existing.labels)
            own = current_credential and same_secret(
                hash_token(current_credential), existing.token_hash
            )
            if not own or existing.revoked:
                if existing.revoked and not enroll_token:
                    raise Forbidden(
                        f"device {device_id!r} was revoked: it re-enrolls only with a "
                        f"re-enroll token bound to it (`edgefleet tokens create --reenroll "
                        f"{device_id}`)"
                    )
                token = self._enroll_token(enroll_token)
                if token.device_id != existing.device_id:
                    raise Forbidden(
                        f"device {device_id!r} is enrolled already: re-enrolling it needs its "
                        "current credential or a re-enroll token bound to it (`edgefleet "
                        f"tokens create --reenroll {device_id}`)"
                    )
                labels.update(token.labels)
        else:
            token = self._enroll_token(enroll_token)
            if token.device_id and token.device_id != device_id:
                raise Forbidden(f"this re-enroll token is for device {token.device_id!r} only")
            labels = dict(token.labels)
        device_id = device_id or self._new_device_id()
        certificate = b""
        if certificate_request and self.certificate_authority is not None:
            # Without mutual TLS the request is ignored: the device keeps its bearer token.
            certificate = self.certificate_authority.sign_device(certificate_request, device_id)
        secret = new_token("dev")
        now = time.time()
        record = DeviceRecord(
            device_id=device_id,
            token_hash=hash_token(secret),
            enrolled_at=existing.enrolled_at if existing else int(now),
            labels=labels,
            capabilities=capabilities or (existing.capabilities if existing else Capabilities()),
            last_seen_at=now,
        )
        with self._deploy_lock:
            # Under the deploy lock: a deploy running now either sees this device or wrote
            # its deployment before the device reads the standing ones.
            self.metadata.put_device(record)
            if existing is None:
                self._apply_standing_deployments(record)
        # Before the wake-up: the MQTT notifier then writes the new account to the broker.
        mqtt = self.mqtt_issuer(device_id) if self.mqtt_issuer is not None else None
        with self._changed:
            self._changed.notify_all()
        return Enrollment(
            device_id, secret, certificate, self.device_port if certificate else 0, mqtt
        )

    def _enroll_token(self, secret: str) -> EnrollToken:
        """The token used (its use counted), or NotAuthenticated."""
        if secret and any(same_secret(secret, t) for t in self.static_enroll_tokens):
            return EnrollToken(token_id="static", created_at=0.0)
        return self.tokens.use_enroll_token(secret)

    def _apply_standing_deployments(self, device: DeviceRecord) -> None:
        """Give a newly enrolled device what the deployments matching its labels say, the
        newest deployment of each model winning. One that cannot apply is logged, not fatal:
        enrollment must not fail because of an old deployment. Called under _deploy_lock."""
        chosen: dict[str, Assignment] = {}
        for deployment in self.metadata.list_deployments():
            if not deployment.matches(device.labels):
                continue
            try:
                record = self.registry.get_version(deployment.model, deployment.version)
                peak = self.metadata.peaks(device.device_id).get(deployment.model, 0)
                chosen[deployment.model] = replace(
                    self._assignment(record, device, deployment.target),
                    rollback=deployment.rollback or deployment.version < peak,
                )
            except CloudError as err:
                log.warning(
                    "deployment of %s to %s skipped: %s", deployment.model, device.device_id, err
                )
        current = self.metadata.get_desired(device.device_id)
        for assignment in chosen.values():
            if current.assignment(assignment.model) != assignment:
                self.metadata.assign({device.device_id: assignment})

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
        if device is None or device.revoked:
            raise NotAuthenticated(
                "the device credential is not valid (the device was revoked, or re-enrolled "
                "with a new credential); the operator can issue a re-enroll token"
            )
        self.touch(device.device_id)
        return device.device_id

    def authenticate_id(self, device_id: str) -> None:
        """NotAuthenticated if the device was revoked since its call began."""
        device = self.metadata.get_device(device_id)
        if device is None or device.revoked:
            raise NotAuthenticated(f"device {device_id} was revoked")

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
        self,
        model: str,
        version: int,
        selector: Mapping[str, str] | None = None,
        target: str = "",
        *,
        rollback: bool = False,
    ) -> list[tuple[str, int]]:
        """Assign `model` v`version` to every device whose labels contain `selector`.

        Each matching device keeps its other models' assignments and gets its generation
        bumped by one. With `rollback`, the assignment says it is an operator's rollback:
        the only way a device accepts a version below the highest it ran. Returns (device
        id, new generation) per device.
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
        with self._deploy_lock:
            devices = [
                d for d in self.metadata.list_devices() if d.matches(selector) and not d.revoked
            ]
            if not devices:
                raise NotReady(self.no_match_message(selector))
            if not rollback:
                self._refuse_going_back(model, version, devices)
            if self.claims is not None:
                busy = self.claims(model, [d.device_id for d in devices])
                if busy:
                    raise Conflict(busy)
            # Below a version a device was ever assigned, the assignment is a rollback: a
            # device that missed the operator's rollback still takes the versions after it.
            why_not_built = self.not_built(record)
            plan = {
                d.device_id: replace(
                    self._assignment(record, d, target, why_not_built),
                    rollback=rollback or version < self.metadata.peaks(d.device_id).get(model, 0),
                )
                for d in devices
            }
            deployment = Deployment(model, selector, version, target, time.time(), rollback)
            # One transaction: a crash leaves the whole deploy recorded or none of it.
            generations = self.metadata.assign(plan, deployment)
        with self._changed:
            self._changed.notify_all()
        return sorted(generations.items())

    def assignment_for(self, record: ModelVersion, device_id: str, target: str = "") -> Assignment:
        """What `device_id` would be told to run of `record` (NotReady: nothing it runs)."""
        return self._assignment(record, self._enrolled(device_id), target)

    def move(
        self,
        model: str,
        versions: Mapping[str, int],
        *,
        target: str = "",
        rollback: bool = False,
        shadows: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Give each device (id -> version) its own version of `model` in one transaction
        (0: take the model off the device), as a rollout's waves and aborts do: no standing
        deployment is recorded. With `rollback`, or below what a device was ever assigned,
        the assignment is a signed rollback. `shadows` (id -> version) adds a shadow of that
        version beside the new one (a rollout judging agreement). Returns the new
        generations."""
        shadows = shadows or {}
        wanted = {*versions.values(), *shadows.values()} - {0}
        records = {v: self.registry.get_version(model, v) for v in wanted}
        not_built = {v: self.not_built(r) for v, r in records.items()}
        with self._deploy_lock:
            plan = {}
            for device_id, version in versions.items():
                if not version:
                    continue
                device = self._enrolled(device_id)
                assignment = self._assignment(records[version], device, target, not_built[version])
                peak = self.metadata.peaks(device_id).get(model, 0)
                assignment = replace(assignment, rollback=rollback or version < peak)
                shadow = shadows.get(device_id, 0)
                if shadow and shadow != version:
                    made = self._assignment(records[shadow], device, "", not_built[shadow])
                    variant = Variant(shadow, made.target, made.manifest_digest, 0.0, True)
                    assignment = replace(assignment, variants=(variant,))
                plan[device_id] = assignment
            generations = self.metadata.assign(plan) if plan else {}
            gone = [d for d, v in versions.items() if not v]
            if gone:
                generations.update(self.metadata.unassign(model, gone))
        with self._changed:
            self._changed.notify_all()
        return generations

    def _refuse_going_back(self, model: str, version: int, devices: list[DeviceRecord]) -> None:
        """A deploy moves forward; going below what devices are assigned is a rollback."""
        ahead = sorted(
            {
                a.version
                for d in devices
                if (a := self.metadata.get_desired(d.device_id).assignment(model)) is not None
                and a.version > version
            }
        )
        if ahead:
            raise NotReady(
                f"devices of this selector are assigned {model} v{ahead[-1]}: going back to "
                f"v{version} is a rollback, which devices take only as one: `edgefleet "
                f"rollback {model} --to {version}` with the same selector"
            )

    def _assignment(
        self,
        record: ModelVersion,
        device: DeviceRecord,
        target: str,
        why_not_built: Callable[[str], str] | None = None,
    ) -> Assignment:
        """What `device` runs of `record`: the operator's `target`, else the fastest one that
        passed the accuracy gate and pays on the device (cloudsvc/targets_choice.py), with
        the reason. `why_not_built`: :meth:`not_built` of `record`, when the caller has it."""
        choice = choose_target(
            record.artifacts,
            device.capabilities,
            target,
            why_not_built or self.not_built(record),
        )
        artifact = record.artifact(choice.target) if choice else None
        if choice is None or artifact is None:
            have = ", ".join(a.target for a in record.artifacts)
            raise NotReady(
                f"none of {record.model} v{record.version}'s artifacts ({have}) runs on "
                f"{device.device_id} (providers: {list(device.capabilities.execution_providers)})"
            )
        bins = tuple(InputBins(s.input, s.edges) for s in record.baseline if s.edges)
        return Assignment(
            record.model,
            record.version,
            artifact.target,
            artifact.manifest_digest,
            capture=self.metadata.capture_policy(record.model),
            bins=bins,
            target_reason=choice.reason,
        )

    def not_built(self, record: ModelVersion) -> Callable[[str], str]:
        """What became of a target `record` lacks ("" when no job says), looked up once per
        target for as long as the caller keeps the function (a deploy, for all its
        devices)."""
        found: dict[str, str] = {}

        def why(target: str) -> str:
            if target not in found:
                found[target] = self._why_not_built(record.model, record.version, target)
            return found[target]

        return why

    def _why_not_built(self, model: str, version: int, target: str) -> str:
        """The newest job that tried `target` for `model` v`version` and did not build it:
        a fine-tune's refused or failed outcome, or a failed `edgefleet compile`."""
        for job in self.metadata.list_jobs(model, limit=_JOBS_SEARCHED):
            for outcome in job.targets:
                if (job.result_version, outcome.target) != (version, target):
                    continue
                if outcome.status != "built":
                    what = (
                        "refused by the accuracy gate" if outcome.status == "refused" else "failed"
                    )
                    return f"{what} in {job.job_id} ({_short(outcome.reason)})"
            request = job.request
            if (
                job.kind == "compile"
                and job.state is JobState.FAILED
                and request.get("version") == version
                and request.get("target") == target
            ):
                refused = "a drop of" in job.error  # compilers' AccuracyDropError
                what = "refused by the accuracy gate" if refused else "its compile failed"
                return f"{what} in {job.job_id} ({_short(job.error)})"
        return ""

    def set_capture_policy(self, model: str, policy: CapturePolicy) -> list[tuple[str, int]]:
        """What devices capture of `model`'s inferences, from now on: devices that run it
        get it in their next desired state (generation + 1); later deploys carry it."""
        if self.registry.metadata.get_model(model) is None:
            raise UnknownResource(f"no model is named {model[:80]!r}; see `edgefleet models list`")
        if not (0.0 <= policy.sample_rate <= 1.0 and 0.0 <= policy.below_confidence <= 1.0):
            raise InvalidRequest("the sample rate and the confidence threshold are between 0 and 1")
        if not 0 <= policy.max_row_bytes <= 64 << 20:
            raise InvalidRequest("max_row_bytes is at most 64 MiB")
        with self._deploy_lock:
            self.metadata.set_capture_policy(model, policy)
            plan = {}
            for device in self.metadata.list_devices():
                current = self.metadata.get_desired(device.device_id).assignment(model)
                if current is not None and current.capture != policy:
                    plan[device.device_id] = replace(current, capture=policy)
            generations = self.metadata.assign(plan) if plan else {}
        with self._changed:
            self._changed.notify_all()
        return sorted(generations.items())

    def set_traffic(
        self,
        model: str,
        selector: Mapping[str, str] | None,
        variants: Sequence[TrafficVariant],
    ) -> list[tuple[str, int]]:
        """Serve a second version of `model` beside its primary on the devices of `selector`
        that run it: an A/B share of requests (weight in (0, 1)) or a shadow (weight 0; a copy
        of every request, compared, never answered). Empty `variants` clears the split. Every
        check runs before anything moves; the plan is one transaction. A later deploy or
        rollback of the model replaces the assignment and so clears the split."""
        selector = dict(selector or {})
        if self.registry.metadata.get_model(model) is None:
            raise UnknownResource(f"no model is named {model[:80]!r}; see `edgefleet models list`")
        _check_split(variants)
        records = {v.version: self.registry.get_version(model, v.version) for v in variants}
        for version, record in records.items():
            if not record.artifacts:
                raise NotReady(f"{model} v{version} has no artifact to serve; push it again")
        not_built = {v: self.not_built(r) for v, r in records.items()}
        with self._deploy_lock:
            devices = [
                d for d in self.metadata.list_devices() if d.matches(selector) and not d.revoked
            ]
            if not devices:
                raise NotReady(self.no_match_message(selector))
            plan: dict[str, Assignment] = {}
            running = 0
            for device in devices:
                current = self.metadata.get_desired(device.device_id).assignment(model)
                if current is None:
                    continue  # the selector may span devices that do not run the model
                running += 1
                chosen = []
                for v in variants:
                    if v.version == current.version:
                        raise InvalidRequest(
                            f"{device.device_id} runs {model} v{v.version} as its primary: a "
                            "variant is another version (deploy moves the primary)"
                        )
                    made = self._assignment(records[v.version], device, "", not_built[v.version])
                    chosen.append(
                        Variant(v.version, made.target, made.manifest_digest, v.weight, v.shadow)
                    )
                if current.variants != tuple(chosen):
                    plan[device.device_id] = replace(current, variants=tuple(chosen))
            if not running:
                wanted = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(all)"
                raise NotReady(
                    f"no device of the selector {wanted!r} runs {model}: deploy it first "
                    f"(`edgefleet deploy {model} VERSION`), then split its traffic"
                )
            generations = self.metadata.assign(plan) if plan else {}
        with self._changed:
            self._changed.notify_all()
        return sorted(generations.items())

    def no_match_message(self, selector: Mapping[str, str]) -> str:
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

    def signed_desired_state(
        self, device_id: str, desired: DesiredState | None = None
    ) -> SignedDesiredState:
        """The device's desired state (`desired`, when the caller just read it), signed by
        the current root key, issued now and expiring after desired_state_ttl_s: a device in
        contact always holds a fresh one."""
        now = time.time()
        desired = desired if desired is not None else self.metadata.get_desired(device_id)
        state = replace(
            desired,
            # Why a target was chosen is the operator's to read, not the device's.
            assignments=tuple(replace(a, target_reason="") for a in desired.assignments),
            issued_at=now,
            expires_at=now + self.desired_state_ttl_s,
        )
        return self.keys.sign_desired(state)

    def readable(self, device_id: str, manifest_digest: str) -> None:
        """Forbidden unless the manifest is in the device's current or previous desired
        state: a device reads only the models it is told to run (or ran just before)."""
        if manifest_digest not in self.metadata.allowed_digests(device_id):
            raise Forbidden(
                f"manifest {manifest_digest[:12]} is not in the desired state of {device_id}"
            )

    def chunk_readable(self, device_id: str, sha256: str) -> None:
        """Forbidden unless a manifest the device may read names the chunk."""
        for digest in self.metadata.allowed_digests(device_id):
            if sha256 in self.registry.chunks_of(digest):
                return
        raise Forbidden(f"chunk {sha256[:12]} is in no manifest {device_id} may read")

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

    @property
    def changed(self) -> threading.Condition:
        """Notified whenever a device's desired state may have moved (and on wake/close):
        what gRPC watchers and the MQTT notifier wait on."""
        return self._changed

    # reports ---------------------------------------------------------------------------
    def report(self, state: ReportedState) -> int:
        """Store what the device runs; the cloud's desired generation for it. The labels a
        device reports are advisory (kept with the report): selectors use the operator's."""
        device = self.metadata.get_device(state.device_id)
        if device is None:
            raise UnknownResource(f"device {state.device_id!r} is not enrolled; enroll it first")
        check_labels(state.labels)
        if len(state.models) > MAX_MODELS_REPORTED:
            raise InvalidRequest(
                f"the report lists {len(state.models)} models; at most {MAX_MODELS_REPORTED}"
            )
        if state.observed_generation > MAX_GENERATION:
            raise InvalidRequest(
                f"observed generation {state.observed_generation} is no generation this cloud "
                f"issued (they are at most {MAX_GENERATION})"
            )
        now = time.time()
        self.metadata.put_reported(replace(state, reported_at=now))
        if state.capabilities is not None and state.capabilities != device.capabilities:
            self.metadata.put_device(
                replace(device, capabilities=state.capabilities, last_seen_at=now)
            )
        else:
            # Only "seen": one write a second at most, not a transaction per report.
            self.touch(device.device_id)
        return self.metadata.get_desired(state.device_id).generation

    # the operator's hold over devices ----------------------------------------------------
    def label(self, device_id: str, set_: Mapping[str, str], remove: Sequence[str] = ()) -> Device:
        device = self._enrolled(device_id)
        labels = {k: v for k, v in device.labels.items() if k not in set(remove)}
        labels.update(set_)
        check_labels(labels)
        relabelled = replace(device, labels=labels)
        with self._deploy_lock:
            self.metadata.put_device(relabelled)
            # What a site runs follows the device there: standing deployments that match its
            # new labels apply now, as they would have at enrollment.
            self._apply_standing_deployments(relabelled)
        self.wake()
        return self.device(device_id)

    def revoke(self, device_id: str) -> Device:
        """Refuse every later call of the device; a re-enroll token brings it back."""
        device = self._enrolled(device_id)
        self.metadata.put_device(replace(device, revoked=True))
        self.wake()  # its watch stream ends at the next keep-alive
        log.warning("device %s revoked by the operator", device_id)
        return self.device(device_id)

    def _enrolled(self, device_id: str) -> DeviceRecord:
        device = self.metadata.get_device(device_id)
        if device is None:
            raise UnknownResource(
                f"no device {device_id[:80]!r} is enrolled; list them with `edgefleet devices`"
            )
        return device

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
            revoked=device.revoked,
        )

    def devices(self, selector: Mapping[str, str] | None = None) -> list[Device]:
        now = time.time()
        return [
            self.view(d, now) for d in self.metadata.list_devices() if d.matches(selector or {})
        ]

    def device(self, device_id: str) -> Device:
        return self.view(self._enrolled(device_id))


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"{len(labels)} labels; a device may have at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > 63 or len(value) > 255:
            raise InvalidRequest(
                f"label {key[:80]!r}={value[:80]!r} is not valid: keys need 1-63 characters, "
                "values at most 255"
            )


# A/B beside the primary or a shadow: two versions of a model on a device at most, so that
# its memory and the comparison stay simple to reason about.
MAX_VARIANTS = 1


def _check_split(variants: Sequence[TrafficVariant]) -> None:
    """InvalidRequest unless `variants` is a split a device can serve."""
    if len(variants) > MAX_VARIANTS:
        raise InvalidRequest(
            f"{len(variants)} variants: a device serves at most {MAX_VARIANTS + 1} versions of "
            "a model (the primary and one A/B or shadow version)"
        )
    for v in variants:
        if v.version < 1:
            raise InvalidRequest(f"variant version {v.version} names no version (they start at 1)")
        if not math.isfinite(v.weight) or not 0.0 <= v.weight < 1.0:
            raise InvalidRequest(
                f"v{v.version}'s weight {v.weight!r} is outside [0, 1): a share of requests, "
                "the primary keeping the rest"
            )
        if v.shadow and v.weight != 0.0:
            raise InvalidRequest(
                f"v{v.version} is a shadow with weight {v.weight}: a shadow answers no request "
                "(it gets a copy of each), so its weight is 0"
            )
        if not v.shadow and v.weight == 0.0:
            raise InvalidRequest(
                f"v{v.version} has weight 0 and is no shadow: give it a share (--ab "
                f"{v.version}=10%) or make it a shadow (--shadow {v.version})"
            )
    if len({v.version for v in variants}) != len(variants):
        raise InvalidRequest("a version appears twice among the variants")
    # Unreachable with one variant of weight under 1; the invariant devices rely on.
    if sum(v.weight for v in variants) >= 1.0:
        raise InvalidRequest(
            "the variants' weights sum to 1 or more: the primary must keep a share (to move "
            "every request to a version, deploy it)"
        )
