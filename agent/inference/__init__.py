"""The agent's Open Inference Protocol endpoints: one transport-free data plane (``dataplane``:
request checks, admission, batching, routing, statistics, shared memory) under the gRPC
servicer (``server``, Triton's whole gRPC surface) and the KServe v2 REST port (``rest``)."""

from agent.inference.dataplane import DataPlane
from agent.inference.rest import RestServer, start_rest_server
from agent.inference.server import InferenceServer, start_inference_server

__all__ = [
    "DataPlane",
    "InferenceServer",
    "RestServer",
    "start_inference_server",
    "start_rest_server",
]
