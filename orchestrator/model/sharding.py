"""Quantize a whole model, cut it into per-rank shards by its TP plan, and put it back together.

The whole model is quantized before it is cut: the kernels then see every tensor at once, and the
planner only chose blockwise where no block straddles a shard or a fused part, so a rank's slice of
the whole-tensor quantization is exactly the quantization of that rank's weights. Scales follow
their weight: a blockwise scale_inv is cut like the weight, in block units; a per-channel scale
[out, 1] is cut with the rows of a column-parallel weight and held whole by every rank of a
row-parallel one (each row's scale covers all its columns). Torch only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from kernels.fp8 import BLOCK
from kernels.grouped import quantize_blockwise_many, quantize_per_channel_many
from orchestrator.model.planner import ModelPlan, PlanError, Range, Scheme, TensorPlan, scale_name
from orchestrator.model.structure import UPDATE_DTYPES, compare, described

Ranges = tuple[tuple[Range, ...], ...]
# (shipped name, dim it is split along or None when every rank holds it whole, per-rank ranges)
_Layout = tuple[str, int | None, Ranges]


def quantize_state(state: Mapping[str, torch.Tensor], plan: ModelPlan) -> dict[str, torch.Tensor]:
    """Quantize the whole, unsharded model as `plan` says; tensors stay on their device.

    Quantized weights come out as `X.weight` (fp8) plus `X.weight_scale_inv` or `X.weight_scale`
    (fp32); everything else as bf16 under its own name.
    """
    _check_state(state, plan)
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    # One grouped call per scheme: on the GPU a handful of launches for the whole model.
    for scheme, quantize_many in (
        (Scheme.BLOCKWISE, quantize_blockwise_many),
        (Scheme.PER_CHANNEL, quantize_per_channel_many),
    ):
        names = [t.name for t in plan.tensors.values() if t.scheme is scheme]
        results = quantize_many([state[name] for name in names])
        quantized.update(zip(names, results, strict=True))
    out: dict[str, torch.Tensor] = {}
    for t in plan.tensors.values():
        if t.scheme is Scheme.NONE:
            out[t.name] = state[t.name].to(torch.bfloat16)
        else:
            out[t.name], out[scale_name(t)] = quantized[t.name]
    return out


def shard_views(
    quantized: Mapping[str, torch.Tensor], plan: ModelPlan
) -> list[dict[str, torch.Tensor]]:
    """Cut a quantized model (from `quantize_state`) into one dict per rank, on its device.

    A rank's piece is a view into the whole tensor where it is one slice, and a device copy
    where it gathers several (fused parts, replicated kv heads); nothing reaches the host. A
    tensor every rank holds whole is the same tensor in every dict.
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(plan.tp_size)]
    for t in plan.tensors.values():
        for name, dim, ranges in layouts(t):
            tensor = quantized[name]
            for rank, shard in enumerate(shards):
                shard[name] = tensor if dim is None else _gather(tensor, dim, ranges[rank])
    return shards


def shard_state(
    quantized: Mapping[str, torch.Tensor], plan: ModelPlan
) -> list[dict[str, torch.Tensor]]:
    """`shard_views`, then every tensor on the CPU, contiguous and owning exactly its bytes
    (for tests and tools that save shards one tensor at a time; the daemon packs the views
    into one flat buffer per rank instead)."""
    views = shard_views(quantized, plan)
    unique: dict[int, torch.Tensor] = {}
    for shard in views:
        for tensor in shard.values():
            unique.setdefault(id(tensor), tensor)
    on_cpu = dict(zip(unique, _all_to_cpu(list(unique.values())), strict=True))
    return [{name: on_cpu[id(t)] for name, t in shard.items()} for shard in views]


def layouts(t: TensorPlan) -> list[_Layout]:
    """How the weight and, when quantized, its scale are laid out over the ranks: (shipped
    name, the dim it is split along or None, each rank's ranges along it)."""
    dim = t.split_dim
    out: list[_Layout] = [(t.name, dim, t.ranges)]
    if t.scheme is Scheme.BLOCKWISE:
        in_blocks = tuple(tuple((a // BLOCK, b // BLOCK) for a, b in held) for held in t.ranges)
        out.append((scale_name(t), dim, in_blocks))
    elif t.scheme is Scheme.PER_CHANNEL:
        # [out, 1]: rows follow a column split; a row split leaves every row whole on each rank.
        out.append((scale_name(t), 0, t.ranges) if dim == 0 else (scale_name(t), None, ()))
    return out


def _gather(tensor: torch.Tensor, dim: int, held: tuple[Range, ...]) -> torch.Tensor:
    pieces = [tensor.narrow(dim, start, stop - start) for start, stop in held]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()  # on its own device: a row-parallel slice is strided
    if t.device.type != "cpu":
        return t.to("cpu")
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()  # a view into the whole tensor; torch.save would write all of it
    return t


# Copying a quantized 8B model to fresh pageable memory one tensor at a time runs at ~1.1 GB/s
# on an H200 host (bench/d2h.py); into pinned memory it runs at ~54 GB/s, and the copy out of it
# at ~8 GB/s: about 6x in all. Pinning costs as much as the slow copy (~0.7 s per GB), so one
# staging buffer is kept for the process's life and grown when a larger model comes.
_STAGING_ALIGN = 16
_staging: torch.Tensor | None = None
_staging_lock = threading.Lock()


def _all_to_cpu(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor as a CPU tensor owning exactly its bytes; CUDA ones through pinned staging."""
    if not any(t.device.type == "cuda" for t in tensors):
        return [_to_cpu(t) for t in tensors]
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _STAGING_ALIGN) * _STAGING_ALIGN
    global _staging
    with _staging_lock:
        if _staging is None or _staging.numel() < total:
            _staging = None  # let the old buffer go before pinning a larger one
            _staging = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        staging = _staging
        for t, offset in zip(tensors, offsets, strict=True):
            if t.device.type == "cuda":
                src = t.detach().contiguous().reshape(-1).view(torch.uint8)
                staging[offset : offset + src.numel()].copy_(src, non_blocking=True)
        for device in {t.device for t in tensors if t.device.type == "cuda"}:
            torch.cuda.synchronize(device)
        out = []
        for t, offset in zip(tensors, offsets, strict=True):
            if t.device.type != "cuda":
                out.append(_to_cpu(t))
                continue
            owned = torch.empty(t.shape, dtype=t.dtype)
            n = t.numel() * t.element_size()
            owned.reshape(-1).view(torch.uint8).copy_(staging[offset : offset + n])
            out.append(owned)
        return out


def _check_state(state: Mapping[str, torch.Tensor], plan: ModelPlan) -> None:
    expected = {name: (t.shape, UPDATE_DTYPES) for name, t in plan.tensors.items()}
    mismatch = compare(described(state), expected)
    if mismatch:
        raise PlanError(f"update does not match the TP plan: {mismatch.describe()}")
