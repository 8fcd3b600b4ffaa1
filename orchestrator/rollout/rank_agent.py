"""A rank agent (`refitd rank --rank R`): holds one TP rank's shard and follows the coordinator.

Life of an agent:
1. Register in its rank hash with a fresh `instance` token (so the coordinator can tell a
   restarted agent from the one it sent commands to) and start heartbeating: a key that expires
   after ranks.heartbeat_timeout_s, refreshed every ranks.heartbeat_interval_s.
2. Note the end of the ranks' command stream, then load the active version (so a restarted rank
   serves the active version, never a staged or an older one) and ack the commit that made it
   active. Commands that came before step 2 were for the previous incarnation and are skipped.
3. Serve commands from the stream, in order:
   - PREPARE: refused if its epoch is older than the current epoch (its transaction was decided
     while this agent was stopped or slow). Else fetch this rank's shard (the daemon's file when
     readable, or GET /artifacts/V/R, per ranks.fetch), check size and sha256 of the bytes, stage
     them through the adapter, and ack PREPARED with the tensor digest of what is staged. The ack
     script refuses it, too, if a decision happened meanwhile; the staged shard is then dropped.
   - COMMIT: refused if its epoch is older than that of the version held. Swap the staged shard
     in (or load the version, if this agent restarted after preparing), ack COMMITTED. Repeats are
     acked again and change nothing.
   - ABORT: drop the staged shard of that transaction.
A command that fails on a Redis outage is retried until Redis answers again.

torch, safetensors and httpx are imported after registration, so the agent is visible (and
heartbeating) at once.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.errors import (
    ConfigError,
    FencedOut,
    InvalidUpdate,
    NotFound,
    RefitError,
    StaleTransition,
)
from orchestrator.rollout.txn import ACK, RankPhase
from orchestrator.settings import Settings
from orchestrator.state.keys import Keys
from orchestrator.state.lua import ScriptRegistry
from orchestrator.state.redis_client import connect
from orchestrator.state.versions import EVENTS_MAXLEN

if TYPE_CHECKING:
    import httpx

    from orchestrator.rollout.adapters import EngineAdapter

log = logging.getLogger("refitd.rank")

_READ_BLOCK_MS = 1000
_RETRY_S = 0.2
_LOAD_RETRY_S = 1.0
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class RankState(StrEnum):
    """Values of the rank hash's `state` field."""

    STARTING = "STARTING"
    READY = "READY"
    PREPARED = "PREPARED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


def artifact_base_url(settings: Settings) -> str:
    """Where the daemon serves shards: ranks.artifact_url, else its own listen address."""
    if settings.ranks.artifact_url:
        return settings.ranks.artifact_url.rstrip("/")
    host = settings.server.host
    # A daemon listening on every address is reached on loopback from its own host.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}"


def _bearer(settings: Settings) -> dict[str, str]:
    token = settings.auth.trainer_token or settings.auth.admin_token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}


