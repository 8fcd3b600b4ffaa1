"""The FP8 products of the served model: emulated in fp32, or real FP8 GEMMs where the GPU has them.

SGLang serves a blockwise FP8 linear layer on Hopper as one GEMM of fp8 activations (one scale per
token per 128 input channels) and fp8 weights (one scale per 128x128 block), accumulated in fp32;
a per-channel weight as a rowwise-scaled GEMM (one scale per token, one per output channel). The
emulation computes the same sums from the dequantized operands in fp32 and is the CPU path and
the oracle. `torch._scaled_mm` does them on the GPU, but which scale layouts it takes depends on
the torch build and the device, so `select_gemm` probes it once on a tiny case against the
emulation. Where no blockwise layout matches (torch 2.11 on the H200 takes none), the blockwise
products go to our Triton kernel (kernels/fp8_gemm.py, as SGLang's Triton path computes them),
itself probed against the emulation; only when that fails too are they emulated (a WARNING).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.blockwise import dequantize_blockwise
from kernels.fp8 import BLOCK, FP8_DTYPE
from kernels.fp8_gemm import fp8_block_gemm
from kernels.token_group import ACTIVATION_EPS, dequantize_token_groups, quantize_token_groups

logger = logging.getLogger("refitd.verification")

BF16 = torch.bfloat16


def quantize_activation_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 activations as SGLang quantizes them: (q fp8 [T, K], scale fp32 [T, ceil(K/group)]).

    `x` is [T, K]; each run of `group` consecutive channels of each token gets one scale
    max(|x|) / 448 (a last, shorter group its own), and q = x / scale, clamped, rounded to e4m3.
    One Triton launch on a GPU for 128-channel groups (kernels/token_group.py).
    """
    return quantize_token_groups(x, group)


def dequantize_activation_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """q * scale, each scale spread over its group: fp32 [T, K]."""
    return dequantize_token_groups(q, scale, group)


class Gemm:
    """The emulation: fp32 products of dequantized operands. Returns fp32 [T, N]."""

    name = "emulated"

    def blockwise(
        self, xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor
    ) -> torch.Tensor:
        """fp8 activations [T, K] with scales [T, K/128], fp8 weight [N, K] with [N/128, K/128]."""
        x = dequantize_activation_groups(xq, xs, BLOCK)
        return x @ dequantize_blockwise(wq, ws, dtype=torch.float32).t()

    def rowwise(
        self, xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor
    ) -> torch.Tensor:
        """fp8 activations [T, K] with scales [T, 1], fp8 weight [N, K] with scales [N, 1]."""
        return (xq.float() * xs) @ (wq.float() * ws).t()


# How scaled_mm is handed the blockwise scales: (activation scales, weight scales) -> operands.
Layout = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

_LAYOUTS: dict[str, Layout] = {
    # [T, K/128] row-major and the weight's [N/128, K/128] transposed in place.
    "row-major": lambda xs, ws: (xs.contiguous(), ws.t()),
    # DeepGEMM's habit: activation scales token-major in memory (column-major [T, K/128]).
    "token-major": lambda xs, ws: (xs.t().contiguous().t(), ws.t()),
    "row-major, weight scales copied": lambda xs, ws: (xs.contiguous(), ws.t().contiguous()),
    "token-major, weight scales copied": lambda xs, ws: (
        xs.t().contiguous().t(),
        ws.t().contiguous(),
    ),
}


