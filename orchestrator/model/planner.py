"""Tensor-parallel plan: how every tensor of a Hugging Face checkpoint is split and quantized.

Llama, Mistral, Qwen2 and Qwen3 share one layout, recognised by the module a tensor belongs to:
q/k/v/gate/up (and the fused qkv_proj / gate_up_proj) are column-parallel, o/down row-parallel,
embed_tokens and lm_head vocab-parallel, norms replicated. The split follows SGLang and vLLM, so a
rank's shard is what those engines load on that rank; in particular, when there are fewer kv heads
than ranks, each kv head is replicated over `tp_size // num_key_value_heads` consecutive ranks.

A linear weight is quantized blockwise when the tensor, each TP shard and each part of a fused
tensor within a shard are multiples of the block on both dims (so a block never straddles a shard
or a part and the shard of the whole-tensor quantization equals the quantization of the shard);
otherwise per output channel, with one WARNING. Plain Python and torch only.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kernels.fp8 import BLOCK
from orchestrator.errors import InvalidUpdate

logger = logging.getLogger("refitd.planner")

Range = tuple[int, int]

# Module leaf name -> role. Fused leaves list their parts in the order they are stacked on dim 0.
_COLUMN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": "gate", "up_proj": "up"}
_FUSED = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}
_ROW = {"o_proj", "down_proj"}
_VOCAB = {"embed_tokens", "lm_head"}


class Split(enum.StrEnum):
    """How a tensor is laid out over the TP ranks."""

    COLUMN = "column"  # rows (output features) split
    ROW = "row"  # columns (input features) split
    REPLICATED = "replicated"
    VOCAB = "vocab"  # rows of an embedding or lm_head split


class Scheme(enum.StrEnum):
    """How a tensor is quantized."""

    BLOCKWISE = "blockwise"
    PER_CHANNEL = "per_channel"
    NONE = "none"


class PlanError(InvalidUpdate, ValueError):
    """The checkpoint cannot be split over the TP ranks, or its shapes contradict the config."""


@dataclass(frozen=True)
class TensorPlan:
    """The plan of one tensor.

    `parts` holds the sizes of a fused tensor's parts along dim 0 (q, k, v or gate, up).
    `ranges[r]` holds the index ranges, along `split_dim`, that rank r holds, concatenated in that
    order; several ranks hold the same range when kv heads are replicated. Empty when replicated.
    """

    name: str
    shape: tuple[int, ...]
    split: Split
    scheme: Scheme
    reason: str | None = None
    parts: tuple[int, ...] | None = None
    ranges: tuple[tuple[Range, ...], ...] = ()

    @property
    def split_dim(self) -> int | None:
        """The dim the tensor is split along, or None when every rank holds all of it."""
        return {Split.COLUMN: 0, Split.VOCAB: 0, Split.ROW: 1}.get(self.split)

    def shard_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of the (unquantized or fp8) tensor that `rank` holds."""
        dim = self.split_dim
        if dim is None:
            return self.shape
        shape = list(self.shape)
        shape[dim] = sum(stop - start for start, stop in self.ranges[rank])
        return tuple(shape)


@dataclass
class ModelPlan:
    """The plan of a whole checkpoint for `tp_size` ranks."""

    tp_size: int
    tensors: dict[str, TensorPlan]

    def report(self) -> list[dict[str, Any]]:
        """JSON-able quantization report: one entry per tensor, in checkpoint order."""
        return [
            {
                "name": t.name,
                "shape": list(t.shape),
                "split": t.split.value,
                "scheme": t.scheme.value,
                "reason": t.reason,
            }
            for t in self.tensors.values()
        ]

    def fallbacks(self) -> list[TensorPlan]:
        """The tensors quantized per channel because blockwise does not fit."""
        return [t for t in self.tensors.values() if t.scheme is Scheme.PER_CHANNEL]

    def shipped_shapes(self, rank: int | None = None) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a rank holds (`rank=None`: the unsharded model).

        Quantized weights ship as `X.weight` (fp8) plus `X.weight_scale_inv` (blockwise, fp32
        [out/128, in/128]) or `X.weight_scale` (per channel, fp32 [out, 1]); the rest as bf16.
        """
        if rank is not None and not 0 <= rank < self.tp_size:
            raise ValueError(f"rank {rank} out of range for tp_size {self.tp_size}")
        shapes: dict[str, tuple[int, ...]] = {}
        for t in self.tensors.values():
            shape = t.shape if rank is None else t.shard_shape(rank)
            shapes[t.name] = shape
            if t.scheme is Scheme.BLOCKWISE:
                shapes[scale_name(t)] = (shape[0] // BLOCK, shape[1] // BLOCK)
            elif t.scheme is Scheme.PER_CHANNEL:
                shapes[scale_name(t)] = (shape[0], 1)
        return shapes


def scale_name(tensor: TensorPlan) -> str:
    """Name of a quantized weight's scale, as in SGLang/DeepSeek FP8 checkpoints."""
    suffix = {Scheme.BLOCKWISE: "_scale_inv", Scheme.PER_CHANNEL: "_scale"}[tensor.scheme]
    return tensor.name + suffix


