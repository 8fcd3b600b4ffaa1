"""Rollout transactions in Redis: their states, their record, and the Lua scripts that move them.

A transaction switches every rank to one version (a rollout, or a rollback) in two phases:

    PREPARING --(DECIDE COMMIT: all ranks PREPARED)--> COMMITTING --(last rank acks)--> COMMITTED
        \\--(DECIDE ABORT: a rank failed, died, or missed the deadline)--> ABORTED

Every command to the ranks is written by the script that makes it true: BEGIN appends PREPARE,
DECIDE appends COMMIT or ABORT. So no crash can leave a decision that the ranks were never sent.

The epoch (`keys.epoch`) is the fencing token of decisions: every decision INCRs it, and a rank's
acks must carry the epoch their command carried, which must still be current (PREPARE) or equal to
the decision's (COMMIT). So an ack from a rank that slept through a decision is refused.

Per-rank fields of the transaction hash: `r<rank>` (PENDING, PREPARED, FAILED, COMMITTED),
`x<rank>` (the digest the shard must have), `d<rank>` (the digest the rank reported),
`e<rank>` (why it failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orchestrator.errors import FencedOut, NotFound, StaleTransition
from orchestrator.rollout.lock import FENCE_CHECK_LUA
from orchestrator.state.lua import LuaScript


class TxnState(StrEnum):
    PREPARING = "PREPARING"
    COMMITTING = "COMMITTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


class RankPhase(StrEnum):
    """A rank's answer within one transaction."""

    PENDING = "PENDING"
    PREPARED = "PREPARED"
    FAILED = "FAILED"
    COMMITTED = "COMMITTED"


class TxnKind(StrEnum):
    ROLLOUT = "rollout"
    ROLLBACK = "rollback"


class NotPrepared(StaleTransition):
    """COMMIT was asked for while some rank had not acked PREPARED with the expected digest."""


@dataclass
class TxnRecord:
    """One transaction as stored in Redis."""

    id: str
    version: int
    kind: TxnKind
    from_version: int | None
    state: TxnState
    begin_epoch: int
    tp_size: int
    created_at: float
    epoch: int | None = None
    decision: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    closed_at: float | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> TxnRecord:
        def _opt_float(name: str) -> float | None:
            value = raw.get(name)
            return float(value) if value else None

        tp_size = int(raw["tp_size"])
        return cls(
            id=raw["id"],
            version=int(raw["version"]),
            kind=TxnKind(raw["kind"]),
            from_version=int(raw["from_version"]) if raw.get("from_version") else None,
            state=TxnState(raw["state"]),
            begin_epoch=int(raw["begin_epoch"]),
            tp_size=tp_size,
            created_at=float(raw["created_at"]),
            epoch=int(raw["epoch"]) if raw.get("epoch") else None,
            decision=raw.get("decision") or None,
            reason=raw.get("reason") or None,
            decided_at=_opt_float("decided_at"),
            closed_at=_opt_float("closed_at"),
            ranks=[
                {
                    "rank": r,
                    "state": raw.get(f"r{r}", RankPhase.PENDING.value),
                    "digest": raw.get(f"d{r}") or None,
                    "expected_digest": raw.get(f"x{r}") or None,
                    "reason": raw.get(f"e{r}") or None,
                }
                for r in range(tp_size)
            ],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "kind": self.kind.value,
            "from_version": self.from_version,
            "state": self.state.value,
            "begin_epoch": self.begin_epoch,
            "epoch": self.epoch,
            "decision": self.decision,
            "reason": self.reason,
            "created_at": self.created_at,
            "decided_at": self.decided_at,
            "closed_at": self.closed_at,
            "ranks": self.ranks,
        }


# Shared by the scripts below: version status checks and writes in the exact shape of
# orchestrator.state.versions.TRANSITION, which cannot be called from inside another script.
_STATUS_LUA = """
local function status_in(vkey, csv)
  local current = redis.call('HGET', vkey, 'status')
  if not current then return nil, false end
  for s in string.gmatch(csv, '[^,]+') do
    if s == current then return current, true end
  end
  return current, false
end
local function set_status(vkey, events, version, from, to, now, reason, maxlen)
  redis.call('HSET', vkey, 'status', to, 'updated_at', now, 't_' .. string.lower(to), now)
  if reason ~= '' then redis.call('HSET', vkey, 'reason', reason) end
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'kind', 'version',
    'version', version, 'from', from, 'to', to, 'reason', reason)
end
"""

