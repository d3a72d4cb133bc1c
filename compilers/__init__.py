"""Compile trained models into deployable artifacts: ONNX export with parity checks (needs
torch and onnx; the agent never imports this package)."""
