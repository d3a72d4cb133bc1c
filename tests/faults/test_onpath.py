"""The attacks the review made on a real agent, replayed by an attacker on its path: a gRPC
server the agent dials instead of the cloud (possible only with --insecure, which is the
point of TLS), forwarding to a real cloud process and rewriting what passes. Each attack is
refused: the agent keeps serving its verified version and says why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cli.processes import ManagedProcess, cloud_process
from edgefleet.core.certs import init_ca
from edgefleet.core.fleet import DesiredState
from edgefleet.core.manifests import public_key_bytes, sign_manifest
from edgefleet.core.trust import RootKey, SignedDesiredState, TrustChain, sign_desired
from edgefleet.core.wire import from_proto, to_proto
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import fleet_pb2
from tests.faults import figures
from tests.faults.conftest import FAST_AGENT
from tests.faults.mitm import GrpcMitm, Metadata, Refuse
from tests.faults.netproxy import TcpProxy
from tests.faults.procs import big_model, served
from tests.integration.conftest import Fleet, running

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


@pytest.fixture
def plain_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A cloud process serving plain text (--insecure), as an attacker needs it."""
    cloud, trust = cloud_process(tmp_path, insecure=True)
    cloud.start().wait_ready(60)
    f = Fleet(tmp_path, cloud, trust)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def mitm(plain_fleet: Fleet) -> Iterator[GrpcMitm]:
    m = GrpcMitm(plain_fleet.cloud.address)
    yield m
    m.close()


def _on_v1(fleet: Fleet, mitm: GrpcMitm, tmp_path: Path) -> ManagedProcess:
    agent = fleet.start_agent("a1", via=mitm.address, env=FAST_AGENT)
    fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment through the attacker")
    fleet.admin.push_model("m", big_model(tmp_path / "m1.onnx", seed=1, bias=1, columns=500))
    fleet.admin.deploy("m", 1)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, 60, "a1 on v1")
    return agent


def _push_v2(fleet: Fleet, tmp_path: Path) -> None:
    fleet.admin.push_model("m", big_model(tmp_path / "m2.onnx", seed=2, bias=2, columns=500))
    fleet.admin.deploy("m", 2)


def _holds_v1(fleet: Fleet, agent: ManagedProcess, seconds: float = 3.0) -> None:
    """For `seconds`, the agent keeps answering as v1 (and never as anything else)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = served(agent)
        assert answer is not None and (answer.version, answer.value) == (1, 1.0), answer
        time.sleep(0.3)


def _wait_error(fleet: Fleet, fragment: str, timeout: float = 30) -> None:
    """What `edgefleet devices` shows as the device's errors comes to name the refusal."""
    fleet.wait_for(lambda ds: fragment in " ".join(ds[0].errors), timeout, f"error {fragment!r}")


def _attacker_state(raw: bytes, key: Ed25519PrivateKey, **changes: object) -> bytes:
    signed = from_proto(fleet_pb2.SignedDesiredState.FromString(raw), SignedDesiredState)
    state = from_proto(fleet_pb2.DesiredState.FromString(signed.state), DesiredState)
    forged = sign_desired(replace(state, **changes), key)  # type: ignore[arg-type]
    return to_proto(forged, fleet_pb2.SignedDesiredState).SerializeToString()


def test_key_substitution_through_a_forced_re_enrollment_is_refused(
    plain_fleet: Fleet, mitm: GrpcMitm, tmp_path: Path
) -> None:
    """The review's attack: answer UNAUTHENTICATED, hoping the agent re-enrolls and takes new
    keys, and hand out the attacker's trust chain and desired state. The agent neither
    re-enrolls nor trusts the substitute key, and never serves the attacker's model."""
    agent = _on_v1(plain_fleet, mitm, tmp_path)
    enrollments = mitm.count("Enroll")
    attacker = Ed25519PrivateKey.generate()
    chain = TrustChain(RootKey(1, public_key_bytes(attacker)))
    mitm.answer["GetTrust"] = lambda raw, md: to_proto(
        chain, fleet_pb2.TrustChain
    ).SerializeToString()

    def unauthenticated(raw: bytes, md: Metadata) -> bytes:
        raise Refuse(grpc.StatusCode.UNAUTHENTICATED, "the device credential is not valid")

    mitm.answer["GetDesiredState"] = unauthenticated
    _holds_v1(plain_fleet, agent)
    del mitm.answer["GetDesiredState"]
    mitm.on_response["GetDesiredState"] = lambda raw: _attacker_state(raw, attacker)
    _push_v2(plain_fleet, tmp_path)
    _holds_v1(plain_fleet, agent)
    # Its key is not the one provisioned, nor signed by it: the substitute chain is refused.
    _wait_error(plain_fleet, "do not include the trusted one")
    assert mitm.count("Enroll") == enrollments  # it never re-enrolled on its own
    figures.add("attacks refused", "key substitution via forced re-enrollment")
    # With the attacker gone, the device moves on to the cloud's v2.
    mitm.answer.clear()
    mitm.on_response.clear()
    plain_fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, 60, "a1 on v2")


