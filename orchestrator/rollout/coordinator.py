"""The coordinator: switches every TP rank to one version, or none, by two-phase commit on Redis.
(What is active and what the ranks hold is read through ledger.py; old artifacts go in
retention.py.)

A rollout (or rollback) runs under the update lock, whose fence every mutating script checks:
1. BEGIN records the transaction and the epoch it starts at, moves the version to PREPARED, and
   sends PREPARE to the ranks' command stream, in one script. The PREPARE names, per rank, the
   route its shard takes (rollout/routes.py: CUDA IPC or shared memory from the daemon's own
   buffers, the rank's resident previous version, or the stored artifact). Each rank receives
   its shard, checks its digest on the device, stages it, and acks PREPARED with that digest
   (txn.ACK).
2. DECIDE records COMMIT (all ranks prepared with the expected digests) or ABORT (a rank failed,
   died, restarted, or missed rollout.prepare_deadline_s) together with the new active version,
   the epoch, every version status that follows from it, and the COMMIT or ABORT command to the
   ranks, in one script: a coordinator that dies after deciding leaves nothing unsent.
3. After COMMIT the coordinator waits for commit acks up to rollout.commit_deadline_s. The last
   rank's ack closes the transaction. A rank that has not acked by then keeps it open: it acks
   when it next starts (it loads the active version), and no new transaction begins until it has
   (settle_open re-sends COMMIT and waits).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.errors import (
    Conflict,
    FencedOut,
    RolloutAborted,
)
from orchestrator.rollout.ledger import RolloutLedger, redis_errors
from orchestrator.rollout.retention import Retention
from orchestrator.rollout.routes import RoutePlan, Routes
from orchestrator.rollout.txn import (
    BEGIN,
    DECIDE,
    RankPhase,
    TxnKind,
    TxnState,
)
from orchestrator.settings import Settings
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.keys import Keys
from orchestrator.state.lua import ScriptRegistry
from orchestrator.state.versions import (
    ALLOWED_FROM,
    EVENTS_MAXLEN,
    EVER_ACTIVE,
    VersionStatus,
    VersionStore,
)

if TYPE_CHECKING:
    from orchestrator.data.flat import FlatShard

log = logging.getLogger("refitd.coordinator")

# The ranks' command stream keeps this many recent commands; an agent reads only what came after
# it started.
COMMANDS_MAXLEN = 1000
# How often a waiting coordinator looks at the ranks' heartbeats and incarnations, and so how late
# it notices a rank that died mid-prepare. XREAD blocks for at most this long at a time.
LIVENESS_CHECK_S = 0.1

_HISTORY_CHUNK = 64

_S = VersionStatus


def _csv(statuses: frozenset[VersionStatus]) -> str:
    return ",".join(sorted(s.value for s in statuses))


@dataclass
class _Acks:
    """What waiting on a transaction's acks found."""

    last_id: str
    pending: set[int]
    failure: str | None = None


