"""A rank agent (`refitd rank --rank R`): holds one TP rank's shard and follows the coordinator.

Life of an agent:
1. Register in its rank hash with a fresh `instance` token (so the coordinator can tell a
   restarted agent from the one it sent commands to), its host and device, and start its
   heartbeat process (rollout/heartbeat.py: a key that expires after ranks.heartbeat_timeout_s,
   refreshed every ranks.heartbeat_interval_s, from a process the agent's own work cannot starve).
2. Note the end of the ranks' command stream, then load the active version from its artifact
   (so a restarted rank serves the active version, never a staged or an older one; if that
   artifact is not durable yet, it waits for it) and ack the commit that made it active.
   Commands that came before step 2 were for the previous incarnation and are skipped.
3. Serve commands from the stream, in order:
   - PREPARE: refused if its epoch is older than the current epoch (its transaction was decided
     while this agent was stopped or slow). Else receive this rank's shard by the route the
     command names (rollout/receive.py: CUDA IPC, shared memory, torch.distributed, the
     resident previous version, or the artifact), check its digest on the device, stage it,
     and ack PREPARED with that digest. The ack script refuses it, too, if a decision happened
     meanwhile; the staged shard is then dropped. A distributed receive also stops as soon as
     the transaction is decided.
   - COMMIT: refused if its epoch is older than that of the version held. The staged shard
     becomes active (the active one stays resident as the previous version) and the engine is
     told (adapters.py); or the version is loaded from its artifact, if this agent restarted
     after preparing. Ack COMMITTED. Repeats are acked again and change nothing.
   - ABORT: drop the staged shard of that transaction (and the torch.distributed group that
     brought it: the daemon drops its side after any abort).
A command that fails on a Redis outage is retried until Redis answers again (logged once per
outage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from enum import StrEnum
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.errors import (
    ConfigError,
    FencedOut,
    NotFound,
    RefitError,
    StaleTransition,
)
from orchestrator.rollout.heartbeat import Heartbeat
from orchestrator.rollout.txn import ACK, RankPhase
from orchestrator.settings import Settings
from orchestrator.state.keys import Keys
from orchestrator.state.lua import ScriptRegistry
from orchestrator.state.redis_client import OutageLog, connect, keep_trying
from orchestrator.state.versions import EVENTS_MAXLEN

if TYPE_CHECKING:
    from orchestrator.rollout.adapters import EngineAdapter
    from orchestrator.rollout.receive import Receiver
    from orchestrator.rollout.slots import ShardSlots

log = logging.getLogger("refitd.rank")

_READ_BLOCK_MS = 1000
_LOAD_RETRY_S = 1.0
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class RankState(StrEnum):
    """Values of the rank hash's `state` field."""

    STARTING = "STARTING"
    READY = "READY"
    PREPARED = "PREPARED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class RankAgent:
    """One TP rank's agent. `run()` serves until SIGTERM/SIGINT (or `stop()`)."""

    def __init__(self, settings: Settings, rank: int) -> None:
        if settings.embedded_redis:
            raise ConfigError(
                "a rank agent needs redis.url to point at the daemon's Redis (REFITD_REDIS__URL); "
                "'embedded' is only meaningful for refitd serve"
            )
        self.settings = settings
        self.rank = rank
        self.keys = Keys(settings.redis.key_prefix)
        self.instance = secrets.token_hex(8)
        self.epoch = 0
        self.staged_txn: str | None = None
        self._stop = threading.Event()
        self._staged_via = ""
        self._adapter: EngineAdapter | None = None
        self._slots: ShardSlots | None = None
        self._receiver: Receiver | None = None
        self._heartbeat: Heartbeat | None = None
        self._r: redis.Redis | None = None
        self._outage = OutageLog(log, f"rank {rank}")

    # Lifecycle -----------------------------------------------------------------------------
    def run(self) -> None:
        """Register, load the active version, then serve commands until stopped."""
        from orchestrator.rollout.adapters import resolve_device

        device = resolve_device(self.settings.ranks.device, self.rank)
        self._r = connect(self.settings.redis.url, wait_s=self.settings.redis.start_timeout_s)
        self._scripts = ScriptRegistry(self._r)
        self._register(device)
        self._heartbeat = Heartbeat(
            url=self.settings.redis.url,
            key=self.keys.rank_alive(self.rank),
            value=self.instance,
            interval_s=self.settings.ranks.heartbeat_interval_s,
            ttl_s=self.settings.ranks.heartbeat_timeout_s,
        )
        self._heartbeat.start()
        try:
            cursor = self._retry(self._commands_tail)
            # Imported now (after registering, so the agent is visible at once), not at the
            # first PREPARE, whose deadline should not pay for torch and CUDA.
            from orchestrator.rollout.adapters import make_adapter
            from orchestrator.rollout.receive import Receiver
            from orchestrator.rollout.slots import ShardSlots

            self._adapter = make_adapter()
            self._slots = ShardSlots(keep_previous=self.settings.ranks.keep_previous)
            self._receiver = Receiver(self.settings, self.rank, device)
            self._load_active_until_done()
            log.info("rank %d ready on %s: version %s (epoch %d)",
                     self.rank, device, self.adapter.served_version, self.epoch)  # fmt: skip
            self._serve(cursor)
        finally:
            self._stop.set()
            if self._heartbeat is not None:
                self._heartbeat.stop()
            with contextlib.suppress(redis.RedisError, OSError):
                self._deregister()
            if self._receiver is not None:
                self._receiver.close()

    def stop(self) -> None:
        self._stop.set()

    @property
    def redis(self) -> redis.Redis:
        assert self._r is not None
        return self._r

    @property
    def adapter(self) -> EngineAdapter:
        assert self._adapter is not None
        return self._adapter

    @property
    def slots(self) -> ShardSlots:
        assert self._slots is not None
        return self._slots

    @property
    def receiver(self) -> Receiver:
        assert self._receiver is not None
        return self._receiver

    def _register(self, device: str) -> None:
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.rank(self.rank),
            mapping={
                "instance": self.instance, "pid": os.getpid(), "host": socket.gethostname(),
                "dist_host": self.settings.ranks.dist_host or socket.gethostname(),
                "device": device, "started_at": now, "state": RankState.STARTING,
                "transport": "",
                "version": "", "digest": "", "epoch": 0, "reason": "",
                "previous_version": "", "previous_digest": "",
                "staged_version": "", "staged_txn": "", "staged_digest": "",
            },
        )  # fmt: skip
        pipe.set(self.keys.rank_alive(self.rank), self.instance, px=self._alive_ms)
        self._event(pipe, RankState.STARTING, reason=f"pid {os.getpid()}")
        pipe.execute()

    def _deregister(self) -> None:
        # A newer agent for this rank may already have registered: leave its state alone.
        if self.redis.hget(self.keys.rank(self.rank), "instance") != self.instance:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.rank(self.rank), "state", RankState.STOPPED)
        pipe.delete(self.keys.rank_alive(self.rank))
        self._event(pipe, RankState.STOPPED)
        pipe.execute()

    @property
    def _alive_ms(self) -> int:
        return max(1, int(self.settings.ranks.heartbeat_timeout_s * 1000))

    def _retry(self, step: Any, *args: Any) -> Any:
        """Run `step` until Redis answers (the agent outlives Redis restarts); an outage is
        logged once when it starts and once when it ends."""
        return keep_trying(lambda: step(*args), outage=self._outage, stop=self._stop)

    # Loading the active version ------------------------------------------------------------
    def _commands_tail(self) -> str:
        last = self.redis.xrevrange(self.keys.rank_commands, count=1)
        return str(last[0][0]) if last else "0-0"

    def _load_active_until_done(self) -> None:
        while not self._stop.is_set():
            try:
                self._retry(self._load_active)
                return
            except Exception as exc:
                # A rank that cannot load the active version keeps heartbeating and says why;
                # exiting would only have the supervisor restart it into the same failure.
                reason = exc.message if isinstance(exc, RefitError) else repr(exc)
                log.error("rank %d cannot load the active version: %s", self.rank, reason)
                with contextlib.suppress(redis.RedisError, OSError):
                    self.redis.hset(self.keys.rank(self.rank), mapping={
                        "state": RankState.FAILED, "reason": reason})  # fmt: skip
                self._stop.wait(_LOAD_RETRY_S)

    def _load_active(self) -> None:
        active = self.redis.hgetall(self.keys.active)
        if not active.get("version"):
            self._publish_held()
            return
        version, epoch, txn = int(active["version"]), int(active["epoch"]), active.get("txn", "")
        if self.adapter.served_version != version:
            self._load(version)
        self.epoch = epoch
        # The event before the ack: the ack makes the rank READY, and whoever sees it ready may
        # look for the event.
        self._event(self.redis, "LOADED", version=version, epoch=epoch)
        self._ack_commit(txn, version, epoch)

    def _version_record(self, version: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """This rank's entries of `version`'s layout and (once durable) artifact records."""
        raw = self.redis.hmget(self.keys.version(version), "layout", "artifact")
        if not raw[0]:
            raise NotFound(f"version {version} has no layout record")
        layout = _rank_entry(json.loads(raw[0]), self.rank, version, "layout")
        artifact = (
            _rank_entry(json.loads(raw[1]), self.rank, version, "artifact") if raw[1] else None
        )
        return layout, artifact

    def _load(self, version: int) -> None:
        """Load `version` from its artifact straight into the active slot."""
        layout, artifact = self._version_record(version)
        if artifact is None:
            # Durability rule (README): the daemon writes a committed version's artifact right
            # after the commit; until it is durable, a restarted rank waits for it.
            raise NotFound(f"the artifact of version {version} is not durable yet; waiting for it")
        held = self.receiver.load_artifact(version, artifact, layout)
        self.slots.load(held)
        self.adapter.apply(version, held.shard.views())
        self.staged_txn = None

    # Commands ------------------------------------------------------------------------------
    def _serve(self, cursor: str) -> None:
        while not self._stop.is_set():
            reply = self._retry(self._read, cursor)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    self._retry(self._handle, fields)
                    cursor = entry_id

    def _read(self, cursor: str) -> Any:
        return self.redis.xread({self.keys.rank_commands: cursor}, count=16, block=_READ_BLOCK_MS)

    def _handle(self, cmd: dict[str, str]) -> None:
        kind = cmd.get("type")
        if kind == "PREPARE":
            self._prepare(cmd)
        elif kind == "COMMIT":
            self._commit(cmd)
        elif kind == "ABORT":
            self._abort(cmd)
        else:
            log.error("rank %d: unknown command %r", self.rank, cmd)

    def _prepare(self, cmd: dict[str, str]) -> None:
        txn, version, epoch = cmd["txn"], int(cmd["version"]), int(cmd["epoch"])
        current = int(self.redis.get(self.keys.epoch) or 0)
        if epoch < current:
            self._refuse(cmd, f"PREPARE carries epoch {epoch} but the current epoch is {current}")
            return
        shards = json.loads(cmd["shards"])
        if self.rank >= len(shards):
            self._refuse(cmd, f"the transaction has {len(shards)} ranks (ranks.tp_size differs)")
            return
        # No 'preparing' state is written here: with appendfsync always, every write is an fsync
        # on the rollout's critical path, and the ack below says all that matters.
        self.staged_txn = txn
        entry = shards[self.rank]
        # How this transaction's shard travels: an abort drops the torch.distributed group only
        # when it did, as the daemon drops only the groups the transaction sent over (a
        # rollback, `resident`, must leave the kept group in place on both sides).
        self._staged_via = str(entry.get("via", ""))
        try:
            layout, _ = self._version_record(version)
            held = self.receiver.receive(
                version, entry, layout, self.slots, cancelled=lambda: self._decided(txn)
            )
            self.slots.stage(held)
        except Exception as exc:
            # Whatever goes wrong while preparing is this rank's answer, not the agent's end.
            self.slots.discard()
            self.staged_txn = None
            reason = exc.message if isinstance(exc, RefitError) else repr(exc)
            log.error("rank %d: prepare of version %d failed: %s", self.rank, version, reason)
            try:
                self._ack(txn, RankPhase.FAILED, epoch, "", reason)
            except (FencedOut, StaleTransition, NotFound) as refused:
                self._refuse(cmd, refused.message)
            return
        try:
            self._ack(txn, RankPhase.PREPARED, epoch, held.digest)
        except (FencedOut, StaleTransition, NotFound) as refused:
            self.slots.discard()
            self.staged_txn = None
            self._refuse(cmd, refused.message)
            self._publish_held()

    def _commit(self, cmd: dict[str, str]) -> None:
        txn, version, epoch = cmd["txn"], int(cmd["version"]), int(cmd["epoch"])
        if epoch < self.epoch:
            self._refuse(cmd, f"COMMIT carries epoch {epoch} but this rank holds version "
                         f"{self.adapter.served_version} from epoch {self.epoch}")  # fmt: skip
            return
        staged = self.slots.staged
        if self.adapter.served_version == version and self.epoch == epoch:
            pass  # a repeated COMMIT: ack again below
        elif (staged is not None and staged.version == version and self.staged_txn == txn) or (
            self.slots.stage_previous(version) is not None
        ):
            # Staged by this transaction's PREPARE, or (a restore by recovery, which sends no
            # PREPARE it waits for) held resident as the previous version.
            held = self.slots.commit()
            self.adapter.apply(version, held.shard.views())
            self.staged_txn = None
        else:
            # Restarted after preparing (or never got PREPARE): the decision stands, so load it.
            try:
                self._load(version)
            except _REDIS_DOWN:
                raise
            except Exception as exc:
                log.error(
                    "rank %d cannot apply the commit of version %d: %r", self.rank, version, exc
                )
                self._load_active_until_done()
                return
        self.epoch = epoch
        self._ack_commit(txn, version, epoch)

    def _abort(self, cmd: dict[str, str]) -> None:
        if self.staged_txn != cmd["txn"]:
            return
        self.slots.discard()
        self.staged_txn = None
        if self._staged_via == "distributed":
            self.receiver.dist.drop()
        self._publish_held()

    def _decided(self, txn: str) -> str | None:
        """The decision on `txn`, once there is one (a receive in progress then stops)."""
        try:
            decision = self.redis.hget(self.keys.txn(txn), "decision")
        except _REDIS_DOWN:
            return None
        return f"transaction {txn} was decided: {decision}" if decision else None

    # Answers -------------------------------------------------------------------------------
    def _ack(self, txn: str, phase: RankPhase, epoch: int, digest: str, reason: str = "") -> None:
        self._scripts[ACK](
            [
                self.keys.txn(txn), self.keys.epoch, self.keys.rank(self.rank),
                self.keys.txn_acks(txn), self.keys.open_txns, self.keys.events,
            ],
            [txn, self.rank, phase.value, epoch, digest, reason, repr(time.time()), EVENTS_MAXLEN],
        )  # fmt: skip

    def _ack_commit(self, txn: str, version: int, epoch: int) -> None:
        """Ack the commit that made `version` active; when its transaction is closed (or this
        is a start-up load of an old decision), just publish what is held."""
        try:
            if txn:
                self._ack(txn, RankPhase.COMMITTED, epoch, self._active_digest())
                self._publish_previous()
                return
        except (FencedOut, StaleTransition, NotFound):
            pass
        self._publish_held()

    def _active_digest(self) -> str:
        active = self._slots.active if self._slots is not None else None
        return active.digest if active is not None else ""

    def _publish_previous(self) -> None:
        previous = self.slots.previous
        self.redis.hset(self.keys.rank(self.rank), mapping={
            "previous_version": "" if previous is None else previous.version,
            "previous_digest": "" if previous is None else previous.digest,
            "transport": self._transport(),
        })  # fmt: skip

    def _transport(self) -> str:
        active = self._slots.active if self._slots is not None else None
        return active.via if active is not None else ""

    def _publish_held(self) -> None:
        active = self._slots.active if self._slots is not None else None
        previous = self._slots.previous if self._slots is not None else None
        self.redis.hset(
            self.keys.rank(self.rank),
            mapping={
                "state": RankState.READY,
                "version": "" if active is None else active.version,
                "digest": "" if active is None else active.digest, "epoch": self.epoch,
                "previous_version": "" if previous is None else previous.version,
                "previous_digest": "" if previous is None else previous.digest,
                "transport": self._transport(),
                "reason": "", "staged_version": "", "staged_txn": "", "staged_digest": "",
            },
        )  # fmt: skip

    def _refuse(self, cmd: dict[str, str], reason: str) -> None:
        log.warning("rank %d refused %s of transaction %s: %s",
                    self.rank, cmd.get("type"), cmd.get("txn"), reason)  # fmt: skip
        self._event(self.redis, "REFUSED", version=cmd.get("version", ""),
                    epoch=cmd.get("epoch", ""), txn=cmd.get("txn", ""),
                    reason=f"{cmd.get('type')}: {reason}")  # fmt: skip

    def _event(self, client: Any, to: str, **fields: Any) -> None:
        entry = {"kind": "rank", "rank": self.rank, "to": to, "instance": self.instance}
        entry.update({k: "" if v is None else v for k, v in fields.items()})
        client.xadd(self.keys.events, entry, maxlen=EVENTS_MAXLEN, approximate=True)


def _rank_entry(record: dict[str, Any], rank: int, version: int, what: str) -> dict[str, Any]:
    for entry in record.get("ranks", []):
        if entry["rank"] == rank:
            return entry  # type: ignore[no-any-return]
    raise NotFound(f"version {version}'s {what} record has no entry for rank {rank}")


def run_rank_agent(settings: Settings, rank: int) -> None:
    """Run rank `rank`'s agent in this process until SIGTERM or SIGINT, then exit the process
    (RefitError from start-up, e.g. Redis unreachable, is raised for the CLI to report)."""
    agent = RankAgent(settings, rank)

    def _exit(signum: int, frame: FrameType | None) -> None:
        agent.stop()
        # Interrupts a blocking XREAD at once; run() deregisters on the way out.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        agent.run()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0
    # The agent has deregistered and holds nothing that needs flushing but its logs; tearing
    # down an interpreter with torch loaded takes about a second, which every restart and every
    # daemon shutdown would wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