BEGIN = LuaScript(
    name="txn_begin",
    num_keys=8,
    errors={
        "FENCED": FencedOut,
        "BUSY": StaleTransition,
        "NOT_FOUND": NotFound,
        "STALE": StaleTransition,
    },
    source=FENCE_CHECK_LUA
    + _STATUS_LUA
    + """
-- Open a transaction and send PREPARE to every rank in one step: record it (with the active
-- version it starts from and the current epoch), mark it open, point the version at it, move the
-- version to its preparing status, and append PREPARE (with every rank's shard) to the ranks'
-- command stream.
-- KEYS[1] lock  KEYS[2] epoch  KEYS[3] active  KEYS[4] txn hash  KEYS[5] open txns set
-- KEYS[6] the version's hash  KEYS[7] events stream  KEYS[8] ranks' command stream
-- ARGV[1] fence  ARGV[2] txn id  ARGV[3] version  ARGV[4] kind (rollout | rollback)
-- ARGV[5] now  ARGV[6] JSON list, rank order, of each rank's route entry ({digest, via, ..})
--   ARGV[7] statuses the version may be in (csv)  ARGV[8] status to move it to now
--   ('' = none)  ARGV[9] events MAXLEN  ARGV[10] command stream MAXLEN (both approximate)
-- Returns {"OK", begin epoch, active version or ""} | {"FENCED"|"BUSY"|"NOT_FOUND"|"STALE", msg}
local ok, msg = fence_ok(KEYS[1], ARGV[1])
if not ok then return {'FENCED', msg} end
local open = redis.call('SMEMBERS', KEYS[5])
if #open > 0 then
  return {'BUSY', 'transaction(s) ' .. table.concat(open, ', ') .. ' are still open'}
end
local current, allowed = status_in(KEYS[6], ARGV[7])
if not current then return {'NOT_FOUND', 'version ' .. ARGV[3] .. ' does not exist'} end
if not allowed then
  return {'STALE', 'version ' .. ARGV[3] .. ' is ' .. current .. ', not one of ' .. ARGV[7]}
end
local shards = cjson.decode(ARGV[6])
local epoch = redis.call('GET', KEYS[2]) or '0'
local from = redis.call('HGET', KEYS[3], 'version') or ''
local fields = {'id', ARGV[2], 'version', ARGV[3], 'kind', ARGV[4], 'from_version', from,
  'state', 'PREPARING', 'begin_epoch', epoch, 'fence', ARGV[1], 'tp_size', #shards,
  'created_at', ARGV[5]}
for i, shard in ipairs(shards) do
  local r = i - 1
  table.insert(fields, 'x' .. r)
  table.insert(fields, shard['digest'])
  table.insert(fields, 'r' .. r)
  table.insert(fields, 'PENDING')
end
redis.call('HSET', KEYS[4], unpack(fields))
redis.call('SADD', KEYS[5], ARGV[2])
redis.call('HSET', KEYS[6], 'last_txn', ARGV[2])
if ARGV[8] ~= '' then
  set_status(KEYS[6], KEYS[7], ARGV[3], current, ARGV[8], ARGV[5], '', ARGV[9])
end
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[9], '*', 'kind', 'txn', 'txn', ARGV[2],
  'version', ARGV[3], 'from', '', 'to', 'PREPARING', 'epoch', epoch, 'reason', ARGV[4])
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[10], '*', 'type', 'PREPARE', 'txn', ARGV[2],
  'version', ARGV[3], 'epoch', epoch, 'shards', ARGV[6])
return {'OK', epoch, from}
""",
)

