"""The reconcile loop: converge what this device runs to the cloud's desired state.

One pass: read the desired state; for each model whose desired digest is not the active
one: fetch and verify the signed manifest, download the missing chunks (resuming), assemble
and verify the files, load them in ONNX Runtime, smoke-test the golden samples, commit the
switch in SQLite, publish to the serving repository, and drop what is no longer needed.
Any failure leaves the active version serving, is recorded and reported, and the pass is
retried with capped exponential backoff and full jitter; a newer generation retries at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.activation import load_and_check
from agent.artifacts import ArtifactStore, verify_files
from agent.capabilities import capabilities
from agent.chunks import ChunkStore
from agent.cloud_link import CloudLink
from agent.errors import ArtifactRejected, NotEnrolled, Unavailable
from agent.runtime import LoadedModel, ModelRepository, SessionOptions
from agent.settings import AgentSettings
from agent.state import Identity, ModelRecord, Slot, StateStore
from edgefleet.core.certs import device_key_and_request
from edgefleet.core.errors import EdgefleetError, ErrorCode
from edgefleet.core.fleet import (
    Assignment,
    Capabilities,
    DesiredState,
    ModelPhase,
    ModelStatus,
    ReportedState,
    Variant,
)
from edgefleet.core.manifests import all_chunks, expand, manifest_digest, verify_manifest
from edgefleet.core.retry import Backoff
from edgefleet.core.trust import (
    RootKey,
    SignedDesiredState,
    TrustError,
    accept_desired,
    follow_chain,
    parse_fingerprint,
)
from protos.artifact.v1 import artifact_pb2

log = logging.getLogger(__name__)


# (manifest, digest, verified folder, session options) -> the loaded, smoke-tested version.
Loader = Callable[[artifact_pb2.Manifest, str, Path, SessionOptions], LoadedModel]


@dataclass
class Work:
    """What the agent is doing about one model: the version it works towards, and how far."""

    desired_version: int = 0
    desired_digest: str = ""
    phase: ModelPhase = ModelPhase.UNSPECIFIED
    error: str = ""


@dataclass(frozen=True)
class _Fetched:
    loaded: LoadedModel
    folder: Path


@dataclass
class PassResult:
    generation: int = 0
    converged: bool = False
    activated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Counters:
    passes: int = 0
    failed_passes: int = 0
    activations: int = 0
    rejections: int = 0


def _describe(err: BaseException) -> str:
    if isinstance(err, EdgefleetError):
        return err.message
    return f"{type(err).__name__}: {err}"


class Reconciler:
    def __init__(
        self,
        settings: AgentSettings,
        state: StateStore,
        chunks: ChunkStore,
        artifacts: ArtifactStore,
        link: CloudLink,
        repository: ModelRepository,
        *,
        on_event: Callable[[str], None] | None = None,
        inference_endpoint: str = "",
        on_desired: Callable[[DesiredState], None] | None = None,
        loader: Loader = load_and_check,
    ) -> None:
        self._on_desired = on_desired
        # What loads and smoke-tests a verified version: ONNX Runtime, or the fleet
        # simulator's stand-in (tests/fleetsim), which runs everything else for real.
        self._load = loader
        self.settings = settings
        self.state = state
        self.chunks = chunks
        self.artifacts = artifacts
        self.link = link
        self.repository = repository
        self.inference_endpoint = inference_endpoint
        self.counters = Counters()
        self._on_event = on_event
        self._options = SessionOptions(
            providers=tuple(settings.providers), intra_op_threads=settings.intra_op_threads
        )
        self._lock = threading.Lock()
        self._status: dict[str, Work] = {}
        # model -> what is wrong with its variants (the primary serves regardless).
        self._variant_errors: dict[str, str] = {}
        self._device_error = ""
        self._seen_generation = 0
        self._announced = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._capabilities: Capabilities | None = None

    # events and status ----------------------------------------------------------------
    def _event(self, message: str) -> None:
        log.info("%s", message)
        if self._on_event is not None:
            try:
                self._on_event(message)
            except Exception:
                log.exception("event listener failed")

    def _set_status(self, model: str, **changes: object) -> None:
        with self._lock:
            status = self._status.setdefault(model, Work())
            for key, value in changes.items():
                setattr(status, key, value)

    def status(self, model: str) -> Work:
        with self._lock:
            s = self._status.get(model, Work())
            return Work(s.desired_version, s.desired_digest, s.phase, s.error)

    @property
    def device_error(self) -> str:
        return self._device_error

    # start without the cloud ----------------------------------------------------------
    def restore(self) -> list[LoadedModel]:
        """Serve the active versions already on disk, checking every file against the
        manifest stored at activation. Makes no cloud call, so a rebooted device serves
        while offline. A version that fails its checks falls back to the previous one."""
        self.artifacts.clean_staging()
        last = self.state.last_desired()
        if last is not None and self._on_desired is not None:
            self._on_desired(last)  # what it asked holds offline too (capture policies)
        loaded: list[LoadedModel] = []
        keys = self.state.trusted_keys()
        for record in self.state.models():
            served: dict[int, LoadedModel] = {}
            for slot in (record.active, record.previous):
                if slot is None:
                    continue
                try:
                    served[slot.version] = self._load_installed(record.model, slot, keys)
                except EdgefleetError as err:
                    message = (
                        f"{record.model} v{slot.version} on disk cannot be served: {err.message}"
                    )
                    self._event(message)
                    self.state.record_error(record.model, message)
            if not served:
                continue
            # The active version is the default; the previous one stays addressable by
            # version for rollback, as it was before the restart.
            active = record.active.version if record.active else 0
            default = served.get(active) or next(iter(served.values()))
            for model in served.values():
                if model is not default:
                    self.repository.publish(model)
            self.repository.publish(default, keep=[v for v in served if v != default.version])
            loaded.extend(served.values())
            ready = default.version == active
            self._set_status(
                record.model,
                desired_version=default.version,
                desired_digest=default.digest,
                phase=ModelPhase.READY if ready else ModelPhase.FAILED,
                error="" if ready else record.last_error,
            )
            self._event(
                f"serving {record.model} v{default.version} from disk ({default.execution_provider})"
            )
        return loaded

    def _load_installed(self, name: str, slot: Slot, keys: list[bytes]) -> LoadedModel:
        raw = self.state.manifest(slot.digest)
        if raw is None:
            raise ArtifactRejected(f"no stored manifest for digest {slot.digest[:12]}")
        signed = artifact_pb2.SignedManifest()
        signed.ParseFromString(raw)
        manifest = verify_manifest(signed, keys, slot.digest)
        verify_files(slot.dir, manifest)
        return self._load(manifest, slot.digest, slot.dir, self._options)

    # trust ----------------------------------------------------------------------------
    def ensure_trust(self) -> RootKey:
        """The root key desired states must be signed by. The first time, the cloud's chain
        is followed from the fingerprint provisioned out of band (root_key): a cloud that
        does not hold that key is not trusted, whatever it answers."""
        keys = self.state.root_keys()
        pin = self.settings.root_key
        if keys:
            if pin and parse_fingerprint(pin) not in {k.fingerprint for k in keys}:
                raise TrustError(
                    f"the provisioned root key {pin[:23]}... is not one this device trusts "
                    f"({keys[-1].fingerprint[:23]}...): it was provisioned for another cloud; "
                    "move its data folder aside to start over"
                )
            return keys[-1]
        if not pin:
            raise NotEnrolled(
                "this device trusts no cloud yet: start it with --root-key (the fingerprint "
                "in the cloud's data_dir/trust/root-key.txt, provisioned out of band)"
            )
        trusted = follow_chain(self.link.get_trust(), parse_fingerprint(pin))
        self.state.trust(trusted)
        self._event(f"trusting the cloud's root key v{trusted[-1].version} ({pin[:23]}...)")
        return trusted[-1]

    def refresh_trust(self) -> RootKey:
        """Follow the cloud's chain from the newest key trusted: a rotation signed by it
        (and by the new key) is the only way another key becomes trusted."""
        keys = self.state.root_keys()
        trusted = follow_chain(self.link.get_trust(), keys[-1])
        self.state.trust(trusted)
        if trusted[-1] != keys[-1]:
            # As TUF does after a key rotation: the generation floor starts over under the
            # new key, so a state fast-forwarded with a stolen old key cannot lock the device
            # out for good (states signed by an old key are refused from now on anyway).
            self.state.accept(0, 0.0)
            self._event(f"the cloud rotated its root key: now trusting v{trusted[-1].version}")
        return trusted[-1]

    def _accept(self, signed: SignedDesiredState, identity: Identity) -> DesiredState:
        """The desired state, once signed by the trusted root key, for this device, not
        expired, and no older than the one last accepted; TrustError otherwise."""
        current = self.ensure_trust()
        if signed.key_id != current.key_id:
            current = self.refresh_trust()
        generation, issued_at = self.state.accepted()
        state = accept_desired(
            signed,
            current,
            identity.device_id,
            generation,
            issued_at,
            clock_skew_s=self.settings.clock_skew_s,
        )
        self.state.accept(state.generation, state.issued_at)
        self.state.save_desired(state)
        if self._on_desired is not None:
            self._on_desired(state)
        return state

    # identity -------------------------------------------------------------------------
    def ensure_identity(self) -> Identity:
        identity = self.state.identity()
        if identity is None:
            token = self.settings.enroll_secret()
            if not token:
                raise NotEnrolled(
                    "this device is not enrolled yet: start it with --enroll-token-file (or "
                    "EDGEFLEET_AGENT_ENROLL_TOKEN); create one with `edgefleet tokens create`"
                )
            identity = self._enroll(token, "")
        self.link.authenticate(identity)
        return identity

    def _enroll(self, token: str, current_credential: str, device_id: str = "") -> Identity:
        """Enroll (or re-enroll) this device; with TLS, ask for a client certificate too
        (kept only if the cloud does mutual TLS)."""
        device_id = device_id or self.settings.device_id
        key, request = (b"", b"")
        if not self.settings.insecure:
            key, request = device_key_and_request(device_id)
        enrollment = self.link.enroll(
            token,
            device_id,
            dict(self.settings.labels),
            self._caps(),
            certificate_request=request,
            current_credential=current_credential,
        )
        identity = Identity(
            enrollment.device_id,
            enrollment.device_token,
            enrollment.certificate,
            key if enrollment.certificate else b"",
            enrollment.device_port,
            enrollment.mqtt,
        )
        self.state.save_identity(identity)
        how = " with mutual TLS" if enrollment.certificate else ""
        self._event(f"enrolled as device {identity.device_id}{how}")
        return identity

    def reenroll(self, token: str = "") -> Identity:
        """Rotate this device's credential: with its current one, or with a re-enroll token
        the operator made for it (after a revocation, say)."""
        identity = self.state.identity()
        if identity is None:
            return self.ensure_identity()
        return self._enroll(token, identity.device_token, identity.device_id)

    def _caps(self) -> Capabilities:
        if self._capabilities is None:
            self._capabilities = capabilities()
        return self._capabilities

    # one pass -------------------------------------------------------------------------
    def reconcile_once(self) -> PassResult:
        """Converge once. Raises only when the desired state cannot be read at all."""
        self.counters.passes += 1
        result = PassResult()
        try:
            self.ensure_trust()
            identity = self.ensure_identity()
            desired = self._accept(self.link.get_desired_state(), identity)
        except EdgefleetError as err:
            message = _describe(err)
            if err.code == ErrorCode.UNAUTHENTICATED and self.state.identity() is not None:
                # Never dropped on the agent's own: the answer may be an attacker's, and the
                # operator decides (a re-enroll token and `edgefleet agent reenroll`).
                message = (
                    f"the cloud refuses this device's credential ({message}); it keeps "
                    "serving what it has. If the device was revoked or its identity moved, "
                    "the operator makes a re-enroll token (`edgefleet tokens create --reenroll "
                    "ID`) for `edgefleet agent reenroll --enroll-token-file FILE`"
                )
            self._device_error = message
            self.counters.failed_passes += 1
            raise type(err)(message) from None
        result.generation = int(desired.generation)
        self._seen_generation = max(self._seen_generation, result.generation)
        device_errors: list[str] = []
        wanted = {a.model: a for a in desired.assignments}
        for assignment in desired.assignments:
            try:
                if self._converge(assignment, result.generation):
                    result.activated.append(f"{assignment.model} v{assignment.version}")
            except Exception as err:  # one model's failure must not stop the others
                message = _describe(err)
                result.errors.append(message)
                unavailable = isinstance(err, EdgefleetError) and err.code == ErrorCode.UNAVAILABLE
                if unavailable:
                    device_errors.append(message)
                else:
                    self.counters.rejections += 1
                    self.state.record_error(assignment.model, message)
                self._set_status(assignment.model, phase=ModelPhase.FAILED, error=message)
                if not isinstance(err, EdgefleetError):
                    log.exception("unexpected failure converging %s", assignment.model)
                self._event(f"{assignment.model} v{assignment.version} failed: {message}")
            result.errors.extend(self._converge_variants(assignment))
        for record in self.state.models():
            if record.model not in wanted:
                self._retire(record)
        self.state.set_observed_generation(result.generation)
        self._device_error = "; ".join(device_errors)
        self._collect_garbage(desired)
        result.converged = not result.errors
        if not result.converged:
            self.counters.failed_passes += 1
        return result

    def _converge(self, assignment: Assignment, generation: int) -> bool:
        """Make `assignment` the active version; True when a switch happened."""
        name, digest = assignment.model, assignment.manifest_digest
        record = self.state.model(name)
        active = record.active if record is not None else None
        # The version too: a signed state that names the held manifest under another version
        # number goes the full way below, where the manifest's own version refuses it.
        if (
            active is not None
            and active.digest == digest
            and active.version == assignment.version
            and self._serving(name, active)
        ):
            self._set_status(
                name,
                desired_version=assignment.version,
                desired_digest=digest,
                phase=ModelPhase.READY,
                error="",
            )
            if record is not None and record.observed_generation != generation:
                self.state.mark_observed(name, generation)
            return False
        self._set_status(
            name,
            desired_version=assignment.version,
            desired_digest=digest,
            phase=ModelPhase.DOWNLOADING,
            error="",
        )
        label = f"{name} v{assignment.version}"
        floor = self.state.floor(name)
        if assignment.version < floor and not assignment.rollback:
            # Signed or not, a move below what this device ran is an operator's decision.
            raise ArtifactRejected(
                f"{label} is older than v{floor}, the newest this device has run: going back "
                f"needs an operator's rollback (`edgefleet rollback {name} --to "
                f"{assignment.version}`); what it has keeps serving"
            )
        model = self._fetch_and_load(name, assignment.version, digest, assignment.target)
        switched = self.state.switch(
            name,
            Slot(assignment.version, digest, model.folder),
            generation,
            rollback=assignment.rollback,
        )
        keep = [switched.previous.version] if switched.previous else []
        # Variants already loaded keep serving across the primary's switch.
        keep += [v.version for v in assignment.variants]
        dropped = self.repository.publish(model.loaded, keep=keep)
        del dropped  # released with their sessions once no request holds them
        self.counters.activations += 1
        self._set_status(name, phase=ModelPhase.READY, error="")
        self._event(f"serving {label} on {model.loaded.execution_provider}")
        return True

    def _fetch_and_load(
        self, name: str, version: int, digest: str, target: str, *, primary: bool = True
    ) -> _Fetched:
        """Fetch, verify, assemble, load and smoke-test one version's artifact: what every
        version goes through before it serves, primary or variant."""
        label = f"{name} v{version}"
        wire = self.link.get_manifest(digest)
        self.chunks.count_manifest(len(wire.manifest_zlib) or len(wire.manifest))
        signed = expand(wire)
        manifest = verify_manifest(signed, self.state.trusted_keys(), digest)
        if manifest.expires_at and manifest.expires_at < time.time():
            raise ArtifactRejected(
                f"{label}'s manifest expired at "
                f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(manifest.expires_at))} UTC"
            )
        if manifest.target != target:
            raise ArtifactRejected(
                f"manifest {digest[:12]} is built for {manifest.target[:64]!r}, but the desired "
                f"state assigns {label} for {target!r}"
            )
        if manifest.model != name or manifest.version != version:
            raise ArtifactRejected(
                f"manifest {digest[:12]} describes {manifest.model} v{manifest.version}, "
                f"but the desired state assigns {label}"
            )
        self.state.save_manifest(digest, signed.SerializeToString())
        self.artifacts.preflight(manifest, self.settings.min_free_disk_bytes)
        every = all_chunks(manifest)
        missing = self.chunks.missing(manifest)
        missing_names = {c.sha256 for c in missing}
        self.chunks.count_skipped(c for c in every if c.sha256 not in missing_names)
        if missing:
            self._event(
                f"{label}: downloading {len(missing)}/{len(every)} chunks "
                f"({sum(c.size for c in missing)} bytes; {len(every) - len(missing)} already held)"
            )
        step = max(1, len(missing) // 10)
        for index, ref in enumerate(missing, start=1):
            self.chunks.fetch(ref, self._pieces)
            if index % step == 0 or index == len(missing):
                self._event(f"{label}: downloaded {index}/{len(missing)} chunks")
        if primary:
            self._set_status(name, phase=ModelPhase.ACTIVATING)
        self._event(f"activating {label}")
        folder = self._assemble(name, digest, manifest)
        return _Fetched(self._load(manifest, digest, folder, self._options), folder)

    def _converge_variants(self, assignment: Assignment) -> list[str]:
        """Serve the assignment's variants beside its primary and split traffic between
        those loaded; the errors of those that failed. A variant that fails never touches
        the primary: its share goes to the primary until a later pass loads it."""
        name = assignment.model
        serving = self._default_model(name)
        errors: list[str] = []
        loaded: list[Variant] = []
        if serving is not None and serving.version == assignment.version:
            for variant in assignment.variants:
                try:
                    self._load_variant(name, variant)
                    loaded.append(variant)
                except Exception as err:
                    message = f"variant v{variant.version}: {_describe(err)}"
                    errors.append(f"{name} {message}")
                    self._event(f"{name} {message}; the primary v{assignment.version} serves on")
                    if not isinstance(err, EdgefleetError):
                        log.exception("unexpected failure loading a variant of %s", name)
        # A split is only ever around the desired primary: with another version serving (its
        # activation failed), that version takes every request.
        self.repository.set_traffic(name, loaded)
        wanted = {v.version for v in loaded}
        record = self.state.model(name)
        previous = record.previous.version if record and record.previous else 0
        for version in self.repository.versions(name):
            if version not in wanted and version != previous:
                self.repository.drop(name, version)
        with self._lock:
            if errors:
                self._variant_errors[name] = "; ".join(errors)
            else:
                self._variant_errors.pop(name, None)
        return errors

    def _load_variant(self, name: str, variant: Variant) -> None:
        try:
            held = self.repository.get(name, variant.version)
        except EdgefleetError:
            held = None
        if held is not None and held.digest == variant.manifest_digest:
            return
        role = "shadow" if variant.shadow else f"A/B {variant.weight:.1%}"
        fetched = self._fetch_and_load(
            name, variant.version, variant.manifest_digest, variant.target, primary=False
        )
        self.repository.add(fetched.loaded)
        self.counters.activations += 1
        self._event(
            f"serving {name} v{variant.version} beside the primary ({role}) on "
            f"{fetched.loaded.execution_provider}"
        )

    def _pieces(self, sha256: str, offset: int) -> Iterator[bytes]:
        # Checked between pieces so that stop() does not wait for a whole large chunk.
        for data in self.link.fetch_chunk(sha256, offset):
            if self._stop.is_set():
                raise Unavailable("download interrupted: the agent is stopping")
            yield data

    def _serving(self, name: str, slot: Slot) -> bool:
        try:
            return self.repository.get(name, slot.version).digest == slot.digest
        except EdgefleetError:
            return False

    def _assemble(self, name: str, digest: str, manifest: artifact_pb2.Manifest) -> Path:
        try:
            return self.artifacts.assemble(name, digest, manifest)
        except ArtifactRejected:
            # A file did not verify: find the chunk that rotted on disk and drop it (and the
            # bad folder), so the next pass downloads it again instead of failing forever.
            self.artifacts.discard(name, digest)
            self.chunks.drop_corrupt(all_chunks(manifest))
            raise

    def _retire(self, record: ModelRecord) -> None:
        self.repository.remove(record.model)
        self.state.remove_model(record.model)
        with self._lock:
            self._status.pop(record.model, None)
            self._variant_errors.pop(record.model, None)
        self._event(f"stopped serving {record.model}: no longer in the desired state")

    def _collect_garbage(self, desired: DesiredState) -> None:
        keep: dict[str, set[str]] = {}
        digests: set[str] = set()
        for record in self.state.models():
            for slot in (record.active, record.previous):
                if slot is not None:
                    keep.setdefault(record.model, set()).add(slot.digest)
                    digests.add(slot.digest)
        # Chunks of a version still being downloaded stay, so the next try resumes; variants'
        # folders stay while they are wanted.
        for a in desired.assignments:
            digests.update(a.digests())
            keep.setdefault(a.model, set()).update(v.manifest_digest for v in a.variants)
        manifests: list[artifact_pb2.Manifest] = []
        for digest in digests:
            raw = self.state.manifest(digest)
            if raw is None:
                continue
            signed = artifact_pb2.SignedManifest()
            signed.ParseFromString(raw)
            if manifest_digest(signed) != digest:
                continue
            manifest = artifact_pb2.Manifest()
            manifest.ParseFromString(signed.manifest)
            manifests.append(manifest)
        try:
            freed = self.artifacts.gc(keep, manifests)
        except OSError as err:
            log.warning("garbage collection failed: %s", err)
            return
        self.state.prune_manifests(digests)
        if freed:
            log.info("freed %d bytes of unused versions and chunks", freed)

    # reports --------------------------------------------------------------------------
    def build_report(self) -> ReportedState:
        identity = self.state.identity()
        records = {r.model: r for r in self.state.models()}
        with self._lock:
            works = {k: Work(**vars(v)) for k, v in self._status.items()}
        models = []
        for name in sorted(set(records) | set(works)):
            record = records.get(name)
            work = works.get(name, Work())
            # Report what actually answers requests, which after a failed restore can be
            # the previous version rather than the recorded active one.
            serving = self._default_model(name)
            models.append(
                ModelStatus(
                    model=name,
                    active_version=serving.version if serving else 0,
                    active_digest=serving.digest if serving else "",
                    previous_version=record.previous.version if record and record.previous else 0,
                    desired_version=work.desired_version,
                    phase=work.phase,
                    error=work.error
                    or (record.last_error if record else "")
                    or self._variant_errors.get(name, ""),
                    execution_provider=serving.execution_provider if serving else "",
                )
            )
        return ReportedState(
            device_id=identity.device_id if identity else "",
            observed_generation=self.state.observed_generation(),
            models=tuple(models),
            capabilities=self._caps(),
            last_error=self._device_error,
            labels=dict(self.settings.labels),
            inference_endpoint=self.inference_endpoint,
        )

    def _default_model(self, name: str) -> LoadedModel | None:
        try:
            return self.repository.get(name)
        except EdgefleetError:
            return None

    def report(self) -> bool:
        """Send the state; True when the cloud took it. Wakes the loop if the cloud is ahead."""
        if self.state.identity() is None:
            return False
        try:
            desired_generation = self.link.report_state(self.build_report())
        except EdgefleetError as err:
            log.info("state report not delivered: %s", err.message)
            return False
        if desired_generation > self._seen_generation:
            self.notice(desired_generation, via="state report")
        return True

    # the loop -------------------------------------------------------------------------
    def notice(self, generation: int, via: str = "") -> None:
        """The cloud announced `generation` (`via`: which transport said it); reconcile now
        if it is news."""
        if generation > self._seen_generation:
            if generation != self._announced:  # said once, however often it is repeated
                self._announced = generation
                source = f" (notice via {via})" if via else ""
                self._event(f"desired state moved to generation {generation}{source}")
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Reconcile until stop(): on a notice, on the resync timer, or after a backoff."""
        backoff = Backoff(base=self.settings.backoff_base_s, cap=self.settings.backoff_cap_s)
        last_failure = ""
        while not self._stop.is_set():
            self._wake.clear()
            started = time.monotonic()
            try:
                result = self.reconcile_once()
                converged = result.converged
                if last_failure:
                    self._event(f"reached the cloud again (generation {result.generation})")
                last_failure = ""
            except EdgefleetError as err:
                converged = False
                message = f"cannot read the desired state: {err.message}"
                if message != last_failure:  # one line per change, not one per retry
                    self._event(message)
                last_failure = message
            except Exception as err:  # keep serving whatever went wrong
                converged = False
                self._device_error = _describe(err)
                log.exception("reconcile pass failed")
            self.report()
            if converged:
                backoff.reset()
                delay = self.settings.resync_interval_s
            else:
                delay = backoff.next_delay()
                log.info("retrying in %.2fs (pass took %.2fs)", delay, time.monotonic() - started)
            self._wake.wait(delay)
