"""edgefleet: take ML models from the cloud to a fleet of edge devices and bring data back.

This package holds what every process shares (CLI entry point, error codes, tensor
conversions, retry policy). It never imports torch: the agent runs without it.
"""

__version__ = "0.1.0"
