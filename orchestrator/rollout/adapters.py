"""The seam between a rank agent and the engine that serves on its GPU.

A rank agent hands an adapter the tensors of its shard; the adapter stages them next to what it
serves, swaps them in on commit, and reports a digest of what it actually holds (computed from
the held tensors with orchestrator.state.artifacts.tensor_digest, so it compares with the artifact's
`tensor_digest`). Adapters for SGLang and vLLM implement the same four methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from orchestrator.errors import ConfigError
from orchestrator.state.artifacts import tensor_digest

if TYPE_CHECKING:
    import torch


class EngineAdapter(Protocol):
    """What a rank agent needs from an engine."""

    def stage(self, version: int, tensors: dict[str, torch.Tensor]) -> str:
        """Hold `tensors` beside the active ones (replacing any staged); return their digest."""

    def commit(self, version: int) -> str:
        """Make the staged `version` the active one; return the digest of what is now held."""

    def discard(self) -> None:
        """Drop the staged tensors, if any."""

    @property
    def staged_version(self) -> int | None:
        """The version staged, if any."""

    @property
    def active_version(self) -> int | None:
        """The version held as active, if any."""


def resolve_device(setting: str, rank: int) -> str:
    """`ranks.device` for one rank: "auto" (cuda:<rank> when CUDA is there, else cpu), "cpu",
    or "cuda" (cuda:<rank>, an error without CUDA)."""
    import torch

    if setting == "cpu":
        return "cpu"
    if setting in ("auto", "cuda"):
        if torch.cuda.is_available():
            return f"cuda:{rank % torch.cuda.device_count()}"
        if setting == "cuda":
            raise ConfigError("ranks.device is 'cuda' but this host has no CUDA device")
        return "cpu"
    raise ConfigError(f"ranks.device must be auto, cpu or cuda, not {setting!r}")


class InMemoryAdapter:
    """The built-in engine: keeps the active shard and at most one staged shard on a device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._active: dict[str, torch.Tensor] | None = None
        self._active_version: int | None = None
        self._active_digest: str | None = None
        self._staged: dict[str, torch.Tensor] | None = None
        self._staged_version: int | None = None
        self._staged_digest: str | None = None

    def stage(self, version: int, tensors: dict[str, torch.Tensor]) -> str:
        # Free the previous staged copy before allocating the next, so peak memory is
        # active + one staged shard.
        self.discard()
        held = {name: t.to(self.device) for name, t in tensors.items()}
        digest = tensor_digest(held)
        self._staged, self._staged_version, self._staged_digest = held, version, digest
        return digest

    def commit(self, version: int) -> str:
        if self._staged is None or self._staged_version != version:
            raise AssertionError(
                f"version {version} is not staged (staged: {self._staged_version})"
            )
        self._active, self._active_version = self._staged, self._staged_version
        self._active_digest = self._staged_digest
        self._staged = self._staged_version = self._staged_digest = None
        assert self._active_digest is not None
        return self._active_digest

    def discard(self) -> None:
        self._staged = self._staged_version = self._staged_digest = None

    @property
    def staged_version(self) -> int | None:
        return self._staged_version

    @property
    def active_version(self) -> int | None:
        return self._active_version

    def held(self) -> dict[str, torch.Tensor]:
        """The active tensors (empty before the first commit)."""
        return dict(self._active or {})

    def held_digest(self) -> str:
        """Recompute the digest of the active tensors from memory."""
        return tensor_digest(self._active or {})


def make_adapter(device_setting: str, rank: int) -> EngineAdapter:
    """The adapter a rank agent uses; the built-in in-memory one for now."""
    return InMemoryAdapter(resolve_device(device_setting, rank))
