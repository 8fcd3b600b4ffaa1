"""The version store: version numbers, their lifecycle, and the audit stream, in Redis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from orchestrator.errors import NotFound, StaleTransition
from orchestrator.state.keys import Keys
from orchestrator.state.lua import LuaScript, ScriptRegistry

# The audit stream is append-only; this bound only keeps a runaway loop from filling Redis.
EVENTS_MAXLEN = 1_000_000


class VersionStatus(StrEnum):
    RECEIVED = "RECEIVED"
    QUANTIZED = "QUANTIZED"
    VERIFIED = "VERIFIED"
    PREPARED = "PREPARED"
    COMMITTED = "COMMITTED"
    REJECTED = "REJECTED"
    ABORTED = "ABORTED"
    SUPERSEDED = "SUPERSEDED"
    ROLLED_BACK = "ROLLED_BACK"


_S = VersionStatus
# For each target status, the statuses a version may come from. verify=false goes QUANTIZED ->
# PREPARED; a rollback re-commits a SUPERSEDED or ROLLED_BACK version.
ALLOWED_FROM: dict[VersionStatus, frozenset[VersionStatus]] = {
    _S.RECEIVED: frozenset(),
    _S.QUANTIZED: frozenset({_S.RECEIVED}),
    _S.VERIFIED: frozenset({_S.QUANTIZED}),
    _S.PREPARED: frozenset({_S.QUANTIZED, _S.VERIFIED}),
    _S.COMMITTED: frozenset({_S.PREPARED, _S.SUPERSEDED, _S.ROLLED_BACK}),
    _S.REJECTED: frozenset({_S.RECEIVED, _S.QUANTIZED, _S.VERIFIED}),
    _S.ABORTED: frozenset({_S.RECEIVED, _S.QUANTIZED, _S.VERIFIED, _S.PREPARED}),
    _S.SUPERSEDED: frozenset({_S.COMMITTED}),
    _S.ROLLED_BACK: frozenset({_S.COMMITTED}),
}
FINAL_FAILURES = frozenset({_S.REJECTED, _S.ABORTED})
# Versions an update is still working on.
IN_FLIGHT = frozenset({_S.RECEIVED, _S.QUANTIZED, _S.VERIFIED, _S.PREPARED})
# Versions that were active and no longer are: the only ones a rollback may return to.
EVER_ACTIVE = frozenset({_S.SUPERSEDED, _S.ROLLED_BACK})
# Versions a COMMIT decision made active at some point.
EVER_COMMITTED = EVER_ACTIVE | {_S.COMMITTED}

TRANSITION = LuaScript(
    name="version_transition",
    num_keys=2,
    errors={"NOT_FOUND": NotFound, "STALE": StaleTransition},
    source="""
-- Compare-and-set a version's status and record the transition in the audit stream.
-- KEYS[1] version hash         KEYS[2] events stream
-- ARGV[1] version number       ARGV[2] expected statuses, comma-separated
-- ARGV[3] new status           ARGV[4] timestamp (seconds, float as string)
-- ARGV[5] reason ("" for none) ARGV[6] stream MAXLEN (approximate)
-- Returns {"OK", previous status} | {"NOT_FOUND", msg} | {"STALE", msg}
local current = redis.call('HGET', KEYS[1], 'status')
if not current then
  return {'NOT_FOUND', 'version ' .. ARGV[1] .. ' does not exist'}
end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == current then allowed = true end
end
if not allowed then
  return {'STALE', 'version ' .. ARGV[1] .. ' is ' .. current .. ', not one of ' .. ARGV[2]
    .. ' (wanted ' .. ARGV[3] .. ')'}
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'updated_at', ARGV[4],
  't_' .. string.lower(ARGV[3]), ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[5]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'kind', 'version',
  'version', ARGV[1], 'from', current, 'to', ARGV[3], 'reason', ARGV[5])
