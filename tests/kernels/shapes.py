"""Module-level shape tables and input makers shared by the kernels tests."""

from __future__ import annotations

import math

import torch

from kernels.fp8 import BLOCK

# Awkward shapes: one row, edge blocks on both axes, more than one block of each kind.
AWKWARD_SHAPES = [(1, 128), (7, 130), (129, 257), (1823, 781)]
# Real linear-weight shapes, reference only (the larger ones cost seconds on 2 CPU cores):
# Qwen3-8B's k/v projection (8 kv heads x 128, hidden 4096) and Qwen2.5-7B's TP-8 shards of
# its MLP (intermediate 18944 / 8 = 2368, not a multiple of 128; hidden 3584).
REAL_SHAPES = [(1024, 4096), (2368, 3584), (3584, 2368)]
# Small enough for the Triton interpreter (it runs each program in numpy, one at a time).
INTERPRETER_SHAPES = [(1, 128), (7, 130), (129, 257), (200, 300)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# 10*log10(12 * 2**6): e4m3fn keeps 3 mantissa bits, so in the normal range a value in
# [2**e, 2**(e+1)) is rounded on a grid of step 2**(e-3). A rounding error spread uniformly
# over one step has power step**2 / 12, and |x| >= 2**e, so noise / signal <= 2**-6 / 12:
# SNR >= 28.9 dB wherever the signal sits in its binade (28.9 at the bottom, 34.9 at the
# top; about 31.5 dB for Gaussian data, as measured). Subnormal outputs (|q| < 2**-6) are
# values below amax / 28672; their error is tiny in absolute terms. The floor takes 0.5 dB
# off for the spread of a noise estimate over as few as 128 elements.
SNR_FLOOR_DB = 10 * math.log10(12 * 2**6) - 0.5


def seed_for(*parts: object) -> int:
    """A fixed seed per test case, so that every case draws fresh but reproducible data."""
    return sum((i + 1) * ord(c) for i, c in enumerate(repr(parts))) % (2**31)


def make_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random normal weights with a planted all-zero block and a planted outlier block.

    Block (0, 0) is all zero. The last block gets one element 1000x the typical magnitude,
    so that its other values land far down the fp8 range. With a single block, the zero
    block wins and the outlier goes to a row of its own when there is one.
    """
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    w = torch.randn(m, n, generator=g) * 0.02
    w[:BLOCK, :BLOCK] = 0.0
    if m > BLOCK or n > BLOCK:
        w[-1, -1] = 20.0
    elif m > 1:
        w[-1, 0] = 20.0
    return w.to(dtype)


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-noise ratio of y as an approximation of x, in dB (both cast to fp64)."""
    x64, y64 = x.double(), y.double()
    noise = (x64 - y64).pow(2).sum().item()
    signal = x64.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
