"""The edgefleet agent: the daemon on each device. Never imports torch."""
