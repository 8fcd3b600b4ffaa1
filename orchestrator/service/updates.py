"""Update records and the durable queue: what a trainer asked for and where it stands.

An update is acknowledged (202) only after its record, its version number and its place in the
queue are in Redis (AOF, fsync always), and an upload's bytes are fsynced to disk; so nothing
acknowledged is lost when the daemon dies: a restarted daemon runs what was still queued.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from orchestrator.errors import (
    Conflict,
    IdempotencyMismatch,
    NotFound,
    RedisUnavailable,
    UpdateOutcomeUnknown,
)
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import REDIS_DOWN
from orchestrator.state.versions import VersionStore

# An Idempotency-Key is remembered this long (a trainer retrying after a network error retries
# within minutes; a day leaves room for a stalled job).
IDEMPOTENCY_TTL_S = 24 * 3600
# A transaction whose reply never came: the connection dropped (the WatchError is redis-py's
# way of saying so for a watched transaction) or timed out.
_REPLY_LOST: tuple[type[BaseException], ...] = (redis.WatchError, *REDIS_DOWN)


class UpdateStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Stage(StrEnum):
    QUEUED = "queued"
    LOADING = "loading"
    QUANTIZING = "quantizing"
    VERIFYING = "verifying"
    WRITING = "writing"
    ROLLING_OUT = "rolling_out"
    COMMITTED = "committed"
    REJECTED = "rejected"
    ABORTED = "aborted"


# Where each stage starts on the 0..1 progress bar (the rough share of time it takes).
STAGE_START = {
    Stage.QUEUED: 0.0,
    Stage.LOADING: 0.02,
    Stage.QUANTIZING: 0.2,
    Stage.VERIFYING: 0.35,
    Stage.WRITING: 0.7,
    Stage.ROLLING_OUT: 0.8,
}


@dataclass
class UpdateRecord:
    update_id: str
    version: int
    status: UpdateStatus
    stage: Stage
    progress: float
    error: str | None
    label: str | None
    verify: bool
    source: dict[str, Any]
    created_at: float
    finished_at: float | None
    # When the pipeline began to run it (its first stage, under the update lock); None while
    # it waits in the queue.
    started_at: float | None = None

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> UpdateRecord:
        return cls(
            update_id=raw["update_id"],
            version=int(raw["version"]),
            status=UpdateStatus(raw["status"]),
            stage=Stage(raw["stage"]),
            progress=float(raw["progress"]),
            error=raw.get("error") or None,
            label=raw.get("label") or None,
            verify=raw.get("verify") == "1",
            source=json.loads(raw["source"]),
            created_at=float(raw["created_at"]),
            finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
            started_at=float(raw["started_at"]) if raw.get("started_at") else None,
        )

    @property
    def final(self) -> bool:
        return self.status in (UpdateStatus.SUCCEEDED, UpdateStatus.FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id,
            "version": self.version,
            "status": self.status.value,
            "stage": self.stage.value,
            "progress": round(self.progress, 4),
            "error": self.error,
            "label": self.label,
            "verify": self.verify,
            "source": self.source,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class UpdateQueue:
    """Creates updates (with their version) and hands them to the pipeline one at a time."""

    def __init__(
        self, client: redis.Redis, keys: Keys, versions: VersionStore, *, queue_depth: int
    ) -> None:
        self._r = client
        self._keys = keys
        self._versions = versions
        self._depth = queue_depth
        # One daemon serves one deployment (the data-dir lock makes sure); this lock makes
        # "check the key, allocate the version, enqueue" one step, so versions stay gapless.
        self._submit_lock = threading.Lock()

    def submit(
        self,
        *,
        source: dict[str, Any],
        label: str | None,
        verify: bool,
        idempotency_key: str | None,
        body_digest: str,
        update_id: str | None = None,
    ) -> tuple[UpdateRecord, bool]:
        """Record and enqueue an update; returns (record, created). A replayed Idempotency-Key
        with the same body returns the first record and created=False."""
        with self._submit_lock:
            if idempotency_key is not None:
                first = self.lookup_idempotent(idempotency_key, body_digest)
                if first is not None:
                    return first, False
            waiting = int(self._r.llen(self._keys.update_queue))
            if waiting + int(self._r.llen(self._keys.update_running)) > self._depth:
                raise Conflict(
                    f"{waiting} updates are already waiting behind the running one "
                    f"(limits.queue_depth={self._depth}); retry once one has finished"
                )
            update_id = update_id or uuid.uuid4().hex
            version = self._versions.allocate()
            now = time.time()
            record = {
                "update_id": update_id,
                "version": str(version),
                "status": UpdateStatus.QUEUED.value,
                "stage": Stage.QUEUED.value,
                "progress": "0",
                "label": label or "",
                "verify": "1" if verify else "0",
                "source": json.dumps(source),
                "created_at": repr(now),
            }
            with self._r.pipeline(transaction=True) as pipe:
                # Watching a key makes redis-py raise, instead of sending the transaction again,
                # when the connection drops during EXEC: it cannot know whether EXEC ran, and a
                # second run would queue the update twice.
                pipe.watch(self._keys.update(update_id))
                pipe.multi()
                self._versions.add_received(
                    pipe, version, label=label, update_id=update_id, now=now
                )
                pipe.hset(self._keys.update(update_id), mapping={k: v for k, v in record.items()})
                pipe.zadd(self._keys.update_index, {update_id: now})
                if idempotency_key is not None:
                    pipe.hset(
                        self._keys.idempotency(idempotency_key),
                        mapping={"digest": body_digest, "update_id": update_id},
                    )
                    pipe.expire(self._keys.idempotency(idempotency_key), IDEMPOTENCY_TTL_S)
                pipe.rpush(self._keys.update_queue, update_id)
                try:
                    pipe.execute()
                except _REPLY_LOST:
                    return self._after_lost_reply(update_id, version), True
            # Built here, not read back: the write is acknowledged, and a read could fail.
            return UpdateRecord.from_hash(record), True

    def _after_lost_reply(self, update_id: str, version: int) -> UpdateRecord:
        """The connection dropped while the update's transaction ran: it was recorded or not.
        Asks Redis which (the record, or RedisUnavailable); UpdateOutcomeUnknown if it still
        does not answer."""
        try:
            raw = self._r.hgetall(self._keys.update(update_id))
        except REDIS_DOWN:
            raise UpdateOutcomeUnknown(
                f"Redis stopped answering while update {update_id} was being recorded (as "
                f"version {version}); once it answers, GET /weights/updates/{update_id}: a 404 "
                "means it was not recorded (send it again), anything else that it was (do not)",
                update_id=update_id,
                version=version,
            ) from None
        if raw:
            return UpdateRecord.from_hash(raw)
        raise RedisUnavailable(
            f"Redis stopped answering while the update was being recorded, and it was not "
            f"recorded (version {version} is skipped); send it again"
        )

    def lookup_idempotent(self, idempotency_key: str, body_digest: str) -> UpdateRecord | None:
        """The update first made with this key and body, None for a new key; IdempotencyMismatch
        when the key came with another body."""
        seen = self._r.hgetall(self._keys.idempotency(idempotency_key))
        if not seen:
            return None
        if seen["digest"] != body_digest:
            raise IdempotencyMismatch(
                f"Idempotency-Key {idempotency_key!r} was already used with another request "
                "body; use a new key for a new update"
            )
        return self.get(seen["update_id"])

    def get(self, update_id: str) -> UpdateRecord:
        raw = self._r.hgetall(self._keys.update(update_id))
        if not raw:
            raise NotFound(f"update {update_id!r} does not exist")
        return UpdateRecord.from_hash(raw)

    def set_stage(self, update_id: str, stage: Stage, progress: float | None = None) -> None:
        mapping: dict[str | bytes, str] = {
            "stage": stage.value,
            "status": UpdateStatus.RUNNING.value,
        }
        mapping["progress"] = repr(STAGE_START.get(stage, 0.0) if progress is None else progress)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._keys.update(update_id), mapping=mapping)
        pipe.hsetnx(self._keys.update(update_id), "started_at", repr(time.time()))
        pipe.execute()

    def finish(self, update_id: str, *, ok: bool, stage: Stage, error: str | None) -> None:
        self._r.hset(
            self._keys.update(update_id),
            mapping={
                "status": (UpdateStatus.SUCCEEDED if ok else UpdateStatus.FAILED).value,
                "stage": stage.value,
                "progress": "1",
                "error": error or "",
                "finished_at": repr(time.time()),
            },
        )

    def annotate(self, update_id: str, *, error: str) -> None:
        """Add what happened to a final update afterwards (recovery rolled its version back)."""
        if not self._r.exists(self._keys.update(update_id)):
            raise NotFound(f"update {update_id} does not exist")
        self._r.hset(self._keys.update(update_id), "error", error)

    def take(self, timeout_s: float) -> str | None:
        """Move the oldest queued update to the running list (blocking up to timeout_s)."""
        moved = self._r.blmove(
            self._keys.update_queue, self._keys.update_running, timeout_s, "LEFT", "RIGHT"
        )
        return str(moved) if moved else None

    def done(self, update_id: str) -> None:
        self._r.lrem(self._keys.update_running, 0, update_id)

    def remove(self, update_id: str) -> None:
        """Take an update off the queue and the running list (recovery closed it)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.lrem(self._keys.update_queue, 0, update_id)
        pipe.lrem(self._keys.update_running, 0, update_id)
        pipe.execute()

    def stuck(self, limit_s: float, *, now: float | None = None) -> UpdateRecord | None:
        """The running update, if it started more than `limit_s` seconds ago and is not final."""
        now = time.time() if now is None else now
        for update_id in self.running():
            record = self.get(update_id)
            started = record.started_at
            if not record.final and started is not None and now - started > limit_s:
                return record
        return None

    def queued(self) -> list[str]:
        return list(self._r.lrange(self._keys.update_queue, 0, -1))

    def running(self) -> list[str]:
        return list(self._r.lrange(self._keys.update_running, 0, -1))

    def requeue_front(self, update_id: str) -> None:
        """Put an interrupted update back at the head of the queue (recovery after a crash)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.lrem(self._keys.update_running, 0, update_id)
        pipe.lpush(self._keys.update_queue, update_id)
        # It starts over: queued again, and its run time counts from its next start.
        pipe.hset(
            self._keys.update(update_id),
            mapping={
                "status": UpdateStatus.QUEUED.value,
                "stage": Stage.QUEUED.value,
                "progress": "0",
            },
        )
        pipe.hdel(self._keys.update(update_id), "started_at")
        pipe.execute()

    def waiting(self) -> int:
        return int(self._r.llen(self._keys.update_queue))
