"""The service: the daemon's process, the update pipeline, its queue and its sources."""
