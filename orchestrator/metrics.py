"""Prometheus metrics of one daemon, in a registry of its own (tests start several daemons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "refitd_update_stage_seconds",
            "Time an update spent in each pipeline stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.updates = Counter(
            "refitd_updates",
            "Updates by final outcome (committed, rejected, aborted, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "refitd_per_channel_fallbacks",
            "Tensors quantized per channel because they (or a TP shard) do not fit 128x128 blocks.",
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "refitd_rollbacks", "Rollbacks that committed.", registry=self.registry
        )
        self.active_version = Gauge(
            "refitd_active_version", "The committed, served version (0: none).",
            registry=self.registry,
        )  # fmt: skip
        self.live_ranks = Gauge(
            "refitd_live_ranks", "Rank agents whose heartbeat is fresh.", registry=self.registry
        )
        self.agent_restarts = Counter(
            "refitd_rank_agent_restarts",
            "Rank agents the daemon restarted after they died (ranks.launch: local).",
            ["rank"],
            registry=self.registry,
        )
        self.tp_size = Gauge("refitd_tp_size", "Configured TP ranks.", registry=self.registry)
        self.queued = Gauge(
            "refitd_updates_queued", "Updates waiting behind the running one.",
            registry=self.registry,
        )  # fmt: skip
