"""Which way each rank's shard travels in a transaction, and keeping the daemon's buffers alive
until it is decided.

Per rank, the first route that applies (`ranks.transport`: auto | ipc | distributed | http):
1. `resident`: the rank holds this very version as its previous one (a rollback, or a re-commit
   of the version just rolled back from) with the same digest: no bytes move at all.
2. `cuda_ipc` / `shm`: the daemon has the version's buffers (a rollout from the pipeline) and the
   rank runs on this host: a CUDA IPC handle of the GPU buffer when the rank is on a GPU, else
   the bytes in a shared-memory file (CPU ranks, as in CI). With `auto` and `ipc` only.
3. `distributed`: the daemon has the buffers and the rank is on another host (`auto`), or any
   host (`distributed`): sent over torch.distributed (rollout/dist_links.py), NCCL or gloo.
   `auto` falls back to the artifact for a rank that advertises no torch.distributed address
   or whose group could not be formed before; `distributed` refuses the plan instead.
4. `artifact`: the stored artifact, read from disk where the rank can, else streamed over HTTP.
   Only when it is durable; else the plan is refused (Conflict) and nothing was sent.
The handles are released, and the distributed sends finished or walked away from, when the
`RoutePlan` closes: after the decision, when every rank that will ever copy from them has acked
(or the transaction was aborted).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.data.ipc import Exported, SharedBuffer
from orchestrator.errors import Conflict
from orchestrator.rollout.dist_links import DistLinks, DistSend
from orchestrator.settings import Settings
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.keys import Keys

if TYPE_CHECKING:
    from orchestrator.data.flat import FlatShard
    from orchestrator.state.versions import VersionRecord

log = logging.getLogger("refitd.routes")


@dataclass
class RoutePlan:
    """Every rank's PREPARE entry, and what must stay alive while ranks copy from it."""

    entries: list[dict[str, Any]]
    exported: Exported = field(default_factory=Exported)
    dist: DistLinks | None = None
    sends: list[DistSend] = field(default_factory=list)
    committed: bool = False

    def start(self) -> None:
        """Start the distributed sends (once the PREPARE is out)."""
        if self.dist is not None and self.sends:
            self.dist.start(self.sends)

    def failure(self) -> str | None:
        """Why a distributed send failed, once one has; None otherwise."""
        return self.dist.failure(self.sends) if self.dist is not None else None

    def close(self) -> None:
        self.exported.release()
        if self.dist is not None:
            self.dist.finish(self.sends, committed=self.committed)
            self.sends = []

    def __enter__(self) -> RoutePlan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def routes(self) -> list[str]:
        return [e["via"] for e in self.entries]


