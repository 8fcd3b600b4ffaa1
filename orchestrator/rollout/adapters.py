"""The seam between a rank agent and the engine that serves on its GPU.

The agent owns staging: it receives a shard into a flat buffer of its own, checks its digest,
and keeps the previous version resident for rollback. The engine is told only at COMMIT, after
the decision, with the tensors it must now serve (views into the agent's buffer, valid until the
agent's next COMMIT replaces them). So the seam is one call, shaped for engines that update in
place:

- the built-in `InMemoryAdapter` serves straight from the agent's buffers (no copy);
- vLLM: `apply` would copy in place through the weight loader, e.g.
  `llm.collective_rpc("reload_weights", ...)` / `model.load_weights(iter(tensors.items()))`,
  bracketed by its weight-transfer start/update/finish calls in buckets;
- SGLang: `engine.update_weights_from_tensor(named_tensors=list(tensors.items()),
  flush_cache=True)` with `weight_version=str(version)`, in flattened buckets.
An in-place engine copies (HBM-to-HBM, milliseconds for an 8B shard), so the agent's buffers
stay the source of truth for rollback, and a failed apply is reported by the agent, which loads
the active version again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    import torch


class EngineAdapter(Protocol):
    """What a rank agent needs from an engine."""

    def apply(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serve `tensors` as `version` from now on (called once per commit, after the
        decision; the tensors stay valid until the next apply)."""

    @property
    def served_version(self) -> int | None:
        """The version the engine serves, if any."""


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
    """The built-in engine: serves the agent's own buffers, zero-copy."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._version: int | None = None

    def apply(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)
        self._version = version

    @property
    def served_version(self) -> int | None:
        return self._version

    def held(self) -> dict[str, torch.Tensor]:
        """The tensors served now (empty before the first commit)."""
        return dict(self._tensors)


def make_adapter() -> EngineAdapter:
    """The adapter a rank agent uses; the built-in in-memory one for now."""
    return InMemoryAdapter()
