"""Real parts wired in one process, for attacks that need many cases: a real cloud
(CloudServer on loopback, plain text so that an on-path attacker can sit in front of it),
the on-path attacker (GrpcMitm), and devices that are the agent's own Reconciler over a real
gRPC link, SQLite state and ONNX Runtime sessions: only the process boundary is missing."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.artifacts import ArtifactStore
from agent.chunks import ChunkStore
from agent.cloud_link import GrpcCloudLink
from agent.reconciler import PassResult, Reconciler
from agent.runtime import ModelRepository
from agent.settings import AgentSettings
from agent.state import StateStore
from cloudsvc.server import CloudServer
from cloudsvc.settings import CloudSettings
from edgefleet.client import AdminClient
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.tls import ClientSecurity
from tests.faults.mitm import GrpcMitm

WIDTH = 64


def model_file(path: Path, bias: float, width: int = WIDTH) -> Path:
    """y = x + bias: a real ONNX graph whose weights differ with `bias`."""
    b = numpy_helper.from_array(np.full((1, width), bias, dtype=np.float32), name="bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "add_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@dataclass
class Device:
    """One device: the agent's reconciler, state and repository, reachable by the test."""

    name: str
    settings: AgentSettings
    state: StateStore
    repository: ModelRepository
    reconciler: Reconciler
    link: GrpcCloudLink
    events: list[str] = field(default_factory=list)

    def enroll(self) -> Device:
        self.reconciler.ensure_trust()
        self.reconciler.ensure_identity()
        return self

    def converge(self) -> PassResult | EdgefleetError:
        """One reconcile pass: its result, or the error that refused the desired state."""
        try:
            return self.reconciler.reconcile_once()
        except EdgefleetError as err:
            return err

    def serving(self, model: str = "m") -> int | None:
        return self.repository.default_version(model) if model in self.repository.names() else None

    def infer(self, model: str = "m") -> float:
        """y[0] for x = 0: the bias of the version that answers, what a client would see."""
        loaded = self.repository.get(model, "")
        x = np.zeros((1, WIDTH), dtype=np.float32)
        (y,) = loaded.run({"x": x}, ("y",))
        return float(np.asarray(y).reshape(-1)[0])

    def close(self) -> None:
        self.link.close()
        self.state.close()


class Stage:
    """A cloud with an attacker in front of it and devices behind the attacker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cloud = CloudServer(
            CloudSettings.model_validate(
                {
                    "data_dir": root / "cloud",
                    "port": 0,
                    "insecure": True,
                    "chunk_size": 1024,
                    "desired_state_ttl_s": 3600,
                }
            )
        ).start()
        self.admin = AdminClient(
            self.cloud.address, token_file=root / "cloud" / "admin-token", insecure=True
        )
        self.mitm = GrpcMitm(self.cloud.address)
        self.devices: list[Device] = []
        self._names = itertools.count(1)
        self._versions: dict[str, int] = {}

    @property
    def root_key(self) -> str:
        return self.cloud.keys.current.fingerprint

    def push(self, bias: float, model: str = "m") -> int:
        """Push a version of `model` whose output is x + bias; its version number."""
        n = self._versions.get(model, 0) + 1
        path = model_file(self.root / f"{model}-{n}-{bias}.onnx", bias)
        self._versions[model] = n
        return self.admin.push_model(model, path).version

    def device(self, *, via_mitm: bool = True, enroll: bool = True, **labels: str) -> Device:
        """A new device (enrolled unless `enroll` is false), behind the attacker or not."""
        name = f"d{next(self._names)}"
        secret, _ = self.admin.create_enroll_token(labels=labels or {"site": "a"}, max_uses=1)
        settings = AgentSettings(
            cloud=self.mitm.address if via_mitm else self.cloud.address,
            insecure=True,
            root_key=self.root_key,
            enroll_token=secret,
            device_id=name,
            data_dir=self.root / name,
            providers=["CPUExecutionProvider"],
            intra_op_threads=1,
            min_free_disk_bytes=0,
            rpc_timeout_s=5,
            chunk_timeout_s=10,
        )
        state = StateStore(settings.db_path)
        chunks = ChunkStore(settings.data_dir / "chunks")
        repository = ModelRepository()
        link = GrpcCloudLink(
            settings.cloud,
            ClientSecurity(insecure=True),
            rpc_timeout_s=settings.rpc_timeout_s,
            chunk_timeout_s=settings.chunk_timeout_s,
        )
        device = Device(name, settings, state, repository, None, link)  # type: ignore[arg-type]
        device.reconciler = Reconciler(
            settings,
            state,
            chunks,
            ArtifactStore(settings.data_dir, chunks),
            link,
            repository,
            on_event=device.events.append,
        )
        self.devices.append(device)
        return device.enroll() if enroll else device

    def close(self) -> None:
        for device in self.devices:
            device.close()
        self.mitm.close()
        self.admin.close()
        self.cloud.stop(grace=0.5)


def stage(root: Path) -> Iterator[Stage]:
    s = Stage(root)
    try:
        yield s
    finally:
        s.close()