@dataclass(frozen=True)
class _Segment:
    """A stretch of dim 0 cut into `pieces` equal pieces; `tp // pieces` ranks share each piece."""

    label: str
    size: int
    pieces: int


def plan_model(
    shapes: Mapping[str, Sequence[int]],
    tp_size: int,
    *,
    config: Mapping[str, Any] | None = None,
    ignore: Sequence[str] = (),
) -> ModelPlan:
    """Plan every tensor of a checkpoint for `tp_size` ranks.

    `config` is the model's Hugging Face config.json; attention tensors need it when tp_size > 1
    (and a fused qkv_proj always), since the split follows head boundaries. `ignore` holds fnmatch
    patterns matched against a tensor's name and each of its module prefixes; a match stays bf16.
    Raises PlanError when a dimension cannot be split over tp_size ranks.
    """
    if tp_size < 1:
        raise PlanError(f"tp_size must be at least 1, got {tp_size}")
    planner = _Planner(tp_size, dict(config or {}), tuple(ignore))
    tensors = {
        name: planner.plan(name, tuple(int(d) for d in shape)) for name, shape in shapes.items()
    }
    for t in tensors.values():
        if t.scheme is Scheme.PER_CHANNEL:
            logger.warning(
                "per-channel fallback for %s shape %s at tp_size %d: %s",
                t.name,
                list(t.shape),
                tp_size,
                t.reason,
            )
    return ModelPlan(tp_size=tp_size, tensors=tensors)


