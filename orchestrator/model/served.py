"""The candidate's modules: a Hugging Face model's layers served as the TP ranks serve them.

`ServedLinear` replaces every Linear of the decoder layers. It holds what the ranks ship (fp8
data and fp32 scales, or bf16 for an unquantized tensor) only while its layer runs (`load`, then
`release`), and computes what SGLang's FP8 linear layers compute: activations quantized to fp8
per token per 128-channel group (per token over a rank's slice for a per-channel weight), the
FP8 product accumulated in fp32 (`gemm`), and at TP > 1 a row-parallel layer summed from its
ranks' bf16 partial outputs, as the all-reduce does. The vocab-parallel embedding and lm_head
work on the ranks' own vocabulary slices, so nothing of them is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fp8 import BLOCK
from orchestrator.model.gemm import Gemm, quantize_activation_groups
from orchestrator.model.planner import Range, Scheme

BF16 = torch.bfloat16


@dataclass(frozen=True)
class RowPiece:
    """What one rank holds of a row-parallel weight: the input columns and their data."""

    columns: tuple[Range, ...]
    weight: torch.Tensor  # fp8 (or bf16) [out, columns]
    scale: torch.Tensor | None  # fp32 [out/128, columns/128] or [out, 1]


class ActivationCache:
    """The last quantized input of a decoder layer: q/k/v (and gate/up) read the same hidden
    states, which SGLang quantizes once (fused qkv and gate_up projections)."""

    def __init__(self) -> None:
        self._key: tuple[torch.Tensor, int] | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale) of `x` [..., K] flattened to [T, K]. The same tensor object as last time
        is the same activations: the model never writes into its hidden states in place (and
        inference tensors have no version counter to tell), and holding `x` keeps its id."""
        key = self._key
        if key is not None and key[0] is x and key[1] == group:
            assert self._value is not None
            return self._value
        self._value = quantize_activation_groups(x.reshape(-1, x.shape[-1]), group)
        self._key = (x, group)
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


class _Held:
    """What a ServedLinear serves while its layer runs. A plain object: nn.Module's __setattr__
    costs microseconds per attribute, and a model's 252 linears load and release every update."""

    __slots__ = ("bias", "row_pieces", "scale", "scheme", "weight")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.scheme = Scheme.NONE
        self.weight: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.row_pieces: list[RowPiece] | None = None


class ServedLinear(nn.Module):
    """A decoder layer's Linear as the ranks serve it; empty between `load` and `release`."""

    def __init__(self, in_features: int, out_features: int, gemm: Gemm, cache: ActivationCache):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gemm = gemm
        self.cache = cache
        self.held = _Held()

    @property
    def scheme(self) -> Scheme:
        return self.held.scheme

    @property
    def weight(self) -> torch.Tensor | None:
        return self.held.weight

    @property
    def row_pieces(self) -> list[RowPiece] | None:
        return self.held.row_pieces

    def load(
        self,
        scheme: Scheme,
        weight: torch.Tensor | None,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        row_pieces: Sequence[RowPiece] | None = None,
    ) -> None:
        """Serve `weight` [out, in] (fp8 with `scale`, or bf16 for Scheme.NONE), or, for a
        row-parallel weight at TP > 1, each rank's `row_pieces`."""
        held = self.held
        held.scheme = scheme
        held.weight, held.scale, held.bias = weight, scale, bias
        held.row_pieces = list(row_pieces) if row_pieces else None

    def release(self) -> None:
        self.held.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = self.held
        flat = x.reshape(-1, x.shape[-1])
        if held.row_pieces is None:
            assert held.weight is not None, "ServedLinear called before load()"
            out = self._partial(x, held.weight, held.scale, shared=True)
        else:
            # The all-reduce sums what each rank computed, rounded to bf16 as it is sent.
            out = torch.zeros(flat.shape[0], self.out_features, device=x.device)
            for piece in held.row_pieces:
                x_rank = torch.cat([flat[:, a:b] for a, b in piece.columns], dim=-1)
                out += self._partial(x_rank, piece.weight, piece.scale, shared=False).to(BF16)
        if held.bias is not None:
            out = out.float() + held.bias.float()
        # A scaled_mm result is bf16 already: no pass over it unless something changes it.
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _partial(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, *, shared: bool
    ) -> torch.Tensor:
        if self.scheme is Scheme.NONE:
            return F.linear(x.reshape(-1, x.shape[-1]).to(w.dtype), w)
        # Blockwise: groups of 128 channels, aligned with the weight's blocks (and with rank
        # slices, which the planner keeps whole blocks). Per channel: one activation scale per
        # token over what the rank holds (a rowwise FP8 GEMM).
        group = BLOCK if self.scheme is Scheme.BLOCKWISE else x.shape[-1]
        if shared:
            xq, xs = self.cache.get(x, group)
        else:
            xq, xs = quantize_activation_groups(x.reshape(-1, x.shape[-1]), group)
        assert scale is not None
        if self.scheme is Scheme.BLOCKWISE:
            return self.gemm.blockwise(xq, xs, w, scale)
        return self.gemm.rowwise(xq, xs, w, scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}"


class VocabParallelEmbedding(nn.Module):
    """An embedding served from the ranks' vocabulary slices: each rank looks up the tokens it
    holds and the rest are zeros, summed (the all-reduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[tuple[Range, torch.Tensor]] = []

    def load(self, pieces: Sequence[tuple[Range, torch.Tensor]]) -> None:
        self.pieces = list(pieces)

    def release(self) -> None:
        self.pieces = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if len(self.pieces) == 1:
            return F.embedding(ids, self.pieces[0][1])
        out = None
        for (start, stop), rows in self.pieces:
            held = (ids >= start) & (ids < stop)
            local = (ids - start).clamp(0, stop - start - 1)
            part = F.embedding(local, rows) * held.unsqueeze(-1).to(rows.dtype)
            out = part if out is None else out + part
        assert out is not None, "VocabParallelEmbedding called before load()"
        return out


class VocabParallelHead(nn.Module):
    """An lm_head served from the ranks' vocabulary slices: each rank's logits, gathered."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[torch.Tensor] = []

    def load(self, pieces: Sequence[torch.Tensor]) -> None:
        self.pieces = list(pieces)

    def release(self) -> None:
        self.pieces = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if len(self.pieces) == 1:
            return F.linear(hidden, self.pieces[0])
        return torch.cat([F.linear(hidden, rows) for rows in self.pieces], dim=-1)


__all__ = [
    "ActivationCache",
    "RowPiece",
    "ServedLinear",
    "VocabParallelEmbedding",
    "VocabParallelHead",
]
