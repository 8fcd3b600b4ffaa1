"""The running daemon's core: the object the API serves and the CLI starts and stops."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import redis

from orchestrator.errors import RedisUnavailable
from orchestrator.keys import Keys
from orchestrator.redis_client import connect, redact
from orchestrator.redis_server import EmbeddedRedis
from orchestrator.settings import Settings
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

    # Lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or connect to) Redis. Raises RedisUnavailable or ConfigError."""
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

    def stop(self) -> None:
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

    # Health ------------------------------------------------------------------------------
    def redis_alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def readiness(self) -> Readiness:
        """Ready only when Redis answers, a version is active, and every rank holds it."""
        if not self.redis_alive():
            return Readiness(False, f"redis at {redact(self.redis_url)} does not answer")
        try:
            active = self.redis.hget(self.keys.active, "version")
        except (redis.RedisError, OSError) as exc:
            raise RedisUnavailable(str(exc)) from None
        if not active:
            return Readiness(False, "no version has been committed yet")
        return Readiness(True, f"version {active} is active on every rank")
