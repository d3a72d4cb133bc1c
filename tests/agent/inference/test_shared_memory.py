"""Triton's system shared-memory extension against a live agent, with tritonclient's own
shared-memory helpers: register, infer with inputs and outputs in regions, unregister; and the
attacks it must refuse (a region or a request beyond the object, an unknown region, a key that
walks out of /dev/shm, a link, another connection's region, a shrunk object, too many
regions), and its regions closed when the client's connection goes away."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.errors import AlreadyExists, Forbidden, InvalidRequest, RegionNotFound, RequestTooLarge
from agent.inference.server import InferenceServer
from agent.inference.shm import (
    GONE,
    SHM_ROOT,
    Connection,
    SharedMemoryRegions,
    is_loopback,
    parse_peer,
    socket_table,
)
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (dev extra)")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm here")

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
X = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.array([1, 2, 3, 4], dtype=np.float32)


@pytest.fixture
def triton(server: InferenceServer) -> Iterator[Any]:
    client = tg.InferenceServerClient(f"127.0.0.1:{server.port}")
    client.unregister_system_shared_memory()
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def region() -> Iterator[Any]:
    """A 64-byte shared-memory object holding X, made with tritonclient's helper."""
    made: list[Any] = []

    def make(size: int = 64, contents: np.ndarray[Any, Any] | None = X) -> tuple[Any, str]:
        key = f"/edgefleet-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, size)
        if contents is not None:
            shm.set_shared_memory_region(handle, [contents])
        made.append(handle)
        return handle, key

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _inputs_from(name: str, size: int = 32, offset: int = 0) -> list[Any]:
    x = tg.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory(name, size, offset)
    b = tg.InferInput("b", [4], "FP32")
    b.set_data_from_numpy(B)
    return [x, b]


def test_register_infer_unregister(triton: Any, region: Any, server: InferenceServer) -> None:
    _, key_in = region()
    out, key_out = region(96, None)
    triton.register_system_shared_memory("in", key_in, 64)
    triton.register_system_shared_memory("out", key_out, 64, offset=32)
    status = triton.get_system_shared_memory_status()
    assert {r.name: (r.key, r.offset, r.byte_size) for r in status.regions.values()} == {
        "in": (key_in, 0, 64),
        "out": (key_out, 32, 64),
    }
    y = tg.InferRequestedOutput("y")
    y.set_shared_memory("out", 32, offset=16)
    result = triton.infer(
        "affine", _inputs_from("in"), outputs=[y, tg.InferRequestedOutput("total")]
    )
    np.testing.assert_allclose(result.as_numpy("total"), (X * 3 + B).sum(1))
    placed = result.get_output("y")
    assert placed.parameters["shared_memory_region"].string_param == "out"
    assert placed.parameters["shared_memory_byte_size"].int64_param == 32
    got = shm.get_contents_as_numpy(out, np.float32, [2, 4], offset=32 + 16)
    np.testing.assert_allclose(got, X * 3 + B)
    triton.unregister_system_shared_memory("in")
    assert set(triton.get_system_shared_memory_status().regions) == {"out"}
    with pytest.raises(InferenceServerException, match="no shared-memory region named 'in'"):
        triton.infer("affine", _inputs_from("in"))
    triton.unregister_system_shared_memory()
    assert server.plane.shared_memory is not None
    assert server.plane.shared_memory.open_regions() == 0


def test_offsets_within_a_region(triton: Any, region: Any) -> None:
    handle, key = region(128, None)
    shm.set_shared_memory_region(handle, [X + 100], offset=64)
    triton.register_system_shared_memory("frames", key, 128)
    result = triton.infer("affine", _inputs_from("frames", 32, offset=64))
    np.testing.assert_allclose(result.as_numpy("y"), (X + 100) * 3 + B)


@pytest.mark.parametrize(
    ("key_of", "offset", "size", "status", "fragment"),
    [
        (lambda key: key, 0, 65, "INVALID_ARGUMENT", "beyond the end"),
        (lambda key: key, 60, 8, "INVALID_ARGUMENT", "beyond the end"),
        (lambda key: "/../etc/passwd", 0, 8, "INVALID_ARGUMENT", "not a shared-memory name"),
        (lambda key: "/a/b", 0, 8, "INVALID_ARGUMENT", "not a shared-memory name"),
        (lambda key: "/..", 0, 8, "INVALID_ARGUMENT", "not a shared-memory name"),
        (lambda key: "/" + "x" * 300, 0, 8, "INVALID_ARGUMENT", "not a shared-memory name"),
        (lambda key: "/edgefleet-no-such-object", 0, 8, "NOT_FOUND", "create it first"),
        (lambda key: key, 0, 0, "INVALID_ARGUMENT", "at least 1"),
    ],
)
def test_registration_attacks_are_refused(
    triton: Any, region: Any, key_of: Any, offset: int, size: int, status: str, fragment: str
) -> None:
    _, key = region()
    with pytest.raises(InferenceServerException) as info:
        triton.register_system_shared_memory("r", key_of(key), size, offset=offset)
    assert info.value.status() == f"StatusCode.{status}"
    assert fragment in info.value.message()
    assert len(triton.get_system_shared_memory_status().regions) == 0