def test_replayed_older_frozen_and_emptied_desired_states_are_refused(
    plain_fleet: Fleet, mitm: GrpcMitm, tmp_path: Path
) -> None:
    agent = _on_v1(plain_fleet, mitm, tmp_path)
    recorded = mitm.seen["GetDesiredState"][-1]  # generation 1, signed by the cloud
    plain_fleet.admin.push_model("m", big_model(tmp_path / "m9.onnx", seed=9, bias=9, columns=500))
    plain_fleet.admin.deploy("m", 2)
    plain_fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, 60, "a1 on v2")

    attacks = {
        # Replay the cloud's own signed state of generation 1: a rollback of the state.
        "replayed older desired state": (lambda raw: recorded, "rollback of the desired state"),
        # Strip the signature from an empty state: stop serving.
        "unsigned empty desired state": (
            lambda raw: fleet_pb2.SignedDesiredState(
                state=fleet_pb2.DesiredState(device_id="a1", generation=99).SerializeToString(),
                key_id=fleet_pb2.SignedDesiredState.FromString(raw).key_id,
            ).SerializeToString(),
            "signature is not valid",
        ),
    }
    for name, (rewrite, fragment) in attacks.items():
        mitm.on_response["GetDesiredState"] = rewrite
        _wait_error(plain_fleet, fragment)
        answer = served(agent)
        assert answer is not None and (answer.version, answer.value) == (2, 9.0), name
        figures.add("attacks refused", name)
    mitm.on_response.clear()


def test_a_frozen_device_refuses_the_stale_state_and_keeps_serving(
    tmp_path: Path,
) -> None:
    """Indefinite freeze: the attacker answers every poll with the last state it saw. Once
    that state expires (desired_state_ttl_s), it is refused; the device serves on."""
    cloud, trust = cloud_process(tmp_path, insecure=True)
    cloud.env["EDGEFLEET_CLOUD_DESIRED_STATE_TTL_S"] = "2"
    cloud.start().wait_ready(60)
    fleet = Fleet(tmp_path, cloud, trust)
    mitm = GrpcMitm(cloud.address)
    try:
        env = {**FAST_AGENT, "EDGEFLEET_AGENT_CLOCK_SKEW_S": "0"}
        agent = fleet.start_agent("a1", via=mitm.address, env=env)
        fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment")
        fleet.admin.push_model("m", big_model(tmp_path / "m1.onnx", seed=1, bias=1, columns=500))
        fleet.admin.deploy("m", 1)
        fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, 60, "a1 on v1")
        frozen = mitm.seen["GetDesiredState"][-1]
        mitm.on_response["GetDesiredState"] = lambda raw: frozen
        _wait_error(fleet, "expired")
        _holds_v1(fleet, agent, 1.0)
        figures.add("attacks refused", "indefinite freeze (stale desired state)")
    finally:
        mitm.close()
        fleet.stop()


