"""The running daemon's core: the object the API serves and the CLI starts and stops."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from orchestrator.data.ipc import SHM_DIR, remove_stale_shared_buffers
from orchestrator.errors import ConfigError, RedisUnavailable, RefitError
from orchestrator.metrics import Metrics
from orchestrator.rollout.coordinator import Coordinator
from orchestrator.rollout.lock import UpdateLock
from orchestrator.rollout.supervisor import Supervisor
from orchestrator.service.model_spec import ModelSpec
from orchestrator.service.pipeline import UpdatePipeline
from orchestrator.service.recovery import RecoveryReport, recover
from orchestrator.service.updates import UpdateQueue
from orchestrator.settings import Settings
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.daemon_claim import DaemonClaim
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect, redact
from orchestrator.state.redis_server import EmbeddedRedis
from orchestrator.state.versions import VersionStore
from orchestrator.text import some

log = logging.getLogger("refitd")


@dataclass
class Readiness:
    ready: bool
    reason: str


class Refitd:
    """Settings, Redis, and the stores and services built on them."""

    def __init__(self, settings: Settings, *, claim: bool = True) -> None:
        self.settings = settings
        # claim=False: a stand-in that tests run beside a claiming daemon (tests/orchestrator).
        self._claims = claim
        self.claim: DaemonClaim | None = None
        self.data_dir: Path = settings.resolved_data_dir()
        self.keys = Keys(settings.redis.key_prefix)
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = settings.redis.url
        self._redis: redis.Redis | None = None
        self._versions: VersionStore | None = None
        self.artifacts = ArtifactStore(self.data_dir)
        self._coordinator: Coordinator | None = None
        self.supervisor: Supervisor | None = None
        self.recovery: RecoveryReport | None = None
        self.metrics = Metrics()
        self.metrics.tp_size.set(settings.ranks.tp_size)
        self.model: ModelSpec | None = None
        self._pipeline: UpdatePipeline | None = None
        # Set when the daemon cannot go on (its embedded Redis keeps dying): /healthz says so,
        # and `on_fatal` (set by `refitd serve`) makes the server exit non-zero.
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] | None = None

    # Lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or connect to) Redis, recover what a crash left open, and (ranks.launch:
        local) start the rank agents. Raises RedisUnavailable or ConfigError."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.model.config is not None:
            try:
                self.model = ModelSpec.load(self.settings.model.config)
            except RefitError as exc:
                raise ConfigError(exc.message) from None
            self._check_model(self.model)
            kind = self.model.config.get("model_type", "?")
            log.info("model %s (%s): %d tensors per update", self.model.path, kind,
                     len(self.model.expected))  # fmt: skip
        else:
            log.warning("model.config is not set: updates are refused until it is")
        if self.settings.embedded_redis:
            self.embedded = EmbeddedRedis(
                self.data_dir,
                conf=self.settings.redis.conf,
                binary=self.settings.redis.server_binary,
                start_timeout_s=self.settings.redis.start_timeout_s,
            )
            self.redis_url = self.embedded.start()
            self.embedded.watch(
                max_restarts=self.settings.redis.max_restarts,
                window_s=self.settings.redis.restart_window_s,
                on_give_up=self._give_up,
            )
        self._redis = connect(self.redis_url, wait_s=self.settings.redis.start_timeout_s)
        log.info("redis at %s (%s)", redact(self.redis_url),
                 "embedded" if self.embedded else "external")  # fmt: skip
        # Before recovery takes the update lock by force: a second daemon must not steal it.
        if self._claims:
            claim = DaemonClaim(self._redis, self.keys)
            claim.take()
            self.claim = claim
        self._versions = VersionStore(self._redis, self.keys)
        self._coordinator = Coordinator(
            self._redis, self.keys, self.settings, self._versions, self.artifacts
        )
        queue = UpdateQueue(
            self._redis, self.keys, self._versions, queue_depth=self.settings.limits.queue_depth
        )
        self._pipeline = UpdatePipeline(
            settings=self.settings,
            queue=queue,
            versions=self._versions,
            artifacts=self.artifacts,
            coordinator=self._coordinator,
            lock_factory=self.update_lock,
            metrics=self.metrics,
            model=self.model,
        )
        # Before anything is served or any rank starts (service/recovery.py has every rule).
        self.recovery = recover(
            self._coordinator, self._versions, self.artifacts, queue, self.update_lock()
        )
        stale = remove_stale_shared_buffers()
        if stale:
            log.info("removed %d shared-memory buffers that dead processes left in %s: %s",
                     len(stale), SHM_DIR, some([p.name for p in stale]))  # fmt: skip
        if self.settings.ranks.launch == "local":
            self.supervisor = Supervisor(
                self.settings,
                redis_url=self.redis_url,
                on_restart=lambda rank: self.metrics.agent_restarts.labels(rank=str(rank)).inc(),
            )
            self.supervisor.start()
        self._pipeline.start()

    def _give_up(self, reason: str) -> None:
        self.fatal = reason
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _check_model(self, model: ModelSpec) -> None:
        """Refuse at start what would make every update fail: a TP size the model cannot be
        split by, or a probe batch the model cannot take."""
        from orchestrator.model.planner import plan_model
        from orchestrator.model.probe import probe_batch

        shapes = {name: shape for name, (shape, _) in model.expected.items()}
        probe = self.settings.verification.probe
        try:
            plan_model(
                shapes,
                self.settings.ranks.tp_size,
                config=model.config,
                ignore=self.settings.quantization.ignore,
            )
            probe_batch(
                int(model.config["vocab_size"]),
                seed=probe.seed,
                count=probe.count,
                length=probe.length,
                token_ids=probe.token_ids,
            )
        except (RefitError, ValueError, KeyError) as exc:
            message = exc.message if isinstance(exc, RefitError) else str(exc)
            raise ConfigError(f"model.config {model.path} with these settings: {message}") from None

    def stop(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self.embedded is not None:
            self.embedded.stop()

    # Accessors ---------------------------------------------------------------------------
    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            raise AssertionError("Refitd.start() has not run")
        return self._redis

    @property
    def versions(self) -> VersionStore:
        if self._versions is None:
            raise AssertionError("Refitd.start() has not run")
        return self._versions

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            raise AssertionError("Refitd.start() has not run")
        return self._coordinator

    @property
    def pipeline(self) -> UpdatePipeline:
        if self._pipeline is None:
            raise AssertionError("Refitd.start() has not run")
        return self._pipeline

    def rollback(self, to_version: int | None) -> dict[str, Any]:
        """Roll every rank back under the update lock (waiting for a running update's turn up to
        limits.request_timeout_s). Returns the coordinator's result plus the versions involved."""
        # The pipeline takes no new update while a rollback waits, so the rollback waits for the
        # running update at most, never for the whole queue.
        with (
            self.pipeline.hold(),
            self.update_lock(timeout_s=self.settings.limits.request_timeout_s) as lock,
        ):
            assert lock.fence is not None
            # Nothing to prune: a rollback writes no artifact (the next commit prunes).
            result = self.coordinator.rollback(to_version, fence=lock.fence, prune=False)
        self.pipeline.forget_drift_baseline()
        self.metrics.rollbacks.inc()
        self.metrics.active_version.set(result["version"])
        log.info("rolled back from version %s to %s", result["from_version"], result["version"])
        return {**result, "active_version": result["version"],
                "previous_version": result["from_version"]}  # fmt: skip

    def refresh_metrics(self) -> None:
        """Gauges read at scrape time."""
        state = self.coordinator.ledger.active()
        self.metrics.active_version.set(state["active_version"] or 0)
        self.metrics.live_ranks.set(sum(1 for r in state["ranks"] if r["alive"]))
        self.metrics.queued.set(self.pipeline.queue.waiting())

    def update_lock(self, *, timeout_s: float | None = None) -> UpdateLock:
        """A new (unheld) update lock: `with core.update_lock() as lock: ... lock.fence`.

        With `timeout_s`, acquiring waits that long for a busy lock before raising LockHeld."""
        return UpdateLock(
            self.redis, self.keys, ttl_s=self.settings.rollout.lock_ttl_s, timeout_s=timeout_s
        )

    # Health ------------------------------------------------------------------------------
    def liveness(self) -> Readiness:
        """Whether this daemon can work at all: it has not given up, and Redis answers. (Ranks
        and stuck updates are readiness's business: a daemon can still roll back past them.)"""
        if self.fatal is not None:
            return Readiness(False, self.fatal)
        if not self.redis_alive():
            return Readiness(False, f"redis at {redact(self.redis_url)} does not answer")
        return Readiness(True, "ok")

    def redis_alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def readiness(self) -> Readiness:
        """Ready only when Redis answers, a version is active, every rank heartbeats and holds
        it, no transaction has stayed open past its deadlines, and no update has run longer
        than limits.request_timeout_s."""
        if not self.redis_alive():
            return Readiness(False, f"redis at {redact(self.redis_url)} does not answer")
        try:
            state = self.coordinator.ledger.active()
            open_txns = self.coordinator.ledger.open_txns()
        except RedisUnavailable as exc:
            return Readiness(False, exc.message)
        active = state["active_version"]
        if active is None:
            return Readiness(False, "no version has been committed yet")
        now = time.time()
        for rank in state["ranks"]:
            r = rank["rank"]
            if not rank["alive"]:
                if rank["state"] == "UNREGISTERED":
                    return Readiness(False, f"rank {r} has never registered")
                timeout = self.settings.ranks.heartbeat_timeout_s
                return Readiness(False, f"rank {r} is not alive (no heartbeat for {timeout:g}s; "
                                 f"last state {rank['state']})")  # fmt: skip
            if rank["version"] != active:
                held = "nothing" if rank["version"] is None else f"version {rank['version']}"
                return Readiness(False, f"rank {r} holds {held}, not the active version "
                                 f"{active} (state {rank['state']})")  # fmt: skip
        rollout = self.settings.rollout
        stuck_after = rollout.prepare_deadline_s + rollout.commit_deadline_s
        for txn in open_txns:
            age = now - txn.created_at
            if age > stuck_after:
                return Readiness(False, f"transaction {txn.id} (version {txn.version}) has been "
                                 f"{txn.state.value} for {age:.0f}s")  # fmt: skip
        # An update running past the longest a trainer's ?wait may take is stuck, though its
        # transaction (if any) is not: loading or verifying has hung.
        limit = self.settings.limits.request_timeout_s
        stuck = self.pipeline.queue.stuck(limit, now=now)
        if stuck is not None and stuck.started_at is not None:
            return Readiness(False, f"update {stuck.update_id} (version {stuck.version}) has been "
                             f"{stuck.stage.value} for {now - stuck.started_at:.0f}s, over "
                             f"limits.request_timeout_s={limit:g}")  # fmt: skip
        return Readiness(True, f"version {active} is active on every rank")