class _Planner:
    def __init__(self, tp: int, config: dict[str, Any], ignore: tuple[str, ...]) -> None:
        self.tp = tp
        self.config = config
        self.ignore = ignore

    def plan(self, name: str, shape: tuple[int, ...]) -> TensorPlan:
        module, _, kind = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        if leaf in _COLUMN or leaf in _FUSED:
            labels = _FUSED[leaf] if leaf in _FUSED else (_COLUMN[leaf],)
            segments = self._segments(name, shape, labels)
            parts = tuple(s.size for s in segments) if leaf in _FUSED else None
            return self._finish(name, shape, kind, Split.COLUMN, segments, parts)
        if leaf in _ROW:
            if kind != "weight":  # a row-parallel bias is added once, after the all-reduce
                reason = "bias" if kind == "bias" else f"not a weight ({kind})"
                return TensorPlan(name, shape, Split.REPLICATED, Scheme.NONE, reason)
            self._require_2d(name, shape)
            return self._finish(name, shape, kind, Split.ROW, [self._even(name, shape, 1)], None)
        if leaf in _VOCAB:
            reason = "embedding" if leaf == "embed_tokens" else "lm_head"
            ranges = self._vocab(name, shape)
            return TensorPlan(name, shape, Split.VOCAB, Scheme.NONE, reason, None, ranges)
        if leaf.endswith("norm"):
            return TensorPlan(name, shape, Split.REPLICATED, Scheme.NONE, "norm")
        reason = "not a linear projection of attention or MLP"
        return TensorPlan(name, shape, Split.REPLICATED, Scheme.NONE, reason)

    def _finish(
        self,
        name: str,
        shape: tuple[int, ...],
        kind: str,
        split: Split,
        segments: list[_Segment],
        parts: tuple[int, ...] | None,
    ) -> TensorPlan:
        ranges = _ranges(segments, self.tp)
        scheme, reason = self._scheme(name, shape, kind, split, segments)
        return TensorPlan(name, shape, split, scheme, reason, parts, ranges)

    def _scheme(
        self,
        name: str,
        shape: tuple[int, ...],
        kind: str,
        split: Split,
        segments: list[_Segment],
    ) -> tuple[Scheme, str | None]:
        if kind != "weight":
            return Scheme.NONE, "bias" if kind == "bias" else f"not a weight ({kind})"
        if len(shape) != 2:
            return Scheme.NONE, f"{len(shape)}-D tensor"
        pattern = self._ignored(name)
        if pattern is not None:
            return Scheme.NONE, f"ignored by pattern {pattern!r}"
        reasons = []
        rows, cols = shape
        if rows % BLOCK:
            reasons.append(f"rows {rows} not a multiple of {BLOCK}")
        if cols % BLOCK:
            reasons.append(f"columns {cols} not a multiple of {BLOCK}")
        for seg in segments:
            per_shard = seg.size // seg.pieces
            what = "columns" if split is Split.ROW else "rows"
            where = f"part {seg.label!r}" if len(segments) > 1 else what
            if seg.pieces == 1 and len(segments) == 1:
                continue  # the whole tensor, checked above
            if per_shard % BLOCK:
                reasons.append(
                    f"{where} per TP shard {per_shard} ({seg.size}/{seg.pieces}) "
                    f"not a multiple of {BLOCK}"
                )
        if reasons:
            return Scheme.PER_CHANNEL, "; ".join(reasons)
        return Scheme.BLOCKWISE, None

    def _ignored(self, name: str) -> str | None:
        atoms = name.split(".")
        candidates = [".".join(atoms[:i]) for i in range(len(atoms), 0, -1)]
        for pattern in self.ignore:
            if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
                return pattern
        return None

    def _segments(
        self, name: str, shape: tuple[int, ...], labels: tuple[str, ...]
    ) -> list[_Segment]:
        """The parts of a column-parallel tensor along dim 0, each with its piece count."""
        if not shape:
            raise PlanError(f"{name}: a column-parallel tensor needs at least one dim")
        if labels[0] in ("q", "k", "v"):
            if "num_attention_heads" not in self.config and self.tp == 1 and len(labels) == 1:
                segments = [_Segment(labels[0], shape[0], 1)]  # one rank: no head boundary to keep
            else:
                segments = [self._attention(name, label) for label in labels]
        elif len(labels) == 1:
            segments = [self._even(name, shape, 0, labels[0])]
        else:  # gate_up_proj: two equal halves
            inter = self.config.get("intermediate_size")
            size = int(inter) if inter is not None else shape[0] // 2
            if shape[0] % 2:
                raise PlanError(f"{name}: fused gate_up_proj with an odd row count {shape[0]}")
            segments = [self._piece(name, label, size, "intermediate_size") for label in labels]
        total = sum(s.size for s in segments)
        if total != shape[0]:
            sizes = " + ".join(f"{s.label} {s.size}" for s in segments)
            raise PlanError(f"{name}: {shape[0]} rows, but the config gives {sizes} = {total}")
        return segments

    def _attention(self, name: str, label: str) -> _Segment:
        heads = self.config.get("num_attention_heads")
        if heads is None:
            raise PlanError(
                f"{name}: the model config (num_attention_heads, num_key_value_heads, head_dim) "
                f"is needed to split attention over tp_size {self.tp}"
            )
        heads = int(heads)
        kv_heads = int(self.config.get("num_key_value_heads") or heads)
        head_dim = self.config.get("head_dim") or int(self.config["hidden_size"]) // heads
        head_dim = int(head_dim)
        if label == "q":
            if heads % self.tp:
                raise PlanError(
                    f"{name}: num_attention_heads {heads} is not divisible by tp_size {self.tp}"
                )
            return _Segment(label, heads * head_dim, self.tp)
        if kv_heads >= self.tp:
            if kv_heads % self.tp:
                raise PlanError(
                    f"{name}: num_key_value_heads {kv_heads} is not divisible by tp_size {self.tp}"
                )
            return _Segment(label, kv_heads * head_dim, self.tp)
        if self.tp % kv_heads:
            raise PlanError(
                f"{name}: tp_size {self.tp} is not a multiple of num_key_value_heads {kv_heads}, "
                "so kv heads cannot be replicated evenly"
            )
        return _Segment(label, kv_heads * head_dim, kv_heads)

    def _piece(self, name: str, label: str, size: int, what: str) -> _Segment:
        if size % self.tp:
            raise PlanError(f"{name}: {what} {size} is not divisible by tp_size {self.tp}")
        return _Segment(label, size, self.tp)

    def _even(self, name: str, shape: tuple[int, ...], dim: int, label: str = "") -> _Segment:
        what = "columns" if dim == 1 else "rows"
        return self._piece(name, label, shape[dim], what)

    def _vocab(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[Range, ...], ...]:
        # Like vLLM's vocab-parallel layers, without their padding: rank r holds the r-th chunk
        # of ceil(vocab / tp) rows, so only the last rank may hold fewer.
        vocab = shape[0] if shape else 0
        if vocab < self.tp:
            raise PlanError(f"{name}: {vocab} vocabulary rows cannot be split over {self.tp} ranks")
        chunk = -(-vocab // self.tp)
        return tuple(
            ((min(r * chunk, vocab), min((r + 1) * chunk, vocab)),) for r in range(self.tp)
        )

    @staticmethod
    def _require_2d(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise PlanError(f"{name}: a linear weight must be 2-D, got shape {list(shape)}")


def _ranges(segments: list[_Segment], tp: int) -> tuple[tuple[Range, ...], ...]:
    """Per rank, the ranges it holds: piece `r // (tp // pieces)` of every segment, in order."""
    per_rank = []
    for rank in range(tp):
        held = []
        offset = 0
        for seg in segments:
            step = seg.size // seg.pieces
            piece = rank // (tp // seg.pieces)
            held.append((offset + piece * step, offset + (piece + 1) * step))
            offset += seg.size
        per_rank.append(tuple(held))
    return tuple(per_rank)
