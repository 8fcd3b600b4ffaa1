"""Tiny Llama / Qwen2 / Qwen3 models, honest updates and planted faults for the verification gate.

Shared by tests/orchestrator/test_verification.py and `bench/verify.py --table`, so the table in
docs/verification-notes.md is measured on exactly the cases the tests assert on.

The weights look trained, not freshly initialized: each linear weight has per-row and per-column
magnitudes (lognormal, so 128x128 blocks get unequal scales, as in real checkpoints), norms are
not all ones, and the lm_head is scaled so logits spread over a few units. A random model at the
usual 0.02 init gives nearly tied logits, where top-1 agreement measures rounding noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kernels.fp8 import BLOCK
from orchestrator.model.planner import ModelPlan, Scheme, Split, TensorPlan, plan_model, scale_name
from tests.orchestrator._sharding import quantize_and_shard

_COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}

CONFIGS: dict[str, dict[str, Any]] = {
    # Every tensor blockwise at TP 1 and 2.
    "llama": {
        "model_type": "llama",
        **_COMMON,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "tie_word_embeddings": False,
    },
    # Intermediate 640 -> 320 per rank at TP 2, and 64-row k/v shards: per-channel fallbacks.
    # Tied embeddings and qkv biases, as in the small Qwen2 checkpoints.
    "qwen2": {
        "model_type": "qwen2",
        **_COMMON,
        "intermediate_size": 640,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "model_type": "qwen3",
        **_COMMON,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}


def plan_for(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], tp: int) -> ModelPlan:
    return plan_model({n: t.shape for n, t in state.items()}, tp, config=config)


def ship(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor], tp: int
) -> tuple[ModelPlan, list[dict[str, torch.Tensor]]]:
    """Plan, quantize and shard an update as the daemon does."""
    plan = plan_for(config, state, tp)
    return plan, quantize_and_shard(state, plan)


# Faults planted in the shipped artifacts, the way a quantization or sharding bug would make
# them. Each takes the rank shards and the plan and returns new shards (the input is not
# modified); None when the plan has no tensor the fault applies to.
Shards = list[dict[str, torch.Tensor]]
Plant = Callable[[Shards, ModelPlan], "Shards | None"]

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _copy(shards: Shards) -> Shards:
    return [dict(shard) for shard in shards]


def _quantized(plan: ModelPlan, split: Split | None = None) -> list[TensorPlan]:
    return [
        t
        for t in plan.tensors.values()
        if t.scheme is not Scheme.NONE and (split is None or t.split is split)
    ]


def scale_x1000(projection: str, layer: int = 0) -> Plant:
    """One scale entry of one weight times 1000 on the last rank: a 128x128 block's scale_inv
    (blockwise) or one row's scale (per channel)."""

    def plant(shards: Shards, plan: ModelPlan) -> Shards | None:
        t = plan.tensors[f"model.layers.{layer}.{projection}.weight"]
        if t.scheme is Scheme.NONE:
            return None
        out = _copy(shards)
        scale = out[-1][scale_name(t)].clone()
        scale[0, 0] *= 1000.0
        out[-1][scale_name(t)] = scale
        return out

    return plant


def swap_gate_up(shards: Shards, plan: ModelPlan) -> Shards | None:
    """The fp8 data of layer 0's gate_proj and up_proj swapped on every rank; scales kept."""
    gate = "model.layers.0.mlp.gate_proj.weight"
    up = "model.layers.0.mlp.up_proj.weight"
    if plan.tensors[gate].scheme is Scheme.NONE:
        return None
    out = _copy(shards)
    for shard in out:
        shard[gate], shard[up] = shard[up], shard[gate]
    return out


def scales_from_wrong_rank(*, every: bool) -> Plant:
    """The last rank ships rank 0's scale shard of column-parallel quantized weights: of every one
    (`every`, what an off-by-one in the sharder's rank index does) or of layer 0's q_proj only."""

    def plant(shards: Shards, plan: ModelPlan) -> Shards | None:
        if plan.tp_size < 2:
            return None
        targets = _quantized(plan, Split.COLUMN)
        if not every:
            targets = [t for t in targets if t.name.endswith("layers.0.self_attn.q_proj.weight")]
        if not targets:
            return None
        out = _copy(shards)
        for t in targets:
            out[-1][scale_name(t)] = out[0][scale_name(t)].clone()
        return out

    return plant


def row_scales_split_on_dim0(*, every: bool) -> Plant:
    """Row-parallel blockwise scales cut along dim 0 instead of dim 1, then laid out in the shape
    each rank expects (what a sharder working on flat buffers does): of every row-parallel
    blockwise weight (`every`) or of layer 0's o_proj only. Per-channel row-parallel scales are
    held whole by every rank, so there is nothing to cut wrongly."""

    def plant(shards: Shards, plan: ModelPlan) -> Shards | None:
        if plan.tp_size < 2:
            return None
        targets = [t for t in _quantized(plan, Split.ROW) if t.scheme is Scheme.BLOCKWISE]
        if not every:
            targets = [t for t in targets if t.name.endswith("layers.0.self_attn.o_proj.weight")]
        if not targets:
            return None
        out = _copy(shards)
        for t in targets:
            name = scale_name(t)
            whole = torch.cat([shard[name] for shard in shards], dim=1)
            wrong = whole.chunk(plan.tp_size, dim=0)
            for rank, shard in enumerate(out):
                shard[name] = wrong[rank].reshape(shard[name].shape).clone()
        return out

    return plant


@dataclass(frozen=True)
class Fault:
    name: str
    plant: Plant


# The faults of the issue, planted as the bug that makes them would: one scale entry (a memory or
# arithmetic slip), one pair of tensors (a name mix-up), every tensor of a kind (a sharder bug).
SHIPPED_FAULTS = (
    Fault("scale x1000, layer 0 down_proj", scale_x1000("mlp.down_proj")),
    Fault("gate/up fp8 data swapped", swap_gate_up),
    Fault("scales from wrong rank (all column-parallel)", scales_from_wrong_rank(every=True)),
    Fault("row-parallel scales split on dim 0 (all)", row_scales_split_on_dim0(every=True)),
)

# Measured for the notes, not all stopped by the logit metrics (see docs/verification-notes.md).
MEASURED_FAULTS = (
    *(
        Fault(f"scale x1000, layer 0 {p.split('.')[1]}", scale_x1000(p))
        for p in PROJECTIONS
        if p != "mlp.down_proj"  # in SHIPPED_FAULTS
    ),
    Fault("scale from wrong rank (q_proj only)", scales_from_wrong_rank(every=False)),
    Fault("row-parallel scale split on dim 0 (o_proj only)", row_scales_split_on_dim0(every=False)),
)

OUTLIER_FACTORS = (10.0, 100.0, 1000.0)


def block_count(plan: ModelPlan) -> int:
    """Number of 128x128 blocks shipped blockwise (for the docs)."""
    return sum(
        math.ceil(t.shape[0] / BLOCK) * math.ceil(t.shape[1] / BLOCK)
        for t in plan.tensors.values()
        if t.scheme is Scheme.BLOCKWISE
    )