class Coordinator:
    """Rolls versions out to every rank (and back) atomically; reads the ranks' state."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        settings: Settings,
        versions: VersionStore,
        artifacts: ArtifactStore,
    ) -> None:
        self._r = client
        self._keys = keys
        self._settings = settings
        self._versions = versions
        self._artifacts = artifacts
        self._scripts = ScriptRegistry(client)
        self.tp_size = settings.ranks.tp_size
        self.routes = Routes(client, keys, settings, artifacts)
        self.ledger = RolloutLedger(client, keys, settings, versions)
        self.retention = Retention(self.ledger, versions, artifacts, settings)

    # Public API ----------------------------------------------------------------------------
    def rollout(
        self,
        version: int,
        *,
        fence: int,
        shards: Sequence[FlatShard] | None = None,
        prune: bool = True,
    ) -> dict[str, Any]:
        """Switch every rank to `version` (QUANTIZED or VERIFIED, its layout recorded), or none.

        `shards`: the version's per-rank buffers in this process (the pipeline's); ranks on this
        host receive them by CUDA IPC or shared memory, the others from the artifact, which must
        then be durable. Without them, every rank loads the artifact (or its resident copy).

        Returns {"version", "txn", "kind", "from_version", "epoch", "pending_ranks", "pruned",
        "timings": {"prepare_s", "commit_s", "total_s"}}. `pending_ranks` lists ranks that had
        not acked the commit by rollout.commit_deadline_s (the version is committed regardless).
        Raises RolloutAborted (the version is then ABORTED, every rank stays on the active
        version), Conflict/NotFound (the version cannot be rolled out; nothing changed),
        FencedOut (the lock was lost) or RedisUnavailable.
        """
        with redis_errors():
            record = self._versions.get(version)
            if record.status not in ALLOWED_FROM[_S.PREPARED]:
                raise Conflict(
                    f"version {version} is {record.status.value}; only a QUANTIZED or VERIFIED "
                    "version can be rolled out"
                )
            try:
                self.settle_open(fence=fence, wait=True)
                routes = self.routes.plan(version, record, shards)
            except FencedOut:
                raise
            except (Conflict, RolloutAborted) as exc:
                reason = exc.message
                self._versions.transition(version, _S.ABORTED, reason=reason)
                raise RolloutAborted(f"rollout of version {version} aborted: {reason}") from None
            with routes:
                return self._run(version, TxnKind.ROLLOUT, routes, fence=fence, prune=prune)

    def rollback(
        self, to_version: int | None = None, *, fence: int, prune: bool = True
    ) -> dict[str, Any]:
        """Switch every rank back to `to_version` (default: the previous committed version).

        The target must have been active before (SUPERSEDED or ROLLED_BACK) and its artifacts
        must still be stored; else NotFound (unknown version) or Conflict, and nothing changes.
        On success the version rolled back from is ROLLED_BACK and the target COMMITTED again.
        Returns what rollout() returns; raises RolloutAborted if a rank fails to prepare.
        """
        with redis_errors():
            active = self.ledger.active_version()
            if active is None:
                raise Conflict("no version is active, so there is nothing to roll back")
            if to_version is None:
                target = self.ledger.previous_committed()
                if target is None:
                    raise Conflict(
                        f"version {active} is active and no earlier version was committed (and "
                        "not since rolled back from); choose a version to roll back to"
                    )
            else:
                target = to_version
            record = self._versions.get(target)
            if target == active:
                raise Conflict(f"version {target} is already the active version")
            if record.status not in EVER_ACTIVE:
                raise Conflict(
                    f"version {target} is {record.status.value}; only a version that was active "
                    "before (SUPERSEDED or ROLLED_BACK) can be rolled back to"
                )
            self.settle_open(fence=fence, wait=True)
            with self.routes.plan(target, record, None) as routes:
                return self._run(target, TxnKind.ROLLBACK, routes, fence=fence, prune=prune)

    def restore(self, target: int, *, fence: int, reason: str) -> dict[str, Any]:
        """Recovery's rollback: make `target` (a version that was active, with a durable
        artifact) the active version again without waiting for the ranks, and record `reason`
        on the version rolled back from. PREPARE and COMMIT go to the ranks as usual; a rank
        that is down loads the active version when it starts, as always."""
        with redis_errors():
            record = self._versions.get(target)
            if record.status not in EVER_ACTIVE:
                raise Conflict(f"version {target} is {record.status.value}; cannot restore it")
            with self.routes.plan(target, record, None) as routes:
                txn_id = f"v{target}-{secrets.token_hex(4)}"
                self._begin(txn_id, target, TxnKind.ROLLBACK, routes.entries, fence=fence)
                from_version = self._r.hget(self._keys.txn(txn_id), "from_version") or ""
                (epoch,) = self._decide(
                    txn_id, target, from_version, "COMMIT", fence=fence, reason=reason,
                    status=_S.COMMITTED.value, may_be=EVER_ACTIVE,
                    previous_to=_S.ROLLED_BACK.value, restore=True,
                )  # fmt: skip
        log.warning("transaction %s: restored version %d at epoch %s: %s",
                    txn_id, target, epoch, reason)  # fmt: skip
        return {"version": target, "txn": txn_id, "epoch": int(epoch),
                "from_version": int(from_version) if from_version else None}  # fmt: skip

    def settle_open(
        self,
        *,
        fence: int,
        wait: bool,
        reason: str = "its coordinator stopped before a decision",
    ) -> list[dict[str, Any]]:
        """Drive every open transaction to its recorded decision; none recorded: abort.

        Only for a holder of the update lock (`fence`), so no other coordinator is mid-way. With
        `wait`, waits up to rollout.commit_deadline_s for ranks that still owe a commit ack and
        raises RolloutAborted if any still does; without, only re-sends the commands.
        """
        settled = []
        with redis_errors():
            for record in self.ledger.open_txns():
                if record.state == TxnState.PREPARING:
                    self._abort(record.id, record.version, record.kind, fence=fence, reason=reason)
                elif record.state == TxnState.COMMITTING:
                    pending = {
                        r["rank"] for r in record.ranks if r["state"] != RankPhase.COMMITTED.value
                    }
                    # Ranks that have committed ack a repeated COMMIT again and change nothing.
                    self._broadcast(record.id, "COMMIT", record.version, record.epoch or 0)
                    if wait:
                        acks = self._await(
                            record.id,
                            RankPhase.COMMITTED,
                            pending,
                            self._settings.rollout.commit_deadline_s,
                            stop_when_dead=True,
                        )
                        if acks.pending:
                            raise RolloutAborted(
                                f"transaction {record.id} committed version {record.version} but "
                                f"rank(s) {_ranks(acks.pending)} have not applied it yet; a new "
                                "transaction starts once they have"
                            )
                log.info("settled transaction %s (%s, version %d)",
                         record.id, record.state.value, record.version)  # fmt: skip
                settled.append({"txn": record.id, "version": record.version,
                                "state": record.state.value})  # fmt: skip
        return settled

    def _run(
        self,
        version: int,
        kind: TxnKind,
        routes: RoutePlan,
        *,
        fence: int,
        prune: bool,
    ) -> dict[str, Any]:
        shards = routes.entries
        txn_id = f"v{version}-{secrets.token_hex(4)}"
        what = "rollout of" if kind == TxnKind.ROLLOUT else "rollback to"
        expected = {r: s["digest"] for r, s in enumerate(shards)}
        t0 = time.perf_counter()
        # Each rank's incarnation as the PREPARE goes out: one that restarts after this may have
        # missed it, and waiting for its ack would only run out the deadline.
        instances: dict[int, str] = {}
        trouble, _ = self._rank_trouble(set(range(self.tp_size)), instances)
        begin_epoch, from_version = self._begin(txn_id, version, kind, shards, fence=fence)
        # Distributed sends start once the ranks have their PREPARE (whose entry names the
        # group to join); they fail fast when a rank goes away mid-transfer.
        routes.start()
        log.info("%s version %d: transaction %s, epoch %s", what, version, txn_id, begin_epoch)
        if trouble:
            # Begun all the same, so that the attempt and its abort are on record.
            acks = _Acks(last_id="0-0", pending=set(trouble), failure=_why(trouble))
        else:
            acks = self._await(
                txn_id,
                RankPhase.PREPARED,
                set(range(self.tp_size)),
                self._settings.rollout.prepare_deadline_s,
                expected=expected,
                instances=instances,
                failure=routes.failure,
            )
        t_prepared = time.perf_counter()
        if acks.failure is not None:
            self._abort(txn_id, version, kind, fence=fence, reason=acks.failure)
            raise RolloutAborted(f"{what} version {version} aborted: {acks.failure}")
        status = _S.COMMITTED.value
        (epoch,) = self._decide(
            txn_id, version, from_version, "COMMIT", fence=fence, reason="",
            status=status, may_be=ALLOWED_FROM[_S.COMMITTED] & (
                frozenset({_S.PREPARED}) if kind == TxnKind.ROLLOUT else EVER_ACTIVE),
            previous_to=(_S.SUPERSEDED if kind == TxnKind.ROLLOUT else _S.ROLLED_BACK).value,
        )  # fmt: skip
        routes.committed = True
        log.info("transaction %s: COMMIT at epoch %s", txn_id, epoch)
        done = self._await(
            txn_id,
            RankPhase.COMMITTED,
            set(range(self.tp_size)),
            self._settings.rollout.commit_deadline_s,
            start=acks.last_id,
            stop_when_dead=True,
        )
        t_done = time.perf_counter()
        if done.pending:
            log.warning("transaction %s: rank(s) %s have not acked the commit of version %d "
                        "within %.1fs; they apply it when they next start",
                        txn_id, _ranks(done.pending), version,
                        self._settings.rollout.commit_deadline_s)  # fmt: skip
        return {
            "version": version,
            "txn": txn_id,
            "kind": kind.value,
            "from_version": int(from_version) if from_version else None,
            "epoch": int(epoch),
            "pending_ranks": sorted(done.pending),
            "pruned": self.retention.prune_quietly() if prune else [],
            "timings": {
                "prepare_s": t_prepared - t0,
                "commit_s": t_done - t_prepared,
                "total_s": t_done - t0,
            },
        }

    def _begin(
        self, txn_id: str, version: int, kind: TxnKind, shards: list[dict[str, Any]], *, fence: int
    ) -> tuple[str, str]:
        if kind == TxnKind.ROLLOUT:
            may_be, prepared_status = ALLOWED_FROM[_S.PREPARED], _S.PREPARED.value
        else:
            may_be, prepared_status = EVER_ACTIVE, ""
        begin_epoch, from_version = self._scripts[BEGIN](
            [
                self._keys.update_lock, self._keys.epoch, self._keys.active,
                self._keys.txn(txn_id), self._keys.open_txns, self._keys.version(version),
                self._keys.events, self._keys.rank_commands,
            ],
            [
                fence, txn_id, version, kind.value, repr(time.time()), json.dumps(shards),
                _csv(may_be), prepared_status, EVENTS_MAXLEN, COMMANDS_MAXLEN,
            ],
        )  # fmt: skip
        return begin_epoch, from_version

    def _abort(self, txn_id: str, version: int, kind: TxnKind, *, fence: int, reason: str) -> None:
        rollout = kind == TxnKind.ROLLOUT
        (epoch,) = self._decide(
            txn_id,
            version,
            self._r.hget(self._keys.txn(txn_id), "from_version") or "",
            "ABORT",
            fence=fence,
            reason=reason,
            status=_S.ABORTED.value if rollout else "",
            # Already ABORTED is fine: a pipeline that failed mid-rollout may have marked it, and
            # this decision (which also tells the ranks to drop what they staged) must still go
            # through, or the open transaction would block every later update and restart.
            may_be=ALLOWED_FROM[_S.ABORTED] | {_S.ABORTED} if rollout else frozenset(),
            previous_to="",
        )
        log.warning("transaction %s (version %d): ABORT at epoch %s: %s",
                    txn_id, version, epoch, reason)  # fmt: skip

    def _decide(
        self,
        txn_id: str,
        version: int,
        from_version: str,
        decision: str,
        *,
        fence: int,
        reason: str,
        status: str,
        may_be: frozenset[VersionStatus],
        previous_to: str,
        restore: bool = False,
    ) -> list[Any]:
        previous_key = self._keys.version(int(from_version) if from_version else version)
        return self._scripts[DECIDE](
            [
                self._keys.update_lock, self._keys.epoch, self._keys.active,
                self._keys.txn(txn_id), self._keys.version(version), previous_key,
                self._keys.active_history, self._keys.events, self._keys.rank_commands,
                self._keys.open_txns, self._keys.txn_acks(txn_id),
            ],
            [fence, decision, repr(time.time()), reason, status, _csv(may_be), previous_to,
             EVENTS_MAXLEN, COMMANDS_MAXLEN, "1" if restore else ""],
        )  # fmt: skip

    def _broadcast(self, txn_id: str, command: str, version: int, epoch: int) -> None:
        """Append a command for every rank to the ranks' command stream (a re-sent COMMIT)."""
        fields = {"type": command, "txn": txn_id, "version": version, "epoch": epoch}
        self._r.xadd(self._keys.rank_commands, fields, maxlen=COMMANDS_MAXLEN, approximate=True)

    def _await(
        self,
        txn_id: str,
        phase: RankPhase,
        ranks: set[int],
        deadline_s: float,
        *,
        start: str = "0-0",
        expected: dict[int, str] | None = None,
        stop_when_dead: bool = False,
        instances: dict[int, str] | None = None,
        failure: Callable[[], str | None] | None = None,
    ) -> _Acks:
        """Wait for `phase` acks from `ranks` on the transaction's acks stream.

        In the prepare phase (`expected` given) the first FAILED ack, wrong digest, dead or
        restarted rank (its incarnation differs from `instances`, or from the first look), a
        transport `failure()` (a distributed send that failed), or the deadline is a failure.
        In the commit phase nothing fails: the wait ends at the deadline, or early when every
        rank still owing an ack is dead.
        """
        stream = self._keys.txn_acks(txn_id)
        acks = _Acks(last_id=start, pending=set(ranks))
        end = time.monotonic() + deadline_s
        instances = {} if instances is None else instances
        # The first look comes after one interval: the caller has just looked (before BEGIN), or
        # (commit phase) nothing hurries.
        next_check = time.monotonic() + LIVENESS_CHECK_S
        while acks.pending:
            now = time.monotonic()
            if now >= next_check:
                next_check = now + LIVENESS_CHECK_S
                trouble, dead = self._rank_trouble(acks.pending, instances)
                if trouble and expected is not None:
                    acks.failure = _why(trouble)
                    return acks
                broken = failure() if failure is not None else None
                if broken is not None:
                    acks.failure = broken
                    return acks
                if stop_when_dead and dead == acks.pending:
                    return acks
            remaining = end - now
            if remaining <= 0:
                if expected is not None:
                    acks.failure = (
                        f"rank(s) {_ranks(acks.pending)} did not prepare within "
                        f"{deadline_s:g}s (rollout.prepare_deadline_s)"
                    )
                return acks
            block_ms = max(1, int(min(remaining, LIVENESS_CHECK_S) * 1000))
            reply = self._r.xread({stream: acks.last_id}, block=block_ms)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    acks.last_id = entry_id
                    rank = int(fields["rank"])
                    if fields["phase"] == RankPhase.FAILED.value and expected is not None:
                        acks.failure = f"rank {rank} failed to prepare: {fields['reason']}"
                        return acks
                    if fields["phase"] != phase.value or rank not in acks.pending:
                        continue
                    if expected is not None and fields["digest"] != expected[rank]:
                        acks.failure = (
                            f"rank {rank} staged a shard with digest {fields['digest'][:16]}…, "
                            f"not the version's {expected[rank][:16]}…"
                        )
                        return acks
                    acks.pending.discard(rank)
        return acks

    def _rank_trouble(
        self, ranks: set[int], instances: dict[int, str]
    ) -> tuple[dict[int, str], set[int]]:
        """Why each of `ranks` cannot answer (unregistered, dead, restarted since the first
        look), and which of them are dead (no live heartbeat)."""
        order = sorted(ranks)
        pipe = self._r.pipeline(transaction=False)
        for r in order:
            pipe.exists(self._keys.rank_alive(r))
            pipe.hget(self._keys.rank(r), "instance")
        replies = pipe.execute()
        trouble = {}
        dead = set()
        for i, r in enumerate(order):
            alive, instance = replies[2 * i], replies[2 * i + 1]
            if not alive:
                dead.add(r)
            if instance is None:
                trouble[r] = f"rank {r} has never registered (is its agent running?)"
            elif not alive:
                trouble[r] = (
                    f"rank {r} is not alive (no heartbeat for "
                    f"{self._settings.ranks.heartbeat_timeout_s:g}s)"
                )
            elif instances.setdefault(r, instance) != instance:
                trouble[r] = f"rank {r} restarted and lost the transaction's commands"
        return trouble, dead


def _why(trouble: dict[int, str]) -> str:
    return "; ".join(trouble[r] for r in sorted(trouble))


def _ranks(ranks: set[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))
