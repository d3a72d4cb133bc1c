"""How fast a deploy reaches a fleet: MQTT notices through a real Mosquitto versus the gRPC
watch, 200 simulated devices, both in one run.

    python benchmarks/bench_mqtt.py [--devices 200] [--rounds 5] [--json out.json]

A real cloud service runs in this process (TLS from its own CA, SQLite, `max_workers` raised
so that every device's watch stream gets its thread) with `[mqtt]` pointing at a Mosquitto
started here on a free port with the config `edgefleet mqtt acl` prints (TLS with the
cloud's certificate, the password and ACL files the cloud writes). `--devices` devices are
enrolled; each gets its own broker account. The simulated devices live in a child process
(so their receiving does not share this process's interpreter lock with the cloud): per
device, one paho client with its own account subscribed to its own notice topic, and one
gRPC channel with its own device token that opens a WatchDesiredState stream.

Each round is one deploy of a new version to every device; the figure is the time from just
before `Fleet.deploy` to the moment the last device holds a notice of the new generation
(MQTT: the signed desired state parsed; gRPC: the generation read off the stream). Rounds
alternate between the transports, and only the measured one is live: in an MQTT round no
watch stream is open; in a gRPC round the cloud's notifier is stopped. The ratio is the
median gRPC time over the median MQTT time.
"""

from __future__ import annotations

import argparse
import getpass
import multiprocessing as mp
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_json

ENROLL_SECRET = "bench-mqtt-enroll-secret"


@dataclass(frozen=True)
class Round:
    transport: str
    all_s: float  # from the deploy until the last device held the notice
    median_s: float  # ... until half of them did
    cloud_cpu_s: float  # CPU the cloud process used meanwhile
    broker_cpu_s: float  # CPU Mosquitto used meanwhile
    devices_cpu_s: float  # CPU the simulated devices used meanwhile

    def __str__(self) -> str:
        return (
            f"{self.transport:>4}: all in {self.all_s * 1e3:7.1f} ms (median device "
            f"{self.median_s * 1e3:6.1f} ms); CPU ms: cloud {self.cloud_cpu_s * 1e3:5.1f}, "
            f"broker {self.broker_cpu_s * 1e3:5.1f}, devices {self.devices_cpu_s * 1e3:5.1f}"
        )


def cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class Device:
    device_id: str
    token: str
    mqtt_password: str


# the simulated devices (child process) ----------------------------------------------------


