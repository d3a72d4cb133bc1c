"""Streams cannot take every worker thread: every streaming method (inference streams,
health Watch, reflection) draws on one budget below the server's threads, so unary calls are
always served; and an inference stream that sends nothing is closed after its idle time."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.inference.dataplane import RequestLimits
from agent.inference.server import InferenceSecurity, start_inference_server, stream_budget
from agent.runtime import ModelRepository
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

TOKEN = "stream-budget-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.inputs.add(name="b", datatype="FP32", shape=[4])
    request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
    request.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    return request


def test_the_budget_leaves_a_thread_for_unary_calls() -> None:
    assert [stream_budget(n) for n in (1, 2, 3, 4, 8)] == [0, 1, 1, 2, 6]


def test_streams_beyond_the_budget_are_refused_and_unary_calls_served(
    repository: ModelRepository,
) -> None:
    server = start_inference_server(
        repository, "127.0.0.1", 0, max_workers=4, security=InferenceSecurity(token=TOKEN)
    )
    held: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def pending() -> Iterator[pb.ModelInferRequest]:
        while (item := held.get()) is not None:
            yield item

    address = f"127.0.0.1:{server.port}"
    try:
        with (
            grpc.insecure_channel(address, options=OWN_CONNECTION) as channel,
            grpc.insecure_channel(address, options=OWN_CONNECTION) as other,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            # A health Watch without a token works (a real probe) ...
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            # ... and an inference stream with one: the budget of 4 workers (2) is spent.
            stream = stub.ModelStreamInfer(pending(), metadata=AUTH, timeout=20)
            held.put(_request())
            assert not next(stream).error_message
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ModelStreamInfer(iter([_request()]), metadata=AUTH, timeout=10))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "streams are open already" in (info.value.details() or "")
            with pytest.raises(grpc.RpcError) as info:
                next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Unary calls are still served, on another connection too.
            unary = pb_grpc.GRPCInferenceServiceStub(other)
            started = time.monotonic()
            assert unary.ModelInfer(_request(), metadata=AUTH, timeout=5).outputs
            assert unary.ServerLive(pb.ServerLiveRequest(), metadata=AUTH, timeout=5).live
            assert time.monotonic() - started < 5
            # A stream closed gives its place back.
            held.put(None)
            assert list(stream) == []
            watch.cancel()
            deadline = time.monotonic() + 10
            while True:
                try:
                    answers = list(
                        stub.ModelStreamInfer(iter([_request()]), metadata=AUTH, timeout=10)
                    )
                    break
                except grpc.RpcError as err:  # the cancelled Watch may take a moment to end
                    if (
                        err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                        or time.monotonic() > deadline
                    ):
                        raise
                    time.sleep(0.05)
            assert len(answers) == 1 and not answers[0].error_message
    finally:
        held.put(None)
        server.stop(0)


def test_an_idle_inference_stream_is_closed(repository: ModelRepository) -> None:
    server = start_inference_server(
        repository, "127.0.0.1", 0, max_workers=3, limits=RequestLimits(stream_idle_s=0.5)
    )
    held: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def pending() -> Iterator[pb.ModelInferRequest]:
        while (item := held.get()) is not None:
            yield item

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stream = stub.ModelStreamInfer(pending(), timeout=20)
            held.put(_request())
            assert not next(stream).error_message  # a request in time is answered
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                next(stream)  # then nothing is sent
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no request on this stream for 0.5 s" in (info.value.details() or "")
            assert time.monotonic() - started < 5
            # Its place (the only one with 3 workers) is free again.
            answers = list(stub.ModelStreamInfer(iter([_request()]), timeout=10))
            assert len(answers) == 1 and not answers[0].error_message
    finally:
        held.put(None)
        server.stop(0)
