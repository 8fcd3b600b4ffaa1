"""The rollout's read side: what the last decisions made active, what every rank holds, and the
transactions on record. Reads only; the coordinator (coordinator.py) makes the decisions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from orchestrator.errors import NotFound, RedisUnavailable
from orchestrator.rollout.txn import TxnRecord
from orchestrator.settings import Settings
from orchestrator.state.keys import Keys
from orchestrator.state.versions import VersionStatus, VersionStore

_S = VersionStatus
# The active history is read from its end in chunks: the answer is nearly always there.
_HISTORY_CHUNK = 64


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Redis not answering, as the RedisUnavailable the API maps to 503."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(f"Redis does not answer: {exc}") from None


def opt_int(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


class RolloutLedger:
    """Reads the active version, the ranks' hashes, transactions and the active history."""

    def __init__(
        self, client: redis.Redis, keys: Keys, settings: Settings, versions: VersionStore
    ) -> None:
        self._r = client
        self._keys = keys
        self._versions = versions
        self.tp_size = settings.ranks.tp_size

    def active(self) -> dict[str, Any]:
        """The active version, the epoch that made it so, and what every rank holds."""
        with redis_errors():
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(self._keys.active)
            pipe.get(self._keys.epoch)
            for r in range(self.tp_size):
                pipe.hgetall(self._keys.rank(r))
                pipe.exists(self._keys.rank_alive(r))
            replies = pipe.execute()
        active, epoch, per_rank = replies[0], replies[1], replies[2:]
        ranks = []
        for r in range(self.tp_size):
            raw, alive = per_rank[2 * r], per_rank[2 * r + 1]
            ranks.append(
                {
                    "rank": r,
                    "version": opt_int(raw.get("version")),
                    "state": raw.get("state") or "UNREGISTERED",
                    "alive": bool(alive),
                    "digest": raw.get("digest") or None,
                    "epoch": opt_int(raw.get("epoch")),
                    "staged_version": opt_int(raw.get("staged_version")),
                    "previous_version": opt_int(raw.get("previous_version")),
                    "reason": raw.get("reason") or None,
                    "device": raw.get("device") or None,
                    "pid": opt_int(raw.get("pid")),
                    "host": raw.get("host") or None,
                    # How the shard it serves arrived: cuda_ipc, shm, distributed/<backend>,
                    # artifact (read from disk) or http.
                    "transport": raw.get("transport") or None,
                }
            )
        return {
            "active_version": opt_int(active.get("version")),
            "epoch": int(active.get("epoch") or 0),
            "current_epoch": int(epoch or 0),
            "txn": active.get("txn") or None,
            "ranks": ranks,
        }

    def version_ranks(self, version: int) -> list[dict[str, Any]]:
        """Per-rank states (state, digest, expected_digest, reason) in the version's last
        transaction; [] when it never reached the ranks."""
        with redis_errors():
            txn_id = self._r.hget(self._keys.version(version), "last_txn")
            if not txn_id:
                if not self._r.exists(self._keys.version(version)):
                    raise NotFound(f"version {version} does not exist")
                return []
            record = self.txn(txn_id)
        return [{"txn": record.id, "kind": record.kind.value, **r} for r in record.ranks]

    def txn(self, txn_id: str) -> TxnRecord:
        """One transaction's record."""
        raw = self._r.hgetall(self._keys.txn(txn_id))
        if not raw:
            raise NotFound(f"transaction {txn_id} does not exist")
        return TxnRecord.from_hash(raw)

    def open_txns(self) -> list[TxnRecord]:
        """Transactions without a final outcome, oldest first."""
        with redis_errors():
            ids = self._r.smembers(self._keys.open_txns)
            records = []
            for txn_id in ids:
                with contextlib.suppress(NotFound):
                    records.append(self.txn(txn_id))
        return sorted(records, key=lambda t: t.created_at)

    def previous_committed(self) -> int | None:
        """The version that was active before the current one and not rolled back from since:
        the default rollback target, and never pruned."""
        with redis_errors():
            active = self.active_version()
            seen: set[int] = set()
            # Read from the end in chunks: the answer is nearly always among the last entries.
            end = -1
            while chunk := self._r.lrange(self._keys.active_history, end - _HISTORY_CHUNK + 1, end):
                for item in reversed(chunk):
                    version = int(item)
                    if version == active or version in seen:
                        continue
                    seen.add(version)
                    with contextlib.suppress(NotFound):
                        if self._versions.get(version).status == _S.SUPERSEDED:
                            return version
                if len(chunk) < _HISTORY_CHUNK:
                    break
                end -= _HISTORY_CHUNK
        return None

    def active_version(self) -> int | None:
        """The active version, as the last decision recorded it."""
        return opt_int(self._r.hget(self._keys.active, "version"))