ACK = LuaScript(
    name="txn_ack",
    num_keys=6,
    errors={"NOT_FOUND": NotFound, "FENCED": FencedOut, "STALE": StaleTransition},
    source="""
-- A rank's answer to a command: PREPARED (with the digest of what it staged), FAILED (with
-- why), or COMMITTED (with the digest of what it now holds). Updates the rank's hash in the
-- same step. Refused when the epoch the command carried is no longer the one that counts. The
-- last COMMITTED ack closes the transaction. A repeated answer is accepted and changes nothing.
-- A closed transaction's acks stream lives one more day, for debugging; the events stream is the
-- permanent record.
-- KEYS[1] txn hash  KEYS[2] epoch  KEYS[3] rank hash  KEYS[4] txn acks stream
-- KEYS[5] open txns set  KEYS[6] events stream
-- ARGV[1] txn id  ARGV[2] rank  ARGV[3] phase (PREPARED | FAILED | COMMITTED)
-- ARGV[4] epoch the command carried  ARGV[5] digest  ARGV[6] reason  ARGV[7] now
-- ARGV[8] stream MAXLEN (approximate)
-- Returns {"OK", txn state} | {"NOT_FOUND"|"FENCED"|"STALE", msg}
local rank, phase = ARGV[2], ARGV[3]
local t = redis.call('HMGET', KEYS[1], 'state', 'begin_epoch', 'epoch', 'version', 'tp_size',
  'r' .. rank)
local state, begin_epoch, decision_epoch, version, tp, mine = t[1], t[2], t[3], t[4], t[5], t[6]
if not state then return {'NOT_FOUND', 'transaction ' .. ARGV[1] .. ' does not exist'} end
if not mine then
  return {'NOT_FOUND', 'rank ' .. rank .. ' is not part of transaction ' .. ARGV[1]}
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local carried = tonumber(ARGV[4])
local who = 'rank ' .. rank .. "'s " .. phase .. ' for transaction ' .. ARGV[1]
if phase == 'PREPARED' or phase == 'FAILED' then
  if carried < current or state ~= 'PREPARING' or carried ~= tonumber(begin_epoch) then
    return {'FENCED', who .. ' carries epoch ' .. carried .. ' but the current epoch is '
      .. current .. ' and the transaction is ' .. state}
  end
  if mine ~= 'PENDING' then
    if mine == phase then return {'OK', state} end
    return {'STALE', who .. ': the rank already answered ' .. mine}
  end
  if phase == 'PREPARED' then
    redis.call('HSET', KEYS[1], 'r' .. rank, 'PREPARED', 'd' .. rank, ARGV[5])
    redis.call('HSET', KEYS[3], 'state', 'PREPARED', 'staged_version', version,
      'staged_txn', ARGV[1], 'staged_digest', ARGV[5])
  else
    redis.call('HSET', KEYS[1], 'r' .. rank, 'FAILED', 'e' .. rank, ARGV[6])
    redis.call('HSET', KEYS[3], 'state', 'READY', 'staged_version', '', 'staged_txn', '',
      'staged_digest', '')
  end
elseif phase == 'COMMITTED' then
  if state ~= 'COMMITTING' and state ~= 'COMMITTED' then
    return {'STALE', who .. ': the transaction is ' .. state}
  end
  if carried ~= tonumber(decision_epoch) then
    return {'FENCED', who .. ' carries epoch ' .. carried .. ' but the decision was made at epoch '
      .. decision_epoch}
  end
  -- The rank hash always shows what the agent now holds: a restarted agent that loads the
  -- version it had already committed in an earlier life acks it again.
  redis.call('HSET', KEYS[3], 'state', 'READY', 'version', version, 'digest', ARGV[5],
    'epoch', ARGV[4], 'staged_version', '', 'staged_txn', '', 'staged_digest', '')
  if mine == 'COMMITTED' then return {'OK', state} end
  redis.call('HSET', KEYS[1], 'r' .. rank, 'COMMITTED', 'd' .. rank, ARGV[5])
  local done = true
  for i = 0, tonumber(tp) - 1 do
    if redis.call('HGET', KEYS[1], 'r' .. i) ~= 'COMMITTED' then done = false end
  end
  if done then
    state = 'COMMITTED'
    redis.call('HSET', KEYS[1], 'state', 'COMMITTED', 'closed_at', ARGV[7])
    redis.call('SREM', KEYS[5], ARGV[1])
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'kind', 'txn', 'txn', ARGV[1],
      'version', version, 'from', 'COMMITTING', 'to', 'COMMITTED', 'epoch', ARGV[4], 'reason', '')
  end
else
  return {'STALE', 'unknown phase ' .. phase}
end
redis.call('XADD', KEYS[4], '*', 'rank', rank, 'phase', phase, 'digest', ARGV[5],
  'reason', ARGV[6])
if state == 'COMMITTED' then redis.call('EXPIRE', KEYS[4], 86400) end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'kind', 'rank', 'rank', rank,
  'txn', ARGV[1], 'version', version, 'to', phase, 'epoch', ARGV[4], 'reason', ARGV[6])
return {'OK', state}
""",
)