class SimulatedFleet:
    """Per device a paho subscriber and a gRPC channel; records when each holds a generation."""

    def __init__(self, devices: list[Device], cloud: str, ca_file: Path, broker_url: str) -> None:
        self.devices = devices
        self.cloud = cloud
        self.ca_file = ca_file
        self.broker_url = broker_url
        self._lock = threading.Condition()
        self._target = 0
        self._transport = ""
        self._arrived: dict[str, float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._clients: list[Any] = []
        self._channels: list[Any] = []
        self._calls: list[Any] = []
        self._threads: list[threading.Thread] = []

    def _hold(self, transport: str, device_id: str, generation: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._held[(transport, device_id)] = generation
            if (
                transport == self._transport
                and generation >= self._target
                and device_id not in self._arrived
            ):
                self._arrived[device_id] = now
                self._lock.notify_all()
            else:
                self._lock.notify_all()

    def connect_mqtt(self) -> None:
        from edgefleet.core.mqtt import BrokerUrl, desired_topic
        from edgefleet.core.mqtt_client import make_client
        from protos.fleet.v1 import fleet_pb2

        broker = BrokerUrl.parse(self.broker_url)

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            if not message.payload:
                return
            signed = fleet_pb2.SignedDesiredState.FromString(message.payload)
            state = fleet_pb2.DesiredState.FromString(signed.state)
            self._hold("mqtt", userdata, int(state.generation))

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if not reason.is_failure:
                client.subscribe(desired_topic(userdata), qos=1)

        for device in self.devices:
            client = make_client(
                broker,
                device.device_id,
                device.device_id,
                device.mqtt_password,
                ca_file=self.ca_file,
            )
            client.user_data_set(device.device_id)
            client.on_message = on_message
            client.on_connect = on_connect
            client.connect_async(broker.host, broker.port, keepalive=60)
            client.loop_start()
            self._clients.append(client)
        # Ready once every device holds its retained notice.
        self._wait(lambda: all(("mqtt", d.device_id) in self._held for d in self.devices), 120)

    def connect_grpc(self) -> None:
        from edgefleet.core.tls import ClientSecurity

        security = ClientSecurity(ca_file=self.ca_file)
        self._channels = [security.channel(self.cloud) for _ in self.devices]

    def open_watches(self) -> None:
        """One WatchDesiredState stream per device; back once each sent its first notice."""
        from edgefleet.core.auth import bearer_metadata
        from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

        with self._lock:
            for d in self.devices:
                self._held.pop(("grpc", d.device_id), None)
        self._calls = []
        for device, channel in zip(self.devices, self._channels, strict=True):
            stub = fleet_pb2_grpc.AgentServiceStub(channel)
            call = stub.WatchDesiredState(
                fleet_pb2.WatchDesiredStateRequest(device_id=device.device_id),
                metadata=bearer_metadata(device.token),
            )
            self._calls.append(call)
            thread = threading.Thread(
                target=self._follow, args=(device.device_id, call), daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._wait(lambda: all(("grpc", d.device_id) in self._held for d in self.devices), 60)

    def _follow(self, device_id: str, call: Any) -> None:
        import grpc

        try:
            for notice in call:
                self._hold("grpc", device_id, int(notice.generation))
        except grpc.RpcError:
            pass

    def close_watches(self) -> None:
        for call in self._calls:
            call.cancel()
        for thread in self._threads:
            thread.join(5)
        self._calls, self._threads = [], []

    def arm(self, transport: str, target: int) -> None:
        with self._lock:
            self._transport, self._target, self._arrived = transport, target, {}

    def collect(self, timeout: float) -> list[float]:
        self._wait(lambda: len(self._arrived) == len(self.devices), timeout)
        with self._lock:
            return sorted(self._arrived.values())

    def _wait(self, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the simulated devices did not all get there in time")
                self._lock.wait(left)

    def close(self) -> None:
        self.close_watches()
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        for channel in self._channels:
            channel.close()


def devices_main(conn: Connection) -> None:
    """The child process: obey the parent's commands on `conn`."""
    fleet: SimulatedFleet | None = None
    cpu = 0.0
    while True:
        command, *args = conn.recv()
        try:
            if command == "setup":
                fleet = SimulatedFleet(*args)
                fleet.connect_grpc()
                fleet.connect_mqtt()
                conn.send(("ok", None))
            elif command == "arm":
                assert fleet is not None
                transport, target = args
                if transport == "grpc":
                    fleet.open_watches()
                fleet.arm(transport, target)
                cpu = time.process_time()
                conn.send(("ok", None))
            elif command == "collect":
                assert fleet is not None
                transport, timeout = args
                times = fleet.collect(timeout)
                used = time.process_time() - cpu
                if transport == "grpc":
                    fleet.close_watches()
                conn.send(("ok", (times, used)))
            elif command == "stop":
                if fleet is not None:
                    fleet.close()
                conn.send(("ok", None))
                return
        except Exception as err:  # report, don't hang the parent
            conn.send(("error", f"{type(err).__name__}: {err}"))


# the cloud and the broker (this process) -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model(path: Path, bias: float) -> Path:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.full((1, 4), bias, dtype=np.float32), name="b")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def start_broker(folder: Path, port: int, data: Path) -> subprocess.Popen[bytes]:
    from cloudsvc.mqtt.broker_files import mosquitto_conf

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mosquitto.conf"
    config.write_text(
        mosquitto_conf(
            port=port,
            host="127.0.0.1",
            password_file=data / "mqtt" / "passwd",
            acl_file=data / "mqtt" / "acl",
            cafile=data / "tls" / "ca.pem",
            certfile=data / "tls" / "server.pem",
            keyfile=data / "tls" / "server.key",
            user=getpass.getuser(),
        )
        + "max_queued_messages 10000\n"
    )
    log = (folder / "mosquitto.log").open("ab")
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    (folder / "mosquitto.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"mosquitto did not start; see {folder / 'mosquitto.log'}")


def ask(conn: Connection, *message: Any, timeout: float = 300) -> Any:
    conn.send(message)
    if not conn.poll(timeout):
        raise SystemExit(f"the simulated devices did not answer {message[0]!r}")
    status, value = conn.recv()
    if status != "ok":
        raise SystemExit(f"the simulated devices failed: {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="deploys per transport")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        raise SystemExit("needs the mosquitto broker (apt-get install mosquitto)")

    from cloudsvc.mqtt.notifier import MqttNotifier
    from cloudsvc.server import CloudServer
    from cloudsvc.settings import CloudSettings

    root = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    data = root / "cloud"
    port = free_port()
    broker_folder = root / "broker"
    settings = CloudSettings.model_validate(
        {
            "data_dir": data,
            "port": 0,
            # Every open watch stream holds a server thread: room for all of them.
            "max_workers": args.devices + 64,
            "enroll_tokens": [ENROLL_SECRET],
            "mqtt": {
                "url": f"mqtts://127.0.0.1:{port}",
                "broker_pid_file": broker_folder / "mosquitto.pid",
                "reconnect_max_s": 1,
            },
        }
    )
    cloud = CloudServer(settings)
    broker = start_broker(broker_folder, port, data)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=devices_main, args=(child,), daemon=True)
    try:
        cloud.start()
        assert cloud.mqtt is not None and cloud.tls is not None and cloud.tls.ca is not None
        fleet = cloud.fleet
        devices = []
        for n in range(args.devices):
            enrolled = fleet.enroll(ENROLL_SECRET, f"sim-{n:04d}")
            assert enrolled.mqtt is not None
            devices.append(
                Device(enrolled.device_id, enrolled.device_token, enrolled.mqtt.password)
            )
        versions = [
            cloud.registry.push("m", tiny_model(root / f"m{v}.onnx", float(v))).version
            for v in range(1, 2 * args.rounds + 2)
        ]
        # The broker has every account once the cloud wrote and signalled the files.
        deadline = time.monotonic() + 30
        while len(cloud.mqtt.credentials.hashes()) < args.devices or cloud.mqtt.notifier.passes < 2:
            if time.monotonic() > deadline:
                raise SystemExit("the cloud did not write the broker's accounts")
            time.sleep(0.1)
        fleet.deploy("m", versions[0])  # warm: every device has an assignment
        worker.start()
        started = time.monotonic()
        ask(parent, "setup", devices, cloud.address, cloud.tls.ca, cloud.settings.mqtt.url)
        print(f"{args.devices} simulated devices connected in {time.monotonic() - started:.1f}s")

        notifier: MqttNotifier = cloud.mqtt.notifier
        rounds: list[Round] = []
        version = iter(versions[1:])
        broker_cpu = psutil.Process(broker.pid)
        for number in range(1, args.rounds + 1):
            for transport in ("grpc", "mqtt"):
                if transport == "grpc":
                    notifier.stop()  # only the measured transport is live
                else:
                    notifier = MqttNotifier(
                        fleet,
                        cloud.mqtt.settings,
                        cloud.mqtt.accounts.files.cloud_password,
                        cloud.tls.ca,
                        accounts=cloud.mqtt.accounts,
                    ).start()
                    cloud.mqtt.notifier = notifier
                    if not notifier.wait_connected(30):
                        raise SystemExit("the cloud's notifier did not reconnect")
                    while notifier.passes < 1 or notifier.notices_published < args.devices:
                        time.sleep(0.02)  # its first full pass republished every notice
                generation = fleet.desired_state(devices[0].device_id).generation + 1
                ask(parent, "arm", transport, generation)
                time.sleep(0.2)  # let the armed side settle
                cloud_cpu, broker_before = time.process_time(), cpu_seconds(broker_cpu)
                t0 = time.monotonic()
                fleet.deploy("m", next(version))
                times, devices_cpu = ask(parent, "collect", transport, 120.0)
                result = Round(
                    transport,
                    all_s=times[-1] - t0,
                    median_s=statistics.median(times) - t0,
                    cloud_cpu_s=time.process_time() - cloud_cpu,
                    broker_cpu_s=cpu_seconds(broker_cpu) - broker_before,
                    devices_cpu_s=devices_cpu,
                )
                rounds.append(result)
                print(f"round {number} {result}")
        ask(parent, "stop")
    finally:
        worker.join(10) if worker.pid is not None else None
        if worker.is_alive():
            worker.kill()
        cloud.stop(grace=1.0)
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(root, ignore_errors=True)

    def median(transport: str, field: str) -> float:
        return float(
            statistics.median(getattr(r, field) for r in rounds if r.transport == transport)
        )

    print(
        f"\nfrom a deploy to all {args.devices} devices holding the notice "
        f"(medians of {args.rounds} rounds; CPU: milliseconds per deploy):"
    )
    print(
        f"{'transport':<34} {'all devices':>12} {'median device':>14} {'cloud CPU':>10} "
        f"{'broker CPU':>11} {'devices CPU':>12}"
    )
    for name, key in (
        ("gRPC WatchDesiredState (baseline)", "grpc"),
        ("MQTT via Mosquitto", "mqtt"),
    ):
        print(
            f"{name:<34} {median(key, 'all_s') * 1e3:>9.1f} ms "
            f"{median(key, 'median_s') * 1e3:>11.1f} ms {median(key, 'cloud_cpu_s') * 1e3:>10.1f} "
            f"{median(key, 'broker_cpu_s') * 1e3:>11.1f} {median(key, 'devices_cpu_s') * 1e3:>12.1f}"
        )
    ratio = median("grpc", "all_s") / median("mqtt", "all_s")
    cpu_ratio = median("grpc", "cloud_cpu_s") / median("mqtt", "cloud_cpu_s")
    print(f"\nratio gRPC / MQTT, time to all devices: {ratio:.2f}x")
    print(f"ratio gRPC / MQTT, the cloud's CPU per deploy: {cpu_ratio:.2f}x")
    write_json(
        args.json,
        {
            "devices": args.devices,
            "rounds": [asdict(r) for r in rounds],
            "ratio_grpc_over_mqtt": ratio,
            "cloud_cpu_ratio_grpc_over_mqtt": cpu_ratio,
        },
    )


if __name__ == "__main__":
    main()