ScaledMMFn = Callable[..., torch.Tensor]  # torch._scaled_mm's signature
# kernels.fp8_gemm.fp8_block_gemm's signature: (xq, xs, wq, ws) -> bf16 [T, N].
BlockGemmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockGemm:
    """A blockwise FP8 product other than torch._scaled_mm's: its name, the function, and
    whether it takes only aligned shapes (see `takes`)."""

    name: str
    fn: BlockGemmFn
    aligned_only: bool = False

    def takes(self, xq: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> bool:
        return not self.aligned_only or cublas_blockwise_takes(xq, wq, ws)


def cublas_blockwise_takes(xq: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> bool:
    """Whether cuBLAS's blockwise FP8 GEMM (behind torch._scaled_mm and F.scaled_mm) may be
    given this product: whole 128-blocks of outputs, channels in whole groups of four 128-blocks,
    and a token count in 16s (token-major activation scales 16-byte aligned). cuBLAS reads the
    weight's scale grid padded to four blocks of K; torch 2.11's _scaled_mm does not check, and
    on other shapes it returns wrong sums without an error (seen on the H200: a tiny model's
    honest update rejected with mean KL 7). So these shapes only, whatever the probe says."""
    n, k = wq.shape
    shapes = n % BLOCK == 0 and k % (4 * BLOCK) == 0 and xq.shape[0] % 16 == 0
    # cuBLASLt wants 16-byte aligned operands; a weight or its scales cut out of a packed
    # shard may start anywhere (the probe only saw fresh, aligned tensors).
    aligned = wq.is_contiguous() and all(t.data_ptr() % 16 == 0 for t in (xq, wq, ws))
    return shapes and aligned


def _scaled_mm_v2(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor):
    """torch.nn.functional.scaled_mm (torch >= 2.10) with blockwise recipes, as the H200 with
    torch 2.11 takes them: activation scales token-major in memory ([T, K/128] with strides
    (1, T), DeepGEMM's habit), the weight's [N/128, K/128] grid transposed in place."""
    f = torch.nn.functional
    return f.scaled_mm(  # type: ignore[attr-defined]
        xq,
        wq.t(),
        xs.t().contiguous().t(),
        f.ScalingType.BlockWise1x128,  # type: ignore[attr-defined]
        ws.t(),
        f.ScalingType.BlockWise128x128,  # type: ignore[attr-defined]
        output_dtype=BF16,
    )


TRITON_GEMM = BlockGemm("Triton fp8 GEMM (kernels/fp8_gemm.py)", fp8_block_gemm)
SCALED_MM_V2 = BlockGemm("F.scaled_mm (blockwise recipes)", _scaled_mm_v2, aligned_only=True)


def block_gemm_candidates() -> list[BlockGemm]:
    """The blockwise products to probe after torch._scaled_mm, in order of preference."""
    found = [TRITON_GEMM]
    if hasattr(torch.nn.functional, "scaled_mm"):
        found.insert(0, SCALED_MM_V2)
    return found


@dataclass
class ScaledMM(Gemm):
    """torch._scaled_mm where the probe found it right, else (blockwise) the first product of
    `block_gemms` (those whose probe passed) that takes the weight, the emulation elsewhere.
    Returns bf16."""

    blockwise_layout: str | None
    rowwise_ok: bool
    scaled_mm: ScaledMMFn = torch._scaled_mm
    block_gemms: tuple[BlockGemm, ...] = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        used = [
            g.name + (" for aligned shapes" if g.aligned_only else "") for g in self.block_gemms
        ]
        if self.blockwise_layout:
            used.insert(0, f"scaled_mm ({self.blockwise_layout}) for aligned shapes")
        blockwise = "blockwise: " + (", then ".join(used) or "emulated")
        # What no product that takes every shape covers is emulated.
        if used and all(g.aligned_only for g in self.block_gemms):
            blockwise += ", else emulated"
        rowwise = "rowwise: scaled_mm" if self.rowwise_ok else "rowwise: emulated"
        return f"{blockwise}, {rowwise}"

    def blockwise(
        self, xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor
    ) -> torch.Tensor:
        if self.blockwise_layout is not None and cublas_blockwise_takes(xq, wq, ws):
            scale_a, scale_b = _LAYOUTS[self.blockwise_layout](xs, ws)
            return self.scaled_mm(xq, wq.t(), scale_a, scale_b, out_dtype=BF16)
        for gemm in self.block_gemms:
            if gemm.takes(xq, wq, ws):
                return gemm.fn(xq, xs, wq, ws)
        return super().blockwise(xq, xs, wq, ws)

    def rowwise(
        self, xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor
    ) -> torch.Tensor:
        # fp8 GEMMs need both dims of the weight in multiples of 16 (16-byte rows).
        if not self.rowwise_ok or wq.shape[0] % 16 or wq.shape[1] % 16:
            return super().rowwise(xq, xs, wq, ws)
        return self.scaled_mm(xq, wq.t(), xs.contiguous(), ws.t().contiguous(), out_dtype=BF16)


def select_gemm(device: torch.device) -> Gemm:
    """The emulation on the CPU; on CUDA, torch._scaled_mm for what the probe finds it computes
    right, else the blockwise products of `block_gemm_candidates` that compute right."""
    if device.type != "cuda":
        return Gemm()
    return probe_scaled_mm(device, torch._scaled_mm, block_gemm_candidates())


def probe_scaled_mm(
    device: torch.device, scaled_mm: ScaledMMFn, block_gemms: Sequence[BlockGemm] = ()
) -> ScaledMM:
    """Try `scaled_mm` (torch._scaled_mm's signature) on a tiny case with every scale layout; keep
    the first that matches the emulation. Scales differ by up to 2^8 from block to block and the
    scale grid is not square, so a layout read the wrong way round does not match by chance.
    Each of `block_gemms` is tried on the same case too and kept if it matches (an error, a
    Triton compile failure say, counts as a mismatch): cuBLAS takes only some shapes
    (`cublas_blockwise_takes`), and the others go to the first kept product that takes them."""
    emulated = Gemm()
    gen = torch.Generator(device="cpu").manual_seed(0)
    # K of four blocks: the smallest that every product takes (see BlockGemm.takes).
    tokens, k, n = 32, 512, 256

    def fp8(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * 100).clamp(-448, 448).to(FP8_DTYPE)

    def scales(rows: int, cols: int) -> torch.Tensor:
        return 2.0 ** torch.randint(-8, 1, (rows, cols), generator=gen).float()

    xq, wq = fp8(tokens, k).to(device), fp8(n, k).to(device)
    xs, ws = scales(tokens, k // BLOCK).to(device), scales(n // BLOCK, k // BLOCK).to(device)
    want = emulated.blockwise(xq, xs, wq, ws)
    layout = None
    for name, arrange in _LAYOUTS.items():
        try:
            scale_a, scale_b = arrange(xs, ws)
            got = scaled_mm(xq, wq.t(), scale_a, scale_b, out_dtype=BF16)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            logger.debug("blockwise scaled_mm with %s scales: %s", name, exc)
            continue
        if _close(got, want):
            layout = name
            break
    kept = []
    for gemm in block_gemms:
        try:
            if _close(gemm.fn(xq, xs, wq, ws), want):
                kept.append(gemm)
            else:
                logger.warning("%s differs from the emulation on %s", gemm.name, device)
        except Exception as exc:  # any failure (a Triton compile error, say): fall back, say why
            logger.warning("%s failed on %s: %s", gemm.name, device, exc)
    rxs, rws = scales(tokens, 1).to(device), scales(n, 1).to(device)
    try:
        got = scaled_mm(xq, wq.t(), rxs.contiguous(), rws.t().contiguous(), out_dtype=BF16)
        rowwise_ok = _close(got, emulated.rowwise(xq, rxs, wq, rws))
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        logger.debug("rowwise scaled_mm: %s", exc)
        rowwise_ok = False
    chosen = ScaledMM(layout, rowwise_ok, scaled_mm, tuple(kept))
    if not any(not g.aligned_only for g in kept) or not rowwise_ok:
        logger.warning(
            "torch._scaled_mm does not serve every FP8 GEMM on %s (%s); verification emulates "
            "the rest in fp32, which is slower but computes the same sums",
            torch.cuda.get_device_name(device) if device.type == "cuda" else device,
            chosen.name,
        )
    return chosen


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # bf16 output: 2^-8 relative per element, plus fp32 summation order.
    return bool((got.float() - want).abs().max() <= 2.0**-6 * want.abs().max())


__all__ = [
    "ACTIVATION_EPS",
    "SCALED_MM_V2",
    "TRITON_GEMM",
    "BlockGemm",
    "BlockGemmFn",
    "Gemm",
    "ScaledMM",
    "block_gemm_candidates",
    "cublas_blockwise_takes",
    "dequantize_activation_groups",
    "probe_scaled_mm",
    "quantize_activation_groups",
    "select_gemm",
]
