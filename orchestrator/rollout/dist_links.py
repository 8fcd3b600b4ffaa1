"""The daemon's side of the `distributed` route: one process group per remote rank, and the send
of each rank's shard in the background while the coordinator waits for the ranks' acks.

Groups. The daemon serves a rendezvous store (a TCPStore on a port the OS picks, at
ranks.dist_host) whose address travels in the PREPARE. Each rank that takes this route gets a
group of two (the daemon, the rank) named `<daemon token>.<generation>`; it is formed lazily, on
the first transaction that needs it, and kept while transactions commit. Any failure or abort
drops it on both sides (the rank drops its own on failure or ABORT), and a restarted agent (a new
`instance` in its hash) or a restarted daemon (a new token) means a new generation: the rank
joins whatever group its next PREPARE names, so it rejoins on its own.

Bounds. Each send runs in a `Bounded` thread with the transaction's prepare deadline; nothing
here ever waits for one. The coordinator asks `failure()` while it waits for acks (a rank that
died mid-transfer shows up at once as a send that failed), and `finish()` after the decision
walks away from what is still running.
"""

from __future__ import annotations

import functools
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.data.dist import SENDER, Bounded, Link, backend_available, open_store
from orchestrator.settings import Settings

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

log = logging.getLogger("refitd.dist")


@dataclass
class _Peer:
    """The daemon's group with one rank agent (one incarnation of it)."""

    instance: str
    group: str
    backend: str
    link: Link | None = None
    last: Bounded | None = None


@dataclass
class DistSend:
    """One rank's shard on its way, in one transaction."""

    rank: int
    peer: _Peer
    buffer: torch.Tensor
    version: int
    task: Bounded | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class DistLinks:
    """Groups with the remote ranks and the sends over them (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._host = settings.ranks.dist_host or socket.gethostname()
        self._token = secrets.token_hex(4)
        self._generation = 0
        self._store: dist.TCPStore | None = None
        self._peers: dict[int, _Peer] = {}
        # Ranks (by incarnation) whose group could not be formed: `auto` sends them the artifact.
        self._unformable: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self._settings.ranks.dist_bucket_mb * (1 << 20)))

    def unusable(self, rank: int, info: dict[str, str]) -> str | None:
        """Why rank `rank` cannot take the distributed route now; None when it can."""
        if not info.get("dist_host"):
            return "advertises no torch.distributed address (dist_host in its rank hash)"
        if self._unformable.get(rank) == info.get("instance"):
            return "could not form a torch.distributed group with the daemon in an earlier update"
        try:
            self.store_address()
        except (RuntimeError, OSError) as exc:
            return f"cannot be reached: the daemon's rendezvous store cannot open ({exc})"
        return None

    def store_address(self) -> str:
        if self._store is None:
            self._store = open_store(self._host, self._settings.rollout.prepare_deadline_s)
        return f"{self._host}:{self._store.port}"

    def plan(self, rank: int, info: dict[str, str], version: int, buffer: torch.Tensor) -> tuple[
        dict[str, Any], DistSend
    ]:  # fmt: skip
        """The PREPARE entry for rank `rank` and the send that goes with it (not started)."""
        backend = self._backend(buffer, info)
        instance = info.get("instance", "")
        with self._lock:
            peer = self._peers.get(rank)
            reuse = (
                peer is not None
                and peer.instance == instance
                and peer.backend == backend
                and peer.link is not None
                and peer.last is not None
                and peer.last.ok
            )
            if not reuse:
                if peer is not None:
                    self._drop(rank)
                self._generation += 1
                peer = _Peer(instance, f"{self._token}.{self._generation}", backend)
                self._peers[rank] = peer
            assert peer is not None
        entry = {
            "via": "distributed",
            "store": self.store_address(),
            "group": peer.group,
            "backend": backend,
            "bucket_bytes": self.bucket_bytes,
        }
        return entry, DistSend(rank=rank, peer=peer, buffer=buffer, version=version)

    def start(self, sends: list[DistSend]) -> None:
        """Start every send; each forms its group first if it is new."""
        deadline = time.monotonic() + self._settings.rollout.prepare_deadline_s
        for send in sends:
            send.task = Bounded(functools.partial(self._send, send, deadline),
                                name=f"send-r{send.rank}")  # fmt: skip

    def failure(self, sends: list[DistSend]) -> str | None:
        """Why the first failed send failed; None while none has."""
        for send in sends:
            task = send.task
            if task is not None and task.done and task.error is not None:
                return f"the shard transfer to rank {send.rank} failed: {_reason(task.error)}"
        return None

    def finish(self, sends: list[DistSend], *, committed: bool) -> None:
        """After the decision: keep the groups of a committed transaction whose sends did not
        fail; drop every other one (the ranks drop theirs on ABORT), walking away from the
        sends."""
        with self._lock:
            for send in sends:
                send.peer.last = send.task
                # A send may still be returning from its last wait although its rank has every
                # byte (it acked): keep its group; the next plan reuses it only if it ended well.
                failed = send.task is None or (send.task.done and send.task.error is not None)
                if committed and not failed:
                    continue
                send.stop.set()
                if self._peers.get(send.rank) is send.peer:
                    self._drop(send.rank)
                never_formed = send.peer.link is None and send.task is not None and send.task.done
                if never_formed and self._settings.ranks.transport == "auto":
                    log.warning("rank %d: no torch.distributed group could be formed; its shards "
                                "go by artifact until its agent restarts", send.rank)  # fmt: skip
                    self._unformable[send.rank] = send.peer.instance

    def _send(self, send: DistSend, deadline: float) -> None:
        peer = send.peer
        link = peer.link
        if link is None:
            assert self._store is not None
            link = Link.join(
                self._store, group=peer.group, role=SENDER, backend=peer.backend,
                device=send.buffer.device, bind_host=self._settings.ranks.dist_host,
                deadline=deadline,
            )  # fmt: skip
            with self._lock:
                if send.stop.is_set():
                    link.close()
                    return
                peer.link = link
        link.send(send.buffer, version=send.version, bucket_bytes=self.bucket_bytes,
                  deadline=deadline, stop=send.stop)  # fmt: skip

    def _drop(self, rank: int) -> None:
        peer = self._peers.pop(rank, None)
        if peer is not None and peer.link is not None:
            peer.link.close()

    def _backend(self, buffer: torch.Tensor, info: dict[str, str]) -> str:
        chosen = self._settings.ranks.dist_backend
        on_gpus = buffer.is_cuda and info.get("device", "").startswith("cuda")
        if chosen == "auto":
            return "nccl" if on_gpus and backend_available("nccl") else "gloo"
        return chosen


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) else repr(exc)
