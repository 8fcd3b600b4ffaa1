"""Getting one rank's shard into the rank's memory, by the route its PREPARE names.

Routes (`via` in a PREPARE's per-rank entry; the coordinator picks them, see rollout/routes.py):
- `cuda_ipc`: the daemon's GPU buffer, opened by CUDA IPC and copied device-to-device;
- `shm`: the daemon's buffer in shared memory (CPU ranks on the daemon's host), copied;
- `resident`: the rank's own previous version (a rollback), no copy at all;
- `distributed`: sent by the daemon over torch.distributed (NCCL or gloo; ranks on other hosts),
  received in buckets straight into the staging slot (rollout/dist_recv.py);
- `artifact`: the version's safetensors file on disk (when this host can read it and
  `ranks.fetch` allows) or streamed from `GET /artifacts/V/R` into place, never whole in
  Python bytes.
Whatever the route, what arrives is checked against the version's digest on the device before
the rank may ack PREPARED.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.data.files import IterStream, StagingPool, read_shard
from orchestrator.data.flat import FlatShard, empty_like_layout
from orchestrator.data.ipc import open_handle
from orchestrator.errors import InvalidUpdate, NotFound, RefitError
from orchestrator.rollout.dist_recv import DistReceiver
from orchestrator.rollout.slots import Held, ShardSlots
from orchestrator.settings import Settings

if TYPE_CHECKING:
    import httpx

_HTTP_WHERE = "GET /artifacts"


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


class Receiver:
    """One rank's side of every route; holds what it reuses across updates (a pinned staging
    pool for files, an HTTP client)."""

    def __init__(self, settings: Settings, rank: int, device: str) -> None:
        self.settings = settings
        self.rank = rank
        self.device = torch.device(device)
        self._pool: StagingPool | None = None
        self._http: httpx.Client | None = None
        self.dist = DistReceiver(rank, self.device, settings.ranks.dist_host)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self.dist.drop()

    # The routes ---------------------------------------------------------------------------
    def receive(
        self,
        version: int,
        entry: dict[str, Any],
        layout: dict[str, Any],
        slots: ShardSlots,
        cancelled: Callable[[], str | None] | None = None,
    ) -> Held:
        """This rank's shard of `version`, checked against `entry["digest"]`. `layout` is this
        rank's entry of the version's layout record ({digest, nbytes, table}). `cancelled`
        (a reason once the transaction is decided) lets a distributed receive stop early."""
        via = entry.get("via", "artifact")
        if via == "resident":
            held = slots.stage_previous(version)
            if held is None:
                raise InvalidUpdate(
                    f"rank {self.rank} was asked for its resident copy of version {version}, "
                    "but does not hold it"
                )
            self._check(held.digest, entry["digest"], version, "its resident copy")
            return held
        table = FlatShard.layout_from_json(layout["table"])
        nbytes = int(layout["nbytes"])
        if via in ("cuda_ipc", "shm"):
            shard = empty_like_layout(
                table, nbytes, self.device, out=slots.buffer_for(_padded(nbytes), self.device)
            )
            with open_handle(entry["handle"]) as source:
                size = shard.buffer.numel()
                if source.numel() < size:
                    raise InvalidUpdate(
                        f"the {via} buffer of version {version} for rank {self.rank} holds "
                        f"{source.numel()} bytes, the layout needs {size}"
                    )
                shard.buffer.copy_(source[:size], non_blocking=True)
                # The daemon may free its buffer once this rank has acked: finish the copy while
                # the mapping is open.
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
            where = f"the daemon's {via} buffer"
        elif via == "distributed":
            shard = empty_like_layout(
                table, nbytes, self.device, out=slots.buffer_for(_padded(nbytes), self.device)
            )
            try:
                self.dist.receive(entry, shard.buffer, version=version, cancelled=cancelled,
                                  deadline_s=self.settings.rollout.prepare_deadline_s)  # fmt: skip
            except BaseException:
                # A transfer walked away from may still write into the buffer until its deadline.
                slots.drop_spare()
                raise
            where = f"torch.distributed ({entry.get('backend')})"
            via = f"distributed/{entry.get('backend')}"
        elif via == "artifact":
            shard, where = self._from_artifact(version, entry, table)
            via = _artifact_via(where)
        else:
            raise InvalidUpdate(f"unknown route {via!r} for rank {self.rank}")
        digest = shard.digest()
        self._check(digest, entry["digest"], version, where)
        return Held(version=version, shard=shard, digest=digest, via=via)

    def load_artifact(self, version: int, entry: dict[str, Any], layout: dict[str, Any]) -> Held:
        """Version `version` from its stored artifact (start-up, or a commit not staged)."""
        table = FlatShard.layout_from_json(layout["table"])
        shard, where = self._from_artifact(version, entry, table)
        digest = shard.digest()
        self._check(digest, layout["digest"], version, where)
        return Held(version=version, shard=shard, digest=digest, via=_artifact_via(where))

    def _from_artifact(
        self, version: int, entry: dict[str, Any], table: Any
    ) -> tuple[FlatShard, str]:
        if self._pool is None:
            self._pool = StagingPool()
        path = Path(entry["path"])
        mode = self.settings.ranks.fetch
        if mode == "path" or (mode == "auto" and os.access(path, os.R_OK)):
            if not path.exists():
                raise NotFound(f"shard file {path} does not exist")
            return read_shard(path, device=self.device, pool=self._pool, expected=table), str(path)
        return self._http_get(version, table), _HTTP_WHERE

    def _http_get(self, version: int, table: Any) -> FlatShard:
        import httpx

        if self._http is None:
            self._http = httpx.Client(timeout=self.settings.rollout.prepare_deadline_s)
        assert self._pool is not None
        url = f"{artifact_base_url(self.settings)}/artifacts/{version}/{self.rank}"
        try:
            with self._http.stream("GET", url, headers=_bearer(self.settings)) as response:
                if response.status_code != 200:
                    response.read()
                    raise RefitError(f"GET {url} answered {response.status_code}: {response.text}")
                stream = IterStream(response.iter_bytes(1 << 20))
                return read_shard(stream, device=self.device, pool=self._pool, expected=table)
        except httpx.HTTPError as exc:
            raise RefitError(f"GET {url} failed: {exc}") from None

    def _check(self, digest: str, expected: str, version: int, where: str) -> None:
        if digest != expected:
            raise InvalidUpdate(
                f"shard of version {version} for rank {self.rank} from {where} has digest "
                f"{digest[:16]}…, the version's {expected[:16]}…"
            )


def _artifact_via(where: str) -> str:
    return "http" if where == _HTTP_WHERE else "artifact"


def _padded(nbytes: int) -> int:
    return -(-nbytes // 16) * 16
