"""A rank's shard memory: the active version, the previous one kept resident, and one staged.

Rollback to the previous version is then a swap of two references, with no copy and no disk;
the price is one more shard of memory per rank (`ranks.keep_previous`, README "Memory").
Buffers are reused: the one no version needs any more becomes the next staging buffer, so a
steady stream of updates allocates nothing after the first few.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.data.flat import FlatShard


@dataclass(frozen=True)
class Held:
    """One version's shard in this rank's memory, with the digest checked when it arrived."""

    version: int
    shard: FlatShard
    digest: str
    # How its bytes arrived (the route: cuda_ipc, shm, distributed/<backend>, artifact).
    via: str = ""


class ShardSlots:
    """Active, previous and staged shards of one rank (see the module docstring)."""

    def __init__(self, *, keep_previous: bool) -> None:
        self.keep_previous = keep_previous
        self.active: Held | None = None
        self.previous: Held | None = None
        self.staged: Held | None = None
        self._spare: torch.Tensor | None = None

    def buffer_for(self, size: int, device: torch.device | str) -> torch.Tensor | None:
        """A spare buffer of at least `size` bytes on `device` to stage into, or None (then the
        caller allocates, and the too-small spare is let go so the allocator can reuse it)."""
        spare = self._spare
        if spare is not None and spare.device == torch.device(device) and spare.numel() >= size:
            return spare[:size]
        self._spare = None
        return None

    def drop_spare(self) -> None:
        """Forget the spare buffer (a transfer that was walked away from may still write it)."""
        self._spare = None

    def stage(self, held: Held) -> None:
        """Hold `held` as the staged version (dropping any staged before)."""
        self.discard()
        self.staged = held

    def stage_previous(self, version: int) -> Held | None:
        """Stage the resident previous version, if it is `version`; no copy."""
        if self.previous is None or self.previous.version != version:
            return None
        self.discard()
        self.staged = self.previous
        return self.staged

    def commit(self) -> Held:
        """The staged version becomes active; the active one becomes the previous."""
        staged = self.staged
        if staged is None:
            raise RuntimeError("nothing is staged")
        old_active, old_previous = self.active, self.previous
        self.active, self.staged = staged, None
        if staged is old_previous:
            # A rollback to the resident previous version: the two swap places.
            self.previous = old_active
        elif self.keep_previous:
            self.previous = old_active
            self._recycle(old_previous)
        else:
            self.previous = None
            self._recycle(old_active)
        return staged

    def discard(self) -> None:
        """Drop the staged version, if any (its buffer becomes the spare)."""
        staged, self.staged = self.staged, None
        if staged is not None and staged is not self.previous and staged is not self.active:
            self._recycle(staged)

    def load(self, held: Held) -> None:
        """Make `held` active directly (start-up, or a commit this rank had not staged); what
        was held before is dropped, so a rank that reloads holds no stale previous version."""
        self.discard()
        for old in (self.active, self.previous):
            self._recycle(old)
        self.active, self.previous = held, None

    def _recycle(self, held: Held | None) -> None:
        if held is None:
            return
        buffer = held.shard.buffer
        if self._spare is None or buffer.numel() > self._spare.numel():
            self._spare = buffer
