"""The shared kernel: what every edgefleet process imports (cloud, agent, job worker, client).

Domain types with their one conversion to and from the wire, errors and their status table,
tensors, manifests, settings base, retry and logging. Torch-free, and light enough for the
agent.
"""