DECIDE = LuaScript(
    name="txn_decide",
    num_keys=11,
    errors={
        "FENCED": FencedOut,
        "STALE": StaleTransition,
        "NOT_PREPARED": NotPrepared,
        "NOT_FOUND": NotFound,
    },
    source=FENCE_CHECK_LUA
    + _STATUS_LUA
    + """
-- Record a transaction's decision, everything it implies, and the command that tells the ranks,
-- in one step.
-- COMMIT needs every rank to have acked PREPARED with its shard's expected digest, and the active
-- version to be the one the transaction started from. Then: the epoch rises; the version becomes
-- the active one (status COMMITTED); the one active before becomes SUPERSEDED (rollout) or
-- ROLLED_BACK (rollback); the version is appended to the active history; COMMIT is sent. The
-- transaction stays open (COMMITTING) until the last rank acks.
-- ABORT: the epoch rises, the version takes its abort status (rollout: ABORTED; rollback: none),
-- ABORT is sent, and the transaction is closed (ABORTED).
-- KEYS[1] lock  KEYS[2] epoch  KEYS[3] active  KEYS[4] txn hash  KEYS[5] the version's hash
-- KEYS[6] hash of the version active when the txn began (KEYS[5] again when none was)
-- KEYS[7] active history list  KEYS[8] events stream  KEYS[9] ranks' command stream
-- KEYS[10] open txns set  KEYS[11] txn acks stream (expires a day after an abort)
-- ARGV[1] fence  ARGV[2] decision (COMMIT | ABORT)  ARGV[3] now  ARGV[4] reason
-- ARGV[5] the version's new status ('' = leave it)  ARGV[6] statuses it may come from (csv)
-- ARGV[7] new status of the previously active version on COMMIT  ARGV[8] events MAXLEN
-- ARGV[9] command stream MAXLEN (both approximate)
-- ARGV[10] '1' for a restore: a COMMIT that needs no PREPARED acks (recovery returns the ranks to
--   a durable version; each loads it), and the version active before takes ARGV[4] as its reason
-- Returns {"OK", epoch} | {"FENCED"|"STALE"|"NOT_PREPARED"|"NOT_FOUND", msg}
local ok, msg = fence_ok(KEYS[1], ARGV[1])
if not ok then return {'FENCED', msg} end
local t = redis.call('HMGET', KEYS[4], 'id', 'state', 'version', 'from_version', 'tp_size')
local id, state, version, from, tp = t[1], t[2], t[3], t[4], t[5]
if not state then return {'NOT_FOUND', 'the transaction does not exist'} end
if state ~= 'PREPARING' then
  return {'STALE', 'transaction ' .. id .. ' is already ' .. state}
end
local commit = ARGV[2] == 'COMMIT'
local restore = ARGV[10] == '1'
if commit and not restore then
  local missing = {}
  for i = 0, tonumber(tp) - 1 do
    local r = redis.call('HMGET', KEYS[4], 'r' .. i, 'd' .. i, 'x' .. i)
    if r[1] ~= 'PREPARED' or r[2] ~= r[3] then table.insert(missing, tostring(i)) end
  end
  if #missing > 0 then
    return {'NOT_PREPARED', 'rank(s) ' .. table.concat(missing, ', ') ..
      ' have not acked PREPARED with the expected digest in transaction ' .. id}
  end
end
if commit then
  local active = redis.call('HGET', KEYS[3], 'version') or ''
  if active ~= from then
    return {'STALE', 'the active version is ' .. active .. ', not ' .. from ..
      ' as when transaction ' .. id .. ' began'}
  end
  if from ~= '' and redis.call('HGET', KEYS[6], 'status') ~= 'COMMITTED' then
    return {'STALE', 'the active version ' .. from .. ' is not COMMITTED'}
  end
end
local current = nil
if ARGV[5] ~= '' then
  local allowed
  current, allowed = status_in(KEYS[5], ARGV[6])
  if not current then return {'NOT_FOUND', 'version ' .. version .. ' does not exist'} end
  if not allowed then
    return {'STALE', 'version ' .. version .. ' is ' .. current .. ', not one of ' .. ARGV[6]}
  end
end
local epoch = redis.call('INCR', KEYS[2])
local to = 'ABORTED'
if commit then to = 'COMMITTING' end
redis.call('HSET', KEYS[4], 'state', to, 'decision', ARGV[2], 'epoch', epoch,
  'decided_at', ARGV[3], 'reason', ARGV[4])
if commit then
  redis.call('HSET', KEYS[3], 'version', version, 'epoch', epoch, 'txn', id, 'since', ARGV[3])
  redis.call('RPUSH', KEYS[7], version)
  if from ~= '' then
    local why = ''
    if restore then why = ARGV[4] end
    set_status(KEYS[6], KEYS[8], from, 'COMMITTED', ARGV[7], ARGV[3], why, ARGV[8])
  end
else
  redis.call('HSET', KEYS[4], 'closed_at', ARGV[3])
  redis.call('SREM', KEYS[10], id)
  redis.call('EXPIRE', KEYS[11], 86400)
end
if ARGV[5] ~= '' then
  set_status(KEYS[5], KEYS[8], version, current, ARGV[5], ARGV[3], ARGV[4], ARGV[8])
end
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[8], '*', 'kind', 'txn', 'txn', id,
  'version', version, 'from', 'PREPARING', 'to', to, 'epoch', epoch, 'reason', ARGV[4])
redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[9], '*', 'type', ARGV[2], 'txn', id,
  'version', version, 'epoch', epoch)
return {'OK', tostring(epoch)}
""",
)