def test_a_link_in_dev_shm_is_refused(triton: Any) -> None:
    link = SHM_ROOT / f"edgefleet-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to("/etc/hostname")
    try:
        with pytest.raises(InferenceServerException, match="symbolic link") as info:
            triton.register_system_shared_memory("r", f"/{link.name}", 4)
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
    finally:
        link.unlink()


@pytest.mark.parametrize(
    ("offset", "size", "fragment"),
    [
        (40, 32, "is beyond region 'r'"),  # within the object's bytes, beyond the region's
        (0, 36, "needs 32 bytes"),  # not the tensor's size
        (0, 16, "needs 32 bytes"),
    ],
)
def test_requests_beyond_their_region_are_refused(
    triton: Any, region: Any, offset: int, size: int, fragment: str
) -> None:
    _, key = region(128)
    triton.register_system_shared_memory("r", key, 64)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("affine", _inputs_from("r", size, offset))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert fragment in info.value.message()


def test_an_output_region_too_small_is_refused(triton: Any, region: Any) -> None:
    _, key_in = region()
    _, key_out = region(16, None)
    triton.register_system_shared_memory("in", key_in, 64)
    triton.register_system_shared_memory("out", key_out, 16)
    y = tg.InferRequestedOutput("y")
    y.set_shared_memory("out", 16)
    with pytest.raises(InferenceServerException, match="give it at least that many bytes"):
        triton.infer("affine", _inputs_from("in"), outputs=[y])


def test_regions_belong_to_their_connection(
    triton: Any, region: Any, server: InferenceServer
) -> None:
    _, key = region()
    triton.register_system_shared_memory("mine", key, 64)
    # Clients of one process share gRPC's connection unless told not to (and then share
    # regions: one process); this one opens its own, as another process would.
    other = tg.InferenceServerClient(f"127.0.0.1:{server.port}", channel_args=OWN_CONNECTION)
    try:
        assert len(other.get_system_shared_memory_status().regions) == 0
        with pytest.raises(InferenceServerException, match="no shared-memory region named 'mine'"):
            other.infer("affine", _inputs_from("mine"))
        other.unregister_system_shared_memory("mine")  # not theirs to close
    finally:
        other.close()
    assert triton.infer("affine", _inputs_from("mine")).as_numpy("y") is not None


def test_a_shrunk_object_is_an_error_not_a_crash(triton: Any, region: Any) -> None:
    _, key = region()
    triton.register_system_shared_memory("r", key, 64)
    os.truncate(SHM_ROOT / key[1:], 8)
    with pytest.raises(InferenceServerException, match="shrank"):
        triton.infer("affine", _inputs_from("r"))
    assert triton.is_server_live()


def test_an_unknown_region_over_our_stub_and_rest_is_refused(server: InferenceServer) -> None:
    request = pb.ModelInferRequest(model_name="affine", raw_input_contents=[B.tobytes()])
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    x.parameters["shared_memory_region"].string_param = "ghost"
    x.parameters["shared_memory_byte_size"].int64_param = 32
    request.inputs.add(name="b", datatype="FP32", shape=[4])
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no shared-memory region named 'ghost'" in (info.value.details() or "")
    with pytest.raises(InvalidRequest, match="only the gRPC port"):
        server.plane.infer(request)  # no client: a transport without shared memory


def test_regions_close_when_the_connection_goes_away(region: Any, server: InferenceServer) -> None:
    regions = server.plane.shared_memory
    assert regions is not None
    _, key = region()
    client = tg.InferenceServerClient(f"127.0.0.1:{server.port}", channel_args=OWN_CONNECTION)
    client.register_system_shared_memory("gone", key, 64)
    assert regions.open_regions() == 1
    client.close()
    deadline = time.monotonic() + 15
    while regions.open_regions() and time.monotonic() < deadline:
        regions.sweep()
        time.sleep(0.1)
    assert regions.open_regions() == 0


