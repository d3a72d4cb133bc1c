"""Where the cloud keeps its state: metadata (models, devices, states) and blobs (bytes)."""