def fetch_shard(
    settings: Settings,
    version: int,
    rank: int,
    entry: dict[str, Any],
    *,
    http: httpx.Client | None = None,
) -> bytes:
    """One rank's shard bytes of `version`, checked against the artifact record `entry`
    (`path`, `bytes`, `digest`). Reads the file when ranks.fetch allows and it is readable, else
    GETs it from the daemon. Raises InvalidUpdate when size or digest differ."""
    path = Path(entry["path"])
    mode = settings.ranks.fetch
    if mode == "path" or (mode == "auto" and os.access(path, os.R_OK)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"shard file {path} does not exist") from None
        source = str(path)
    else:
        data = _http_get(settings, version, rank, http)
        source = f"{artifact_base_url(settings)}/artifacts/{version}/{rank}"
    if len(data) != entry["bytes"]:
        raise InvalidUpdate(
            f"shard of version {version} for rank {rank} from {source} has {len(data)} bytes, "
            f"the artifact {entry['bytes']}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["digest"]:
        raise InvalidUpdate(
            f"shard of version {version} for rank {rank} from {source} has sha256 "
            f"{digest[:16]}…, the artifact {entry['digest'][:16]}…"
        )
    return data


def _http_get(settings: Settings, version: int, rank: int, http: httpx.Client | None) -> bytes:
    import httpx

    url = f"{artifact_base_url(settings)}/artifacts/{version}/{rank}"
    client = http or httpx.Client(timeout=settings.rollout.prepare_deadline_s)
    try:
        with client.stream("GET", url, headers=_bearer(settings)) as response:
            if response.status_code != 200:
                response.read()
                raise RefitError(f"GET {url} answered {response.status_code}: {response.text}")
            return b"".join(response.iter_bytes())
    except httpx.HTTPError as exc:
        raise RefitError(f"GET {url} failed: {exc}") from None
    finally:
        if http is None:
            client.close()


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
        self.digest = ""
        self.staged_txn: str | None = None
        self._stop = threading.Event()
        self._adapter: EngineAdapter | None = None
        self._http: httpx.Client | None = None
        self._r: redis.Redis | None = None

    # Lifecycle -----------------------------------------------------------------------------
    def run(self) -> None:
        """Register, load the active version, then serve commands until stopped."""
        self._r = connect(self.settings.redis.url, wait_s=self.settings.redis.start_timeout_s)
        self._scripts = ScriptRegistry(self._r)
        self._register()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        try:
            cursor = self._retry(self._commands_tail)
            from orchestrator.rollout.adapters import make_adapter

            self._adapter = make_adapter(self.settings.ranks.device, self.rank)
            # Imported now, not at the first PREPARE, whose deadline should not pay for it.
            import safetensors.torch  # noqa: F401

            if self.settings.ranks.fetch != "path":
                import httpx  # noqa: F401
            self._load_active_until_done()
            log.info("rank %d ready: version %s (epoch %d)",
                     self.rank, self.adapter.active_version, self.epoch)  # fmt: skip
            self._serve(cursor)
        finally:
            self._stop.set()
            beat.join(timeout=2)
            with contextlib.suppress(redis.RedisError, OSError):
                self._deregister()
            if self._http is not None:
                self._http.close()

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

    def _register(self) -> None:
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.rank(self.rank),
            mapping={
                "instance": self.instance, "pid": os.getpid(), "host": socket.gethostname(),
                "started_at": now, "heartbeat": now, "state": RankState.STARTING,
                "version": "", "digest": "", "epoch": 0, "reason": "",
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

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.ranks.heartbeat_interval_s):
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.set(self.keys.rank_alive(self.rank), self.instance, px=self._alive_ms)
                pipe.hset(self.keys.rank(self.rank), "heartbeat", repr(time.time()))
                pipe.execute()
            except (redis.RedisError, OSError) as exc:
                log.warning("rank %d: heartbeat failed: %s", self.rank, exc)

    def _retry(self, step: Any, *args: Any) -> Any:
        """Run `step` until Redis answers (the agent outlives Redis restarts)."""
        while True:
            try:
                return step(*args)
            except _REDIS_DOWN as exc:
                if self._stop.is_set():
                    raise
                log.warning("rank %d: Redis does not answer (%s); retrying", self.rank, exc)
                time.sleep(_RETRY_S)

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
            self._publish_held(version="")
            return
        version, epoch, txn = int(active["version"]), int(active["epoch"]), active.get("txn", "")
        if self.adapter.active_version != version:
            self._apply(version, self._artifact_entry(version))
        self.epoch = epoch
        self._ack_commit(txn, version, epoch)
        self._event(self.redis, "LOADED", version=version, epoch=epoch)

    def _artifact_entry(self, version: int) -> dict[str, Any]:
        raw = self.redis.hget(self.keys.version(version), "artifact")
        if not raw:
            raise NotFound(f"version {version} has no artifact record")
        for entry in json.loads(raw)["ranks"]:
            if entry["rank"] == self.rank:
                return entry  # type: ignore[no-any-return]
        raise NotFound(f"version {version} has no shard for rank {self.rank}")

    def _fetch_tensors(self, version: int, entry: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import load

        if self._http is None and self.settings.ranks.fetch != "path":
            import httpx

            self._http = httpx.Client(timeout=self.settings.rollout.prepare_deadline_s)
        data = fetch_shard(self.settings, version, self.rank, entry, http=self._http)
        return load(data)

    def _apply(self, version: int, entry: dict[str, Any]) -> None:
        """Load `version` straight into the active slot (start-up, or a commit not staged)."""
        self.adapter.stage(version, self._fetch_tensors(version, entry))
        self.digest = self.adapter.commit(version)
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
        try:
            digest = self.adapter.stage(version, self._fetch_tensors(version, entry))
        except Exception as exc:
            # Whatever goes wrong while preparing is this rank's answer, not the agent's end.
            self.adapter.discard()
            self.staged_txn = None
            reason = exc.message if isinstance(exc, RefitError) else repr(exc)
            log.error("rank %d: prepare of version %d failed: %s", self.rank, version, reason)
            try:
                self._ack(txn, RankPhase.FAILED, epoch, "", reason)
            except (FencedOut, StaleTransition, NotFound) as refused:
                self._refuse(cmd, refused.message)
            return
        try:
            self._ack(txn, RankPhase.PREPARED, epoch, digest)
        except (FencedOut, StaleTransition, NotFound) as refused:
            self.adapter.discard()
            self.staged_txn = None
            self._refuse(cmd, refused.message)
            self._publish_held()

    def _commit(self, cmd: dict[str, str]) -> None:
        txn, version, epoch = cmd["txn"], int(cmd["version"]), int(cmd["epoch"])
        if epoch < self.epoch:
            self._refuse(cmd, f"COMMIT carries epoch {epoch} but this rank holds version "
                         f"{self.adapter.active_version} from epoch {self.epoch}")  # fmt: skip
            return
        if self.adapter.active_version == version and self.epoch == epoch:
            pass  # a repeated COMMIT: ack again below
        elif self.adapter.staged_version == version and self.staged_txn == txn:
            self.digest = self.adapter.commit(version)
            self.staged_txn = None
        else:
            # Restarted after preparing (or never got PREPARE): the decision stands, so load it.
            try:
                self._apply(version, self._artifact_entry(version))
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
        self.adapter.discard()
        self.staged_txn = None
        self._publish_held()

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
                self._ack(txn, RankPhase.COMMITTED, epoch, self.digest)
                return
        except (FencedOut, StaleTransition, NotFound):
            pass
        self._publish_held()

    def _publish_held(self, version: str | int | None = None) -> None:
        held = self.adapter.active_version if version is None else version
        self.redis.hset(
            self.keys.rank(self.rank),
            mapping={
                "state": RankState.READY, "version": "" if held is None else held,
                "digest": self.digest if held not in ("", None) else "", "epoch": self.epoch,
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