# -- the registry on its own -----------------------------------------------------------------


def _client(port: int = 40000) -> str:
    return f"ipv4:127.0.0.1:{port}"


def test_registry_caps_and_confinement(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"\0" * 4096)
    regions = SharedMemoryRegions(root=tmp_path, max_regions=2, max_bytes=3000, max_total=3)
    try:
        owner = (tmp_path / "obj").stat().st_uid
        # The client's socket, as the kernel's socket table says: one per port here.
        regions._connection = lambda client: Connection(  # type: ignore[method-assign]
            int(client.rsplit(":", 1)[1]), owner + 1
        )
        with pytest.raises(Forbidden, match="belongs to another user"):
            regions.register(_client(), "a", "/obj", 0, 1000)
        regions._connection = lambda client: Connection(  # type: ignore[method-assign]
            int(client.rsplit(":", 1)[1]), owner
        )
        regions.register(_client(), "a", "/obj", 0, 1000)
        with pytest.raises(AlreadyExists):
            regions.register(_client(), "a", "/obj", 0, 1000)
        with pytest.raises(RequestTooLarge, match="would hold"):
            regions.register(_client(), "b", "/obj", 0, 2500)
        regions.register(_client(), "b", "/obj", 1000, 1000)
        with pytest.raises(RequestTooLarge, match="the most allowed"):
            regions.register(_client(), "c", "/obj", 0, 10)
        regions.register(_client(40001), "c", "/obj", 0, 10)
        with pytest.raises(RequestTooLarge, match="the server has 3"):
            regions.register(_client(40002), "d", "/obj", 0, 10)
        with pytest.raises(Forbidden, match="clients on this device"):
            regions.register("ipv4:10.1.2.3:5555", "e", "/obj", 0, 10)
        with pytest.raises(RegionNotFound):
            regions.status(_client(), "zzz")
        use = regions.use(_client())
        assert bytes(use.read("b", 0, 4)) == b"\0" * 4
        regions.unregister(_client(), "b")  # in use: closed when the request is done
        use.write("b", 0, b"ok")
        use.close()
        assert (tmp_path / "obj").read_bytes()[1000:1002] == b"ok"
        with pytest.raises(InvalidRequest, match="no shared-memory region"):
            regions.use(_client()).read("b", 0, 1)
    finally:
        regions.close()
    assert regions.open_regions() == 0


