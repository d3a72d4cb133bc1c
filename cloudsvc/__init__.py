"""The edgefleet cloud service: model registry, fleet state and the gRPC APIs over them.

``cloudsvc.server.serve(settings)`` starts everything; ``edgefleet cloud serve`` is the CLI.
"""