return {'OK', current}
""",
)


@dataclass
class VersionRecord:
    """One version as stored in Redis."""

    version: int
    status: VersionStatus
    label: str | None
    created_at: float
    updated_at: float
    update_id: str | None = None
    reason: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    quantization: list[dict[str, Any]] | None = None
    verification: dict[str, Any] | None = None
    artifact: dict[str, Any] | None = None
    # Per rank: the digest, size and {name, dtype, shape, offset} table of the shard that ships.
    layout: dict[str, Any] | None = None

    @classmethod
    def from_hash(cls, version: int, raw: dict[str, str]) -> VersionRecord:
        def _json(name: str) -> Any:
            value = raw.get(name)
            return json.loads(value) if value else None

        return cls(
            version=version,
            status=VersionStatus(raw["status"]),
            label=raw.get("label") or None,
            created_at=float(raw["created_at"]),
            updated_at=float(raw.get("updated_at", raw["created_at"])),
            update_id=raw.get("update_id") or None,
            reason=raw.get("reason") or None,
            times={k[2:]: float(v) for k, v in raw.items() if k.startswith("t_")},
            quantization=_json("quantization"),
            verification=_json("verification"),
            artifact=_json("artifact"),
            layout=_json("layout"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status.value,
            "label": self.label,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "update_id": self.update_id,
            "reason": self.reason,
            "times": self.times,
            "quantization": self.quantization,
            "verification": self.verification,
            "artifact": self.artifact,
            # The tables are for ranks, not readers: a summary is enough here.
            "layout": None
            if self.layout is None
            else {
                "tp_size": self.layout.get("tp_size"),
                "ranks": [
                    {
                        "rank": r["rank"],
                        "digest": r["digest"],
                        "bytes": r["nbytes"],
                        "tensors": len(r["table"]),
                    }
                    for r in self.layout.get("ranks", [])
                ],
            },
        }


class VersionStore:
    """Creates versions (strictly increasing, never reused) and moves them through their states."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._scripts = ScriptRegistry(client)

    def allocate(self) -> int:
        """The next version number (strictly increasing, never reused)."""
        return int(self._r.incr(self._keys.version_counter))

    def add_received(
        self,
        pipe: redis.client.Pipeline,
        version: int,
        *,
        label: str | None,
        update_id: str | None,
        now: float,
    ) -> None:
        """Queue on `pipe` the writes that record `version` as RECEIVED (with its audit event),
        so a caller can make them one transaction with its own writes."""
        pipe.hset(
            self._keys.version(version),
            mapping={
                "status": VersionStatus.RECEIVED.value,
                "label": label or "",
                "update_id": update_id or "",
                "created_at": repr(now),
                "updated_at": repr(now),
                "t_received": repr(now),
            },
        )
        pipe.zadd(self._keys.version_index, {str(version): version})
        pipe.xadd(
            self._keys.events,
            {"kind": "version", "version": version, "from": "", "to": "RECEIVED",
             "reason": f"update {update_id}" if update_id else ""},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )  # fmt: skip

    def create(self, *, label: str | None, update_id: str | None = None) -> int:
        """Allocate the next version number and record it as RECEIVED."""
        version = self.allocate()
        pipe = self._r.pipeline(transaction=True)
        self.add_received(pipe, version, label=label, update_id=update_id, now=time.time())
        pipe.execute()
        return version

    def transition(self, version: int, to: VersionStatus, *, reason: str = "") -> VersionStatus:
        """Compare-and-set `version` to `to` from any status allowed to lead there.

        Returns the previous status; raises StaleTransition or NotFound.
        """
        allowed = ALLOWED_FROM[to]
        if not allowed:
            raise StaleTransition(f"no transition leads to {to.value}")
        script = self._scripts[TRANSITION]
        (previous,) = script(
            [self._keys.version(version), self._keys.events],
            [
                version,
                ",".join(sorted(s.value for s in allowed)),
                to.value,
                repr(time.time()),
                reason,
                EVENTS_MAXLEN,
            ],
        )
        return VersionStatus(previous)

    def set_fields(self, version: int, **fields: Any) -> None:
        """Store JSON-able details (quantization report, verification metrics, artifact info)."""
        if not self._r.exists(self._keys.version(version)):
            raise NotFound(f"version {version} does not exist")
        mapping: dict[str | bytes, str] = {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()
        }
        self._r.hset(self._keys.version(version), mapping=mapping)

    def get(self, version: int) -> VersionRecord:
        raw = self._r.hgetall(self._keys.version(version))
        if not raw:
            raise NotFound(f"version {version} does not exist")
        return VersionRecord.from_hash(version, raw)

    def list(self, *, limit: int = 100) -> list[VersionRecord]:
        """The newest `limit` versions, newest first."""
        numbers = self._r.zrevrange(self._keys.version_index, 0, limit - 1)
        pipe = self._r.pipeline(transaction=False)
        for n in numbers:
            pipe.hgetall(self._keys.version(int(n)))
        return [
            VersionRecord.from_hash(int(n), raw)
            for n, raw in zip(numbers, pipe.execute(), strict=True)
            if raw
        ]
