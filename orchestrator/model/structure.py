"""One comparison of a set of tensors with what is expected of it: names, shapes, dtypes.

Every place that checks a set of tensors calls `compare`: an update as sent (verification), a
safetensors header (sources), an update against the TP plan and each rank's shard (sharding and
verification). The same fault therefore reads the same wherever it is found:

    missing tensors: a, b; unexpected tensors: c; wrong shape: d has shape [8, 4], expected
    [4, 8]; wrong dtype: e is I32, expected bfloat16, float16 or float32

Metadata only: no tensor data is read, so a check never waits for a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kernels.fp8 import FP8_DTYPE
from orchestrator.model.planner import ModelPlan, Scheme, scale_name
from orchestrator.text import some

# A dtype as found: a torch dtype, or the name a file gave one that torch has no name for
# (a safetensors header's "I32" is int32, but a header may also say "F8_E5M2" or worse).
FoundDtype = torch.dtype | str
# Accepted dtypes: one, several, or None for any.
Accepted = torch.dtype | tuple[torch.dtype, ...] | None

Found = Mapping[str, tuple[Sequence[int], FoundDtype]]
Expected = Mapping[str, tuple[Sequence[int], Accepted]]

# The dtypes a trainer may send; each is cast to bf16 before quantization and for the reference.
UPDATE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Mismatch:
    """What differs; each entry already names its tensor. Falsy when nothing does."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    wrong_shape: tuple[str, ...] = ()
    wrong_dtype: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def problems(self) -> list[str]:
        """One phrase per kind of problem, in a fixed order; empty when nothing differs."""
        out = []
        if self.missing:
            out.append(f"missing tensors: {some(self.missing)}")
        if self.unexpected:
            out.append(f"unexpected tensors: {some(self.unexpected)}")
        if self.wrong_shape:
            out.append(f"wrong shape: {some(self.wrong_shape)}")
        if self.wrong_dtype:
            out.append(f"wrong dtype: {some(self.wrong_dtype)}")
        return out

    def describe(self) -> str:
        return "; ".join(self.problems())


def described(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], FoundDtype]]:
    """Name -> (shape, dtype) of tensors, the form `compare` takes."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def compare(found: Found, expected: Expected) -> Mismatch:
    """How `found` (name -> (shape, dtype)) differs from `expected` (name -> (shape, accepted)).

    Missing tensors are listed in `expected`'s order, the others in `found`'s. A tensor of the
    wrong shape is not also judged on its dtype: one fault, one message.
    """
    missing = tuple(name for name in expected if name not in found)
    unexpected = tuple(name for name in found if name not in expected)
    wrong_shape = []
    wrong_dtype = []
    for name, (shape, dtype) in found.items():
        if name not in expected:
            continue
        want_shape, accepted = expected[name]
        if tuple(shape) != tuple(want_shape):
            wrong_shape.append(f"{name} has shape {list(shape)}, expected {list(want_shape)}")
            continue
        allowed = (accepted,) if isinstance(accepted, torch.dtype) else accepted
        if allowed is not None and dtype not in allowed:
            wrong_dtype.append(f"{name} is {dtype_name(dtype)}, expected {_alternatives(allowed)}")
    return Mismatch(missing, unexpected, tuple(wrong_shape), tuple(wrong_dtype))


def shipped_specs(plan: ModelPlan, rank: int | None) -> dict[str, tuple[tuple[int, ...], Accepted]]:
    """Name -> (shape, dtype) of what `rank` holds (None: the whole model): fp8 data with an fp32
    scale for a quantized weight, bf16 for everything else."""
    shapes = plan.shipped_shapes(rank)
    out: dict[str, tuple[tuple[int, ...], Accepted]] = {}
    for t in plan.tensors.values():
        if t.scheme is Scheme.NONE:
            out[t.name] = (shapes[t.name], torch.bfloat16)
        else:
            out[t.name] = (shapes[t.name], FP8_DTYPE)
            out[scale_name(t)] = (shapes[scale_name(t)], torch.float32)
    return out


def dtype_name(dtype: FoundDtype) -> str:
    """'bfloat16' for torch.bfloat16; a name torch does not know stays as the file gave it."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _alternatives(dtypes: Sequence[torch.dtype]) -> str:
    names = [dtype_name(d) for d in dtypes]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


__all__ = [
    "UPDATE_DTYPES",
    "Expected",
    "Found",
    "Mismatch",
    "compare",
    "described",
    "dtype_name",
    "shipped_specs",
]
