"""The operator's SDK: typed clients for the cloud's admin API and for any Open Inference
Protocol server (an agent's, Triton's, KServe's).

    from edgefleet.client import AdminClient, InferenceClient
"""

from edgefleet.client.admin import AdminClient
from edgefleet.client.inference import InferenceClient

__all__ = ["AdminClient", "InferenceClient"]
