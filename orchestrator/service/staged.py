"""The daemon's own copies of in-memory sources (a trainer's tensors, by IPC), held by update id
from the door's copy until the pipeline's loading stage takes them.

Each copy is a whole model in the daemon's memory, so only `limit` may be held at once (reserved
before the copy starts, so two pushes racing cannot both pass); past it a push is refused with
429 and nothing is recorded. A copy lives only in this process: a daemon that stops loses it,
and recovery aborts its update with the reason (service/recovery.py).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from orchestrator.data.flat import FlatShard
from orchestrator.errors import TooBusy

# What a refused push is told to wait: an update runs in seconds, and the trainer's next step
# is minutes away; a short wait and a retry is all it needs.
RETRY_AFTER_S = 1


class StagedSources:
    """In-memory sources by update id, at most `limit` at once (reserved, then filled)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        # None: reserved, the copy is under way.
        self._held: dict[str, list[FlatShard] | None] = {}

    def reserve(self, update_id: str) -> None:
        """Count `update_id` against the limit before its copy starts; TooBusy past it."""
        with self._lock:
            if len(self._held) >= self.limit:
                raise TooBusy(
                    f"the daemon already holds {len(self._held)} update(s) from trainer tensors "
                    f"in memory (limits.tensor_updates_waiting={self.limit}, each a copy of the "
                    f"whole model); nothing was recorded: push again in {RETRY_AFTER_S}s, or "
                    "wait for the previous push's answer first",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._held[update_id] = None

    def fill(self, update_id: str, shards: list[FlatShard]) -> None:
        with self._lock:
            assert update_id in self._held, f"{update_id} was not reserved"
            self._held[update_id] = shards

    def take(self, update_id: str) -> list[FlatShard] | None:
        """The copy of `update_id`, which leaves the registry (the caller owns it now)."""
        with self._lock:
            return self._held.pop(update_id, None)

    def drop(self, update_id: str) -> None:
        """Forget `update_id`'s copy (a refused or failed update); no-op when not held."""
        with self._lock:
            self._held.pop(update_id, None)

    def held(self) -> int:
        with self._lock:
            return len(self._held)


def tensors_of(shards: list[FlatShard]) -> Mapping[str, torch.Tensor]:
    """Every tensor of the copy, as views into its buffers (no copy)."""
    return {name: view for shard in shards for name, view in shard.views().items()}
