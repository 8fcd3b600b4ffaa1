"""A 128-bit, position-mixed, non-cryptographic digest of a byte buffer: Triton kernel, launcher,
plain-torch reference.

It guards the data path against accidents (a torn copy, a stale or swapped buffer, a wrong
offset), not against an adversary: Redis and the ranks are trusted, the bytes in flight are not.

Definition. The buffer (a multiple of 16 bytes) is read as little-endian uint32 words w[i].
For each lane k (LANES below: a seed S and an odd index multiplier G):

    key(i) = lo32(i) * G + hi32(i) * HI_MUL + S      (uint32 wrap-around)
    lane_k = sum over i of fmix32(w[i] ^ key(i))    (uint64 wrap-around)

fmix32 is murmur3's finalizer, a bijection that spreads every input bit over the word, so a
flipped bit, a word moved to another index (swapped blocks, a shifted region) or a zero word
appended each change a term by a pseudo-random amount. Each lane is then mixed with the byte
length (murmur3's 64-bit finalizer) and the digest is the two 64-bit results in hex. A random
change goes unseen with a chance of about 2^-32 per lane, 2^-64 for the pair.

The kernel and the reference compute the same uint32 arithmetic: Triton on uint32 values
(wrap-around multiply, logical shifts), the reference on int64 values masked to 32 bits, with
every product split so that no intermediate exceeds 2^63 (no signed overflow anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

Backend = Literal["auto", "triton", "reference"]

ALIGN = 16  # callers pad buffers to this; the kernel's 16-byte vector loads rely on it
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
HI_MUL = 0x9E3779B1  # golden ratio * 2^32 (odd): spreads the high word of an index
# (seed, index multiplier) per lane; the multipliers are odd so lo32(i) -> key is a bijection.
LANES = ((0x243F6A88, 0x85EBCA77), (0xB7E15162, 0xC2B2AE3D))
# A lane's final mix with the length: different odd constants, so the lanes stay independent.
LENGTH_MUL = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93)


@dataclass(frozen=True)
class DigestConfig:
    """Launch shape. Every program reduces TILE_WORDS words (BLOCK_WORDS per loop step) to one
    partial per lane; tile_words must be a power of two (see _digest_kernel)."""

    block_words: int = 2048
    tile_words: int = 1 << 16
    num_warps: int = 8

    def __post_init__(self) -> None:
        for name in ("block_words", "tile_words"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.tile_words < self.block_words or self.tile_words > 1 << 30:
            raise ValueError("tile_words must be in [block_words, 2^30]")


DEFAULT_CONFIG = DigestConfig()


@triton.jit
def _fmix32(h):
    # murmur3 fmix32 on uint32: `>>` of an unsigned value is a logical shift.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _digest_kernel(
    words_ptr,  # (n_words,) int32: the buffer's bytes as little-endian words
    partial_ptr,  # (programs, 2) int64: each program's two lane sums, bit patterns of uint64
    first_word,  # int64: index of the first word of program 0 (0, or the tail's start)
    n_words,  # int64: total words of the buffer (bounds the masked tail)
    S0: tl.constexpr,  # lane 0 seed
    G0: tl.constexpr,  # lane 0 index multiplier
    S1: tl.constexpr,
    G1: tl.constexpr,
    HI_MUL: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,  # words per loop step
    TILE_WORDS: tl.constexpr,  # words per program, a power of two
    MASKED: tl.constexpr,  # the tail program: words past n_words are left out
):
    pid = tl.program_id(0)
    base = first_word + pid.to(tl.int64) * TILE_WORDS
    # Programs start on multiples of TILE_WORDS (a power of two <= 2^32), so lo32 of an index
    # inside the tile is lo32(base) + offset without a carry into hi32: the index's halves
    # are scalars plus a per-element offset, and key(i) costs one add per element.
    base_lo = base.to(tl.uint32)
    base_hi = (base >> 32).to(tl.uint32)
    c0 = base_lo * G0 + base_hi * HI_MUL + S0
    c1 = base_lo * G1 + base_hi * HI_MUL + S1
    offs = tl.arange(0, BLOCK_WORDS)
    offs_u = offs.to(tl.uint32)
    step0 = offs_u * G0
    step1 = offs_u * G1
    acc0 = tl.zeros([BLOCK_WORDS], dtype=tl.uint64)
    acc1 = tl.zeros([BLOCK_WORDS], dtype=tl.uint64)
    ptr = words_ptr + base
    for it in range(TILE_WORDS // BLOCK_WORDS):
        start = it * BLOCK_WORDS
        if MASKED:
            valid = base + start + offs < n_words
            w = tl.load(ptr + start + offs, mask=valid, other=0)
        else:
            w = tl.load(ptr + start + offs, eviction_policy="evict_first")
        w = w.to(tl.uint32, bitcast=True)
        shift = start.to(tl.uint32)
        h0 = _fmix32(w ^ (step0 + (c0 + shift * G0)))
        h1 = _fmix32(w ^ (step1 + (c1 + shift * G1)))
        if MASKED:
            # A word past the end would still hash to a nonzero term: drop it.
            h0 = tl.where(valid, h0, 0)
            h1 = tl.where(valid, h1, 0)
        acc0 += h0.to(tl.uint64)
        acc1 += h1.to(tl.uint64)
    tl.store(partial_ptr + pid * 2, tl.sum(acc0, axis=0).to(tl.int64, bitcast=True))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(acc1, axis=0).to(tl.int64, bitcast=True))


def kernel_is_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before this module was imported."""
    return type(_digest_kernel).__name__ == "InterpretedFunction"