def test_a_substituted_manifest_and_tampered_chunks_are_refused(
    plain_fleet: Fleet, mitm: GrpcMitm, tmp_path: Path
) -> None:
    agent = _on_v1(plain_fleet, mitm, tmp_path)
    attacker = Ed25519PrivateKey.generate()

    def resign(raw: bytes) -> bytes:
        wire = artifact_pb2.SignedManifest.FromString(raw)
        from edgefleet.core.manifests import expand

        manifest = artifact_pb2.Manifest.FromString(expand(wire).manifest)
        manifest.metadata["owned"] = "yes"
        return sign_manifest(manifest, attacker).SerializeToString()

    mitm.on_response["GetManifest"] = resign
    _push_v2(plain_fleet, tmp_path)
    _wait_error(plain_fleet, "manifest")
    _holds_v1(plain_fleet, agent, 1.0)
    figures.add("attacks refused", "manifest re-signed by another key")
    del mitm.on_response["GetManifest"]

    def flip(raw: bytes) -> bytes:
        piece = fleet_pb2.ChunkPiece.FromString(raw)
        piece.data = bytes(b ^ 0x5A for b in piece.data)
        return piece.SerializeToString()

    mitm.on_response["FetchChunk"] = flip
    _wait_error(plain_fleet, "sha256")
    _holds_v1(plain_fleet, agent, 1.0)
    figures.add("attacks refused", "chunk bytes altered in flight")
    mitm.on_response.clear()
    plain_fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, 60, "a1 on v2")


def test_tls_leaves_the_attacker_nothing_to_read_or_to_answer(fleet: Fleet, tmp_path: Path) -> None:
    """With TLS (the default) the tokens never cross the wire readable, and an attacker
    that answers in the cloud's place, in plain text or with its own certificate, is not
    believed: the agent does not enroll, does not send its token, serves what it has."""
    proxy = TcpProxy(fleet.cloud.address)
    proxy.capture = bytearray()
    token_file = fleet.enroll_token_file("a1", {"site": "a"})
    secret = token_file.read_text().strip().encode()
    try:
        agent = fleet.start_agent("a1", via=proxy.address, env=FAST_AGENT)
        fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment over TLS through the proxy")
        assert proxy.counters.bytes_up > 0
        assert secret[:16] not in bytes(proxy.capture)
        figures.add("attacks refused", "reading tokens off the wire (TLS)")
    finally:
        proxy.close()
    agent.stop()
    # Impostors on the agent's path: one in plain text, one with its own CA's certificate.
    other = init_ca(tmp_path / "impostor", ["127.0.0.1"])
    foreign = grpc.ssl_server_credentials(
        [(other.server_key.read_bytes(), other.server_cert.read_bytes())]
    )
    for n, credentials in enumerate((None, foreign)):
        impostor = GrpcMitm(fleet.cloud.address, serve_credentials=credentials)
        name = f"b{n}"
        try:
            proc = fleet.start_agent(name, via=impostor.address, env=FAST_AGENT)
            time.sleep(3)
            assert sum(impostor.calls.values()) == 0  # not one call answered, no token sent
            assert name not in {d.device_id for d in fleet.admin.devices()}
            assert served(proc) is None
            assert "cannot reach" in proc.log_tail(50) or "UNAVAILABLE" in proc.log_tail(50)
        finally:
            impostor.close()
        figures.add(
            "attacks refused",
            "impostor cloud with a foreign certificate" if credentials else "plain-text impostor",
        )


def test_another_device_cannot_read_a_model_it_was_not_given(
    plain_fleet: Fleet, mitm: GrpcMitm, tmp_path: Path
) -> None:
    """Least access, tried with a real device credential taken off the wire (plain text):
    a device reads only the manifests and chunks of its own desired state."""
    _on_v1(plain_fleet, mitm, tmp_path)
    # a1's credential, as an attacker on its path saw it (plain text).
    (a1_token,) = {
        v for k, v in mitm.metadata_seen.get("GetDesiredState", []) if k == "authorization"
    }
    plain_fleet.admin.push_model(
        "secret", big_model(tmp_path / "s.onnx", seed=5, bias=5, columns=500)
    )
    digest = plain_fleet.admin.version("secret", 1).artifacts[0].manifest_digest
    plain_fleet.start_agent("b1", {"site": "b"}, env=FAST_AGENT)
    plain_fleet.wait_for(lambda ds: len(ds) == 2, 60, "b1 enrolled")
    plain_fleet.admin.deploy("secret", 1, selector={"site": "b"})
    plain_fleet.wait_for(lambda ds: running(ds, "secret").get("b1") == 1, 60, "b1 on secret")
    with grpc.insecure_channel(plain_fleet.cloud.address) as channel:
        call: Any = channel.unary_unary("/edgefleet.fleet.v1.AgentService/GetManifest")
        with pytest.raises(grpc.RpcError) as info:
            call(
                fleet_pb2.GetManifestRequest(digest=digest).SerializeToString(),
                metadata=(("authorization", a1_token),),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    figures.add("attacks refused", "reading another device's model")
