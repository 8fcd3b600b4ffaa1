"""What refitd knows of the served model: its config.json and the tensors an update carries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import RefitError


@dataclass(frozen=True)
class ModelSpec:
    """The model's config.json and, per tensor an update must carry, its shape and dtypes."""

    config: dict[str, Any]
    expected: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]
    path: Path

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        from orchestrator.model.verification import expected_tensors

        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RefitError(f"model.config {path} cannot be read as JSON: {exc}") from None
        expected = {
            name: (tuple(shape), tuple(dtypes) if isinstance(dtypes, tuple) else (dtypes,))
            for name, (shape, dtypes) in expected_tensors(config).items()
        }
        return cls(config=config, expected=expected, path=Path(path))