def check_buffer(buf: torch.Tensor) -> None:
    """A digestible buffer: 1-D contiguous uint8, a multiple of 16 bytes long."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"digest takes a 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    if not buf.is_contiguous():
        raise ValueError("digest takes a contiguous tensor")
    if buf.numel() % ALIGN:
        raise ValueError(
            f"digest takes a length that is a multiple of {ALIGN} bytes (pad the buffer), "
            f"got {buf.numel()}"
        )


def _words(buf: torch.Tensor) -> torch.Tensor:
    # A slice may start at any byte; a word view needs 4-byte alignment (rare: copy it).
    if buf.data_ptr() % 4:
        buf = buf.clone()
    return buf.view(torch.int32)


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    h ^= h >> 33
    return h


def _finish(lane_sums: tuple[int, int], nbytes: int) -> str:
    """The two lane sums mixed with the length: 32 hex characters."""
    # length + 1: an empty buffer gets a digest of its own, not fmix64(0) = 0.
    out = (
        _fmix64(s ^ (((nbytes + 1) * m) & MASK64))
        for s, m in zip(lane_sums, LENGTH_MUL, strict=True)
    )
    return "".join(f"{h:016x}" for h in out)


def _digest_triton(buf: torch.Tensor, config: DigestConfig) -> tuple[int, int]:
    words = _words(buf)
    n_words = words.numel()
    full = n_words // config.tile_words
    tail = n_words - full * config.tile_words
    programs = full + (1 if tail else 0)
    partials = torch.empty((max(programs, 1), 2), dtype=torch.int64, device=buf.device)
    if programs == 0:
        return 0, 0
    meta = dict(
        S0=LANES[0][0],
        G0=LANES[0][1],
        S1=LANES[1][0],
        G1=LANES[1][1],
        HI_MUL=HI_MUL,
        BLOCK_WORDS=config.block_words,
        TILE_WORDS=config.tile_words,
        num_warps=config.num_warps,
    )
    # Full tiles without masks (the hot loop is loads and integer ops only), then one masked
    # program for the tail.
    if full:
        _digest_kernel[(full,)](words, partials, 0, n_words, MASKED=False, **meta)
    if tail:
        _digest_kernel[(1,)](
            words, partials[full:], full * config.tile_words, n_words, MASKED=True, **meta
        )
    return _sum_partials(partials[:programs])


def _sum_partials(partials: torch.Tensor) -> tuple[int, int]:
    # Summing the uint64 bit patterns as int64 could overflow (undefined in C++); the 32-bit
    # halves summed apart stay below 2^63 for any count of partials under 2^31. One host sync.
    lo = (partials & MASK32).sum(dim=0)
    hi = ((partials >> 32) & MASK32).sum(dim=0)
    (lo0, lo1), (hi0, hi1) = torch.stack([lo, hi]).tolist()
    return ((hi0 << 32) + lo0) & MASK64, ((hi1 << 32) + lo1) & MASK64


# ---- reference ------------------------------------------------------------------------------

# Words per chunk: 2^18 words (1 MiB of data) keeps the int64 temporaries around 2 MiB each.
REFERENCE_CHUNK_WORDS = 1 << 18


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a constant c < 2^32, split in 16-bit
    halves of c so that no product exceeds 2^48."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _fmix32_ref(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def digest_reference_sums(
    buf: torch.Tensor, chunk_words: int = REFERENCE_CHUNK_WORDS
) -> tuple[int, int]:
    """The two lane sums (see the module docstring), in chunks of plain int64 torch ops.
    chunk_words bounds the temporaries (about 8 bytes per word, a few alive at once)."""
    if not 0 < chunk_words <= 1 << 31:
        raise ValueError(f"chunk_words must be in (0, 2^31], got {chunk_words}")
    words = _words(buf)
    sums = [0, 0]
    for start in range(0, words.numel(), chunk_words):
        chunk = words[start : start + chunk_words].to(torch.int64) & MASK32
        idx = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=buf.device)
        idx_lo, idx_hi = idx & MASK32, idx >> 32
        for k, (seed, mul) in enumerate(LANES):
            key = (_mul32(idx_lo, mul) + _mul32(idx_hi, HI_MUL) + seed) & MASK32
            h = _fmix32_ref(chunk ^ key)
            # A chunk's sum is below 2^31 * 2^32: exact in int64.
            sums[k] = (sums[k] + int(h.sum().item())) & MASK64
    return sums[0], sums[1]


def _digest_numpy(buf: torch.Tensor, chunk_words: int = 1 << 22) -> tuple[int, int]:
    """The reference's lane sums in numpy uint32, whose arithmetic wraps mod 2^32 by definition:
    the same function, a few times faster on the CPU than the int64 torch oracle (which it is
    tested against), for CPU ranks and CI."""
    import numpy as np

    words = _words(buf).numpy().view(np.uint32)
    sums = [0, 0]
    with np.errstate(over="ignore"):
        for start in range(0, words.size, chunk_words):
            chunk = words[start : start + chunk_words]
            idx = np.arange(start, start + chunk.size, dtype=np.uint64)
            idx_lo = (idx & np.uint64(MASK32)).astype(np.uint32)
            idx_hi = (idx >> np.uint64(32)).astype(np.uint32)
            for k, (seed, mul) in enumerate(LANES):
                key = idx_lo * np.uint32(mul) + idx_hi * np.uint32(HI_MUL) + np.uint32(seed)
                h = chunk ^ key
                h ^= h >> np.uint32(16)
                h *= np.uint32(0x85EBCA6B)
                h ^= h >> np.uint32(13)
                h *= np.uint32(0xC2B2AE35)
                h ^= h >> np.uint32(16)
                sums[k] = (sums[k] + int(h.sum(dtype=np.uint64))) & MASK64
    return sums[0], sums[1]


def digest(buf: torch.Tensor, backend: Backend = "auto", config: DigestConfig | None = None) -> str:
    """128-bit digest of a 1-D uint8 buffer (length a multiple of 16), 32 hex characters.

    Triton on CUDA tensors, the reference on CPU tensors; backend="triton" forces the kernel
    (on the CPU only under TRITON_INTERPRET=1). Both give the same digest bit for bit.
    """
    check_buffer(buf)
    if backend == "reference":
        return _finish(digest_reference_sums(buf), buf.numel())
    if backend == "auto" and buf.device.type != "cuda":
        return _finish(_digest_numpy(buf), buf.numel())
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if buf.device.type != "cuda" and not kernel_is_interpreted():
        raise RuntimeError(
            "the Triton digest needs a CUDA tensor, or TRITON_INTERPRET=1 set before kernels "
            "is imported to run it on the CPU"
        )
    return _finish(_digest_triton(buf, config or DEFAULT_CONFIG), buf.numel())
