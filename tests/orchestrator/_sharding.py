"""The sharding's inverse, for tests: put a model back together from its rank shards and
dequantize it, checking on the way that every rank holds what the plan says."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch

from kernels.blockwise import dequantize_blockwise
from kernels.fp8 import FP8_DTYPE
from kernels.per_channel import dequantize_per_channel
from orchestrator.model.planner import ModelPlan, PlanError, Range
from orchestrator.model.sharding import Ranges, layouts, quantize_state, shard_state
from orchestrator.model.structure import compare, described

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def quantize_and_shard(
    state: Mapping[str, torch.Tensor], plan: ModelPlan
) -> list[dict[str, torch.Tensor]]:
    """Quantize a bf16/fp16/fp32 model as `plan` says and cut it into one CPU dict per rank.

    Raises PlanError when the state's names or shapes differ from the plan's.
    """
    return shard_state(quantize_state(state, plan), plan)


def unshard(
    rank_shards: Sequence[Mapping[str, torch.Tensor]], plan: ModelPlan
) -> dict[str, torch.Tensor]:
    """Put the whole quantized model back together from its rank shards.

    Checks what it can on the way: every rank holds exactly its planned names and shapes, and
    ranks that hold the same slice (replicated tensors, replicated kv heads) hold the same bits.
    """
    if len(rank_shards) != plan.tp_size:
        raise PlanError(f"expected {plan.tp_size} rank shards, got {len(rank_shards)}")
    for rank, shard in enumerate(rank_shards):
        _check_shapes(f"rank {rank} shard", shard, plan.shipped_shapes(rank))
    out: dict[str, torch.Tensor] = {}
    for t in plan.tensors.values():
        for name, dim, ranges in layouts(t):
            pieces = [shard[name] for shard in rank_shards]
            if dim is None:
                for rank, piece in enumerate(pieces[1:], start=1):
                    _require_same(name, 0, pieces[0], rank, piece)
                out[name] = pieces[0]
            else:
                out[name] = _join(name, pieces, dim, ranges)
    return out


def dequantize_state(quantized: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bf16 tensors back under their original names, from a quantized model or one rank shard."""
    scales = set()
    for name, tensor in quantized.items():
        if tensor.dtype == FP8_DTYPE:
            scales.update({name + "_scale_inv", name + "_scale"} & quantized.keys())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in quantized.items():
        if name in scales:
            continue
        if tensor.dtype != FP8_DTYPE:
            out[name] = tensor.to(torch.bfloat16)
        elif name + "_scale_inv" in quantized:
            out[name] = dequantize_blockwise(tensor, quantized[name + "_scale_inv"])
        elif name + "_scale" in quantized:
            out[name] = dequantize_per_channel(tensor, quantized[name + "_scale"])
        else:
            raise PlanError(f"{name}: an fp8 tensor without {name}_scale_inv or {name}_scale")
    return out


def _join(name: str, pieces: Sequence[torch.Tensor], dim: int, ranges: Ranges) -> torch.Tensor:
    """Inverse of `_gather` over all ranks; ranks that hold the same range must agree."""
    found: dict[Range, tuple[int, torch.Tensor]] = {}
    for rank, (piece, held) in enumerate(zip(pieces, ranges, strict=True)):
        offset = 0
        for start, stop in held:
            part = piece.narrow(dim, offset, stop - start)
            offset += stop - start
            if (start, stop) in found:
                _require_same(name, found[(start, stop)][0], found[(start, stop)][1], rank, part)
            else:
                found[(start, stop)] = (rank, part)
    ordered = sorted(found)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ordered)), f"{name}: gaps: {ordered}"
    return torch.cat([found[r][1] for r in ordered], dim).contiguous()


def _require_same(name: str, rank_a: int, a: torch.Tensor, rank_b: int, b: torch.Tensor) -> None:
    if a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):
        raise PlanError(f"{name}: ranks {rank_a} and {rank_b} hold different copies of one slice")


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns: fp8 has no equality kernel everywhere, and NaN != NaN.
    return t.view(_BITS[t.element_size()])


def _check_shapes(
    what: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> None:
    mismatch = compare(described(tensors), {name: (s, None) for name, s in expected.items()})
    if mismatch:
        raise PlanError(f"{what} does not match the TP plan: {mismatch.describe()}")
