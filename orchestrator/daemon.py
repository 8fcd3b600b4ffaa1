"""The running daemon's core: the object the API serves and the CLI starts and stops."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from orchestrator.artifacts import ArtifactStore
from orchestrator.coordinator import Coordinator
from orchestrator.errors import RedisUnavailable
from orchestrator.keys import Keys
from orchestrator.lock import UpdateLock
from orchestrator.recovery import RecoveryReport, recover
from orchestrator.redis_client import connect, redact
from orchestrator.redis_server import EmbeddedRedis
from orchestrator.settings import Settings
from orchestrator.supervisor import Supervisor
from orchestrator.versions import VersionStore

log = logging.getLogger("refitd")


@dataclass
class Readiness:
    ready: bool
    reason: str


class Refitd:
    """Settings, Redis, and the stores and services built on them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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

    # Lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or connect to) Redis, recover what a crash left open, and (ranks.launch:
        local) start the rank agents. Raises RedisUnavailable or ConfigError."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded_redis:
            self.embedded = EmbeddedRedis(
                self.data_dir,
                conf=self.settings.redis.conf,
                binary=self.settings.redis.server_binary,
                start_timeout_s=self.settings.redis.start_timeout_s,
            )
            self.redis_url = self.embedded.start()
        self._redis = connect(self.redis_url, wait_s=self.settings.redis.start_timeout_s)
        self._versions = VersionStore(self._redis, self.keys)
        log.info("redis at %s (%s)", redact(self.redis_url),
                 "embedded" if self.embedded else "external")  # fmt: skip
        self._coordinator = Coordinator(
            self._redis, self.keys, self.settings, self._versions, self.artifacts
        )
        # Before anything is served or any rank starts: open transactions reach their decision.
        self.recovery = recover(self._coordinator, self._versions, self.update_lock())
        if self.settings.ranks.launch == "local":
            self.supervisor = Supervisor(self.settings, redis_url=self.redis_url)
            self.supervisor.start()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
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

    def update_lock(self, *, timeout_s: float | None = None) -> UpdateLock:
        """A new (unheld) update lock: `with core.update_lock() as lock: ... lock.fence`.

        With `timeout_s`, acquiring waits that long for a busy lock before raising LockHeld."""
        return UpdateLock(
            self.redis, self.keys, ttl_s=self.settings.rollout.lock_ttl_s, timeout_s=timeout_s
        )

    # Health ------------------------------------------------------------------------------
    def redis_alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def readiness(self) -> Readiness:
        """Ready only when Redis answers, a version is active, every rank heartbeats and holds
        it, and no transaction has stayed open past its deadlines."""
        if not self.redis_alive():
            return Readiness(False, f"redis at {redact(self.redis_url)} does not answer")
        try:
            state = self.coordinator.active()
            open_txns = self.coordinator.open_txns()
        except RedisUnavailable as exc:
            return Readiness(False, exc.message)
        active = state["active_version"]
        if active is None:
            return Readiness(False, "no version has been committed yet")
        now = time.time()
        for rank in state["ranks"]:
            r = rank["rank"]
            if not rank["alive"]:
                if rank["last_heartbeat"] is None:
                    return Readiness(False, f"rank {r} has never registered")
                age = now - rank["last_heartbeat"]
                return Readiness(False, f"rank {r} is not alive (last heartbeat {age:.1f}s ago)")
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
        return Readiness(True, f"version {active} is active on every rank")