class Routes:
    """Plans routes from what the ranks report in their hashes (host, device, previous version)."""

    def __init__(
        self, client: redis.Redis, keys: Keys, settings: Settings, artifacts: ArtifactStore
    ) -> None:
        self._r = client
        self._keys = keys
        self._settings = settings
        self._artifacts = artifacts
        self._host = socket.gethostname()
        self.dist = DistLinks(settings)

    def needs_artifact(self) -> list[int]:
        """The ranks that would have to read an artifact if a rollout with in-memory buffers
        began now (other hosts, or `ranks.transport: http`): the pipeline then writes the
        artifact before the rollout instead of after it."""
        return [
            r
            for r, info in enumerate(self._rank_info())
            if not self._local(info) and not self._distributed(r, info, quiet=True)
        ]

    def plan(
        self, version: int, record: VersionRecord, shards: Sequence[FlatShard] | None
    ) -> RoutePlan:
        """Each rank's route for `version`; Conflict (nothing sent, nothing kept) when a rank has
        none."""
        tp_size = self._settings.ranks.tp_size
        layout = record.layout
        if not layout or len(layout.get("ranks", [])) != tp_size:
            have = "no" if not layout else f"{len(layout.get('ranks', []))} ranks in its"
            raise Conflict(
                f"version {version} has {have} layout record, but ranks.tp_size is {tp_size}"
            )
        if shards is not None and len(shards) != tp_size:
            raise ValueError(f"{len(shards)} shards for {tp_size} ranks")
        digests = [r["digest"] for r in sorted(layout["ranks"], key=lambda r: r["rank"])]
        artifact = self._artifact(version, record)
        plan = RoutePlan(entries=[], dist=self.dist)
        try:
            for rank, info in enumerate(self._rank_info()):
                entry = self._route(rank, info, version, digests[rank], shards, artifact, plan)
                plan.entries.append({"digest": digests[rank], **entry})
        except BaseException:
            plan.close()
            raise
        return plan

    def _route(
        self,
        rank: int,
        info: dict[str, str],
        version: int,
        digest: str,
        shards: Sequence[FlatShard] | None,
        artifact: dict[int, dict[str, Any]] | None,
        plan: RoutePlan,
    ) -> dict[str, Any]:
        if info.get("previous_version") == str(version) and info.get("previous_digest") == digest:
            return {"via": "resident"}
        if shards is not None and self._local(info):
            return self._ipc(shards[rank], info, plan)
        if shards is not None and self._distributed(rank, info):
            entry, send = self.dist.plan(rank, info, version, shards[rank].buffer)
            plan.sends.append(send)
            return entry
        if self._settings.ranks.transport == "ipc":
            raise Conflict(
                f"ranks.transport is ipc, but rank {rank} runs on {info.get('host') or '?'}, not "
                f"on this host ({self._host})"
            )
        if artifact is not None:
            entry = artifact[rank]
            return {"via": "artifact", "path": entry["path"], "bytes": entry["bytes"]}
        if shards is None:
            why = ""
        elif info.get("host") != self._host:
            why = " (it runs on another host and cannot take the distributed route)"
        else:
            why = " (ranks.transport is http)"
        raise Conflict(
            f"rank {rank}{why} needs the artifact of version {version}, which is not stored "
            "(never written, or pruned by rollout.retention)"
        )

    def _ipc(self, shard: FlatShard, info: dict[str, str], plan: RoutePlan) -> dict[str, Any]:
        buffer = shard.buffer
        if buffer.is_cuda and info.get("device", "").startswith("cuda"):
            return {"via": "cuda_ipc", "handle": plan.exported.export(buffer)}
        # CPU ranks: the bytes go through a shared-memory file (one host copy).
        shared = SharedBuffer.create(buffer.numel())
        shared.tensor.copy_(buffer)
        return {"via": "shm", "handle": plan.exported.export(shared)}

    def _local(self, info: dict[str, str]) -> bool:
        transport = self._settings.ranks.transport
        return transport in ("auto", "ipc") and info.get("host") == self._host

    def _distributed(self, rank: int, info: dict[str, str], *, quiet: bool = False) -> bool:
        transport = self._settings.ranks.transport
        if transport not in ("auto", "distributed"):
            return False
        why = self.dist.unusable(rank, info)
        if why is None:
            return True
        if transport == "distributed" and not quiet:
            raise Conflict(f"ranks.transport is distributed, but rank {rank} {why}")
        if not quiet:
            log.warning("rank %d %s: it gets the artifact instead", rank, why)
        return False

    def _rank_info(self) -> list[dict[str, str]]:
        names = ("host", "device", "previous_version", "previous_digest", "instance", "dist_host")
        pipe = self._r.pipeline(transaction=False)
        for r in range(self._settings.ranks.tp_size):
            pipe.hmget(self._keys.rank(r), *names)
        return [{k: v or "" for k, v in zip(names, reply, strict=True)} for reply in pipe.execute()]

    def _artifact(self, version: int, record: VersionRecord) -> dict[int, dict[str, Any]] | None:
        info = record.artifact
        if not info or not self._artifacts.exists(version):
            return None
        return {entry["rank"]: entry for entry in info["ranks"]}
