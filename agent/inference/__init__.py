"""The agent's Open Inference Protocol endpoint: request checks and the gRPC servicer."""

from agent.inference.server import InferenceServer, start_inference_server

__all__ = ["InferenceServer", "start_inference_server"]
