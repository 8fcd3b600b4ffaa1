"""A rank agent's side of the `distributed` route: join the group its PREPARE names (keeping it
across transactions that commit), receive the shard into the staging slot, and never wait past
the deadline.

The PREPARE entry carries the daemon's rendezvous store ("host:port"), the group's name, the
backend and the bucket size (rollout/dist_links.py). A name other than the group held means the
daemon formed a new one (after a failure, an abort, a restart of either side): the old group is
dropped and the new one joined. The join and the receive run in a `Bounded` thread; the agent
waits for it until ranks.prepare_deadline_s or until the transaction is decided (`cancelled`),
then walks away and drops the group. Named failpoints (`rank<R>.dist.rendezvous`, `.header`,
`.bucket`) let tests fault a rank at each phase.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from orchestrator import failpoints
from orchestrator.data.dist import RECEIVER, Bounded, Link, TransferFailed, connect_store
from orchestrator.errors import InvalidUpdate

log = logging.getLogger("refitd.rank")


class DistReceiver:
    """One rank's group with the daemon (at most one at a time)."""

    def __init__(self, rank: int, device: torch.device, bind_host: str | None) -> None:
        self.rank = rank
        self.device = device
        self.bind_host = bind_host
        self._link: Link | None = None

    def receive(
        self,
        entry: dict[str, Any],
        buffer: torch.Tensor,
        *,
        version: int,
        deadline_s: float,
        cancelled: Callable[[], str | None] | None,
    ) -> None:
        """Fill `buffer` with this rank's shard of `version`; TransferFailed (and the group
        dropped) when it cannot by the deadline."""
        try:
            group, store = str(entry["group"]), str(entry["store"])
            backend, bucket_bytes = str(entry["backend"]), int(entry["bucket_bytes"])
        except (KeyError, TypeError, ValueError):
            raise InvalidUpdate(
                f"rank {self.rank}: a distributed route needs group, store, backend and "
                f"bucket_bytes; the PREPARE gave {sorted(entry)}"
            ) from None
        if self._link is not None and self._link.group != group:
            self.drop()
        deadline = time.monotonic() + deadline_s
        task = Bounded(
            functools.partial(
                self._run, self._link, group, store, backend, buffer, version, bucket_bytes,
                deadline,
            ),
            name=f"recv-r{self.rank}",
        )  # fmt: skip
        try:
            self._link = task.wait(deadline, cancelled)
        except BaseException:
            # The thread may still hold a half-formed group: it ends by the deadline anyway.
            self.drop()
            raise

    def drop(self) -> None:
        """Drop the group held, if any (after a failure or an ABORT)."""
        link, self._link = self._link, None
        if link is not None:
            log.info("rank %d: dropping torch.distributed group %s", self.rank, link.group)
            link.close()

    def _run(
        self,
        link: Link | None,
        group: str,
        store: str,
        backend: str,
        buffer: torch.Tensor,
        version: int,
        bucket_bytes: int,
        deadline: float,
    ) -> Link:
        if link is None:
            client = connect_store(store, deadline)
            self._phase("rendezvous")
            link = Link.join(
                client, group=group, role=RECEIVER, backend=backend, device=self.device,
                bind_host=self.bind_host, deadline=deadline,
            )  # fmt: skip
            log.info("rank %d: joined torch.distributed group %s (%s)", self.rank, group, backend)
        try:
            link.recv_into(buffer, version=version, bucket_bytes=bucket_bytes,
                           deadline=deadline, phase=self._phase)  # fmt: skip
        except BaseException:
            link.close()
            raise
        return link

    def _phase(self, name: str) -> None:
        failpoints.hit(f"rank{self.rank}.dist.{name}")


__all__ = ["DistReceiver", "TransferFailed"]