def test_peers_and_the_socket_table() -> None:
    assert parse_peer("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_peer("ipv6:[::1]:5000") == ("::1", 5000)
    assert parse_peer("ipv6:%5B::1%5D:5000") == ("::1", 5000)  # as gRPC writes it
    assert parse_peer("ipv6:%5B::ffff:127.0.0.1%5D:5000") == ("127.0.0.1", 5000)
    assert parse_peer("ipv6:[::ffff:127.0.0.1]:5000") == ("127.0.0.1", 5000)
    assert parse_peer("unix:/tmp/x") is None
    assert is_loopback("ipv4:127.0.0.2:1") and is_loopback("ipv6:[::1]:1")
    assert not is_loopback("ipv4:192.168.1.2:1")
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as sock:
            table = socket_table()
            if table is None:
                pytest.skip(reason="no /proc/net/tcp here: regions cannot be bound to a socket")
            state, uid = table[sock.getsockname()[:2]]
            assert (state, uid) == ("01", os.geteuid())
    if not socket.has_ipv6:
        return
    try:
        listener6 = socket.socket(socket.AF_INET6)
        listener6.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback here
    with listener6:
        listener6.listen()
        with socket.create_connection(listener6.getsockname()[:2]) as sock6:
            table = socket_table()
            assert table is not None
            assert table[("::1", sock6.getsockname()[1])] == ("01", os.geteuid())


def test_a_registry_region_is_its_sockets_not_its_ports(tmp_path: Path) -> None:
    """Another socket at the same address and port (a new connection from the port the
    registering one left) neither sees, uses nor unregisters its regions: they are closed."""
    (tmp_path / "obj").write_bytes(b"\0" * 64)
    regions = SharedMemoryRegions(root=tmp_path)
    owner = (tmp_path / "obj").stat().st_uid
    now = [Connection(7, owner)]
    regions._connection = lambda client: now[0]  # type: ignore[method-assign]
    try:
        regions.register(_client(), "cam", "/obj", 0, 64)
        assert [r.name for r in regions.status(_client())] == ["cam"]
        now[0] = Connection(8, owner + 1)  # the port is another user's socket now
        with pytest.raises(InvalidRequest, match="no shared-memory region"):
            regions.use(_client()).read("cam", 0, 4)
        assert regions.status(_client()) == []
        assert regions.open_regions() == 0
        now[0] = Connection(9, owner)
        regions.register(_client(), "cam", "/obj", 0, 64)
        now[0] = GONE  # the connection is gone: registering from nowhere is refused
        assert regions.status(_client()) == []
        with pytest.raises(Forbidden, match="socket table"):
            regions.register(_client(), "again", "/obj", 0, 64)
    finally:
        regions.close()


def test_concurrent_registrations_keep_the_cap(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"\0" * 64)
    regions = SharedMemoryRegions(root=tmp_path, max_regions=4, max_total=100)
    owner = (tmp_path / "obj").stat().st_uid
    regions._connection = lambda client: Connection(1, owner)  # type: ignore[method-assign]
    opening = regions._open
    together = threading.Barrier(12, timeout=10)

    def slow_open(*args: Any) -> tuple[int, bool]:
        opened = opening(*args)
        together.wait()  # every registration has passed the first check
        return opened

    regions._open = slow_open  # type: ignore[method-assign,assignment]
    refused: list[Exception] = []

    def register(i: int) -> None:
        try:
            regions.register(_client(), f"r{i}", "/obj", 0, 1)
        except RequestTooLarge as err:
            refused.append(err)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert regions.open_regions() == 4
        assert len(refused) == 8
    finally:
        regions.close()
    # The refused registrations closed the objects they had opened.
    assert not [f for f in os.listdir("/proc/self/fd") if _is(f, tmp_path / "obj")]


def _is(fd: str, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:
        return False


class _Relay:
    """A TCP relay to the server whose upstream connection leaves from a chosen source port
    (as another local user can bind the port a client just left)."""

    def __init__(self, server_port: int, source_port: int = 0) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.up = socket.socket()
        self.up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.up.bind(("127.0.0.1", source_port))
        self.up.connect(("127.0.0.1", server_port))
        self.source_port = self.up.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        down, _ = self.listener.accept()
        back = threading.Thread(target=self._pipe, args=(self.up, down), daemon=True)
        back.start()
        self._pipe(down, self.up)
        back.join(10)
        down.close()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        """Drop the upstream connection (once its client closed) at once: a reset, so no
        TIME_WAIT holds the port."""
        self.thread.join(10)
        self.up.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.up.close()
        self.listener.close()


def test_a_new_connection_from_the_same_port_does_not_inherit_regions(
    region: Any, server: InferenceServer
) -> None:
    if socket_table() is None:
        pytest.skip(reason="no /proc/net/tcp here: regions cannot be bound to a socket")
    regions = server.plane.shared_memory
    assert regions is not None
    _, key = region()
    victim = _Relay(server.port)
    client = tg.InferenceServerClient(f"127.0.0.1:{victim.port}", channel_args=OWN_CONNECTION)
    client.register_system_shared_memory("cam", key, 64)
    assert regions.open_regions() == 1
    client.close()
    victim.reset()
    # The attacker connects from the victim's source port before any sweep ran.
    attacker = _Relay(server.port, victim.source_port)
    assert attacker.source_port == victim.source_port
    other = tg.InferenceServerClient(f"127.0.0.1:{attacker.port}", channel_args=OWN_CONNECTION)
    try:
        assert len(other.get_system_shared_memory_status().regions) == 0
        with pytest.raises(InferenceServerException, match="no shared-memory region named 'cam'"):
            other.infer("affine", _inputs_from("cam"))
        assert regions.open_regions() == 0
    finally:
        other.close()
        attacker.reset()


def test_the_sweep_closes_regions_whose_port_another_socket_took(
    region: Any, server: InferenceServer
) -> None:
    if socket_table() is None:
        pytest.skip(reason="no /proc/net/tcp here: regions cannot be bound to a socket")
    regions = server.plane.shared_memory
    assert regions is not None
    _, key = region()
    victim = _Relay(server.port)
    client = tg.InferenceServerClient(f"127.0.0.1:{victim.port}", channel_args=OWN_CONNECTION)
    client.register_system_shared_memory("cam", key, 64)
    client.close()
    victim.reset()
    attacker = _Relay(server.port, victim.source_port)
    other = tg.InferenceServerClient(f"127.0.0.1:{attacker.port}", channel_args=OWN_CONNECTION)
    try:
        assert other.is_server_live()  # its connection is established
        assert regions.sweep() == 1
        assert regions.open_regions() == 0
    finally:
        other.close()
        attacker.reset()
