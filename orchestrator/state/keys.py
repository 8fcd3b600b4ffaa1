"""Every Redis key refitd uses, built here and nowhere else, from one prefix.

Keys of one deployment share the prefix (`redis.key_prefix`), so several deployments can share a
Redis server. Lua scripts receive these names in KEYS; no script builds a key itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builder for one deployment."""

    prefix: str = "refitd"

    def _k(self, *parts: object) -> str:
        return ":".join((self.prefix, *(str(p) for p in parts)))

    # Versions
    @property
    def version_counter(self) -> str:
        """INCR counter: the last version number handed out (never reused)."""
        return self._k("version", "counter")

    @property
    def version_index(self) -> str:
        """Sorted set of every version number (score = version)."""
        return self._k("versions")

    def version(self, version: int) -> str:
        """Hash: status, label, times, quantization report, verification metrics."""
        return self._k("version", version)

    @property
    def active(self) -> str:
        """Hash: the active (committed) version and the epoch of the decision that made it so."""
        return self._k("active")

    @property
    def epoch(self) -> str:
        """INCR counter: the fencing token; rises with every commit/abort decision."""
        return self._k("epoch")

    # Updates (a trainer's request; one update makes at most one version)
    def update(self, update_id: str) -> str:
        """Hash: status, stage, progress, error, version."""
        return self._k("update", update_id)

    @property
    def update_index(self) -> str:
        """Sorted set of update ids by creation time."""
        return self._k("updates")

    @property
    def update_queue(self) -> str:
        """List of update ids waiting to run, oldest first."""
        return self._k("updates", "queue")

    @property
    def update_running(self) -> str:
        """List holding the id of the update the pipeline runs now (moved from the queue)."""
        return self._k("updates", "running")

    def idempotency(self, key: str) -> str:
        """Hash: body digest and update id of an Idempotency-Key."""
        return self._k("idempotency", key)

    @property
    def daemon(self) -> str:
        """String with a TTL: the id (host:pid:token) of the one daemon serving this prefix."""
        return self._k("daemon")

    # Two-phase commit
    @property
    def update_lock(self) -> str:
        """The one-pipeline-at-a-time lock (value: owner token; fencing number in lock_fence)."""
        return self._k("lock", "update")

    @property
    def lock_fence(self) -> str:
        """INCR counter: fencing number handed to each new lock holder."""
        return self._k("lock", "fence")

    def txn(self, txn_id: str) -> str:
        """Hash: a rollout transaction (version, ranks, decision, epoch, per-rank acks)."""
        return self._k("txn", txn_id)

    @property
    def open_txns(self) -> str:
        """Set of transaction ids that have no final outcome yet (recovery reads it)."""
        return self._k("txns", "open")

    @property
    def active_history(self) -> str:
        """List of every version a COMMIT decision made active, oldest first (never trimmed)."""
        return self._k("active", "history")

    # Ranks
    def rank(self, rank: int) -> str:
        """Hash: a rank agent's registration, heartbeat, held and staged version, digest."""
        return self._k("rank", rank)

    def rank_alive(self, rank: int) -> str:
        """String with a TTL of ranks.heartbeat_timeout_s, refreshed by each heartbeat: the rank
        lives while it exists (Redis's clock judges, so rank hosts' clocks may drift)."""
        return self._k("rank", rank, "alive")

    @property
    def rank_commands(self) -> str:
        """Stream of commands to every rank agent (PREPARE, COMMIT, ABORT), in order. One entry
        per command: a PREPARE lists every rank's shard, and each agent takes its own."""
        return self._k("ranks", "commands")

    def txn_acks(self, txn_id: str) -> str:
        """Stream of acks from ranks for one transaction."""
        return self._k("txn", txn_id, "acks")

    # Audit
    @property
    def events(self) -> str:
        """Append-only stream of every transition (the audit log)."""
        return self._k("events")
