"""The buffer digest: Triton (the interpreter here, the GPU in the gpu-marked tests) equals the
reference bit for bit, and every accident it is there to catch changes it."""

from __future__ import annotations

import pytest
import torch

from kernels.digest import (
    DigestConfig,
    _finish,
    digest,
    digest_reference_sums,
)
from tests.kernels.shapes import seed_for


def reference(buf: torch.Tensor) -> str:
    """The digest in plain torch ops: the oracle the kernel and the numpy path must match."""
    return digest(buf, backend="reference")


# Small launch shape: several full tiles and a masked tail in a buffer of a few KB.
SMALL = DigestConfig(block_words=64, tile_words=256, num_warps=4)
# The digest of the bytes 0..255 (see test_the_definition_is_pinned).
PINNED_0_TO_255 = "9881e1bb4104bb2ce86a7cedd1c5ce3b"
# Lengths in bytes: one 16-byte unit, a few, exactly one small tile, tiles and a tail.
SIZES = [16, 48, 1024, 4096, 16 * 777]


def random_bytes(n: int, *tag: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for("digest", n, *tag))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small-tiles"])
@pytest.mark.parametrize("n", SIZES)
def test_the_kernel_equals_the_reference_bit_for_bit(n, config):
    buf = random_bytes(n, config)
    assert digest(buf, backend="triton", config=config) == reference(buf)


@pytest.mark.usefixtures("interpreted")
def test_the_kernel_equals_the_reference_on_an_empty_buffer():
    empty = torch.empty(0, dtype=torch.uint8)
    assert digest(empty, backend="triton") == reference(empty)
    assert reference(empty) != reference(torch.zeros(16, dtype=torch.uint8))


def test_a_digest_is_32_hex_characters_and_deterministic():
    buf = random_bytes(4096, "determinism")
    d = digest(buf)
    assert len(d) == 32 and int(d, 16) >= 0
    assert digest(buf) == d
    assert digest(buf.clone()) == d


def test_the_definition_is_pinned():
    # A digest is stored with a version and compared across processes and releases: a change
    # of the definition must be a deliberate one (update this value and say so).
    buf = torch.arange(256, dtype=torch.int64).remainder(256).to(torch.uint8)
    assert reference(buf) == PINNED_0_TO_255


@pytest.mark.parametrize("byte", [0, 1, 2047, 4095])
@pytest.mark.parametrize("bit", [0, 7])
def test_a_flipped_bit_changes_the_digest(byte, bit):
    buf = random_bytes(4096, "flip", byte, bit)
    flipped = buf.clone()
    flipped[byte] ^= 1 << bit
    assert digest(flipped) != digest(buf)


def test_swapped_16_byte_blocks_change_the_digest():
    buf = random_bytes(4096, "swap")
    swapped = buf.clone()
    swapped[0:16], swapped[1024:1040] = buf[1024:1040], buf[0:16]
    assert not torch.equal(swapped, buf)
    assert digest(swapped) != digest(buf)


def test_swapped_words_within_a_block_change_the_digest():
    buf = random_bytes(64, "swap-words")
    words = buf.view(torch.int32).clone()
    words[0], words[1] = words[1].clone(), words[0].clone()
    assert digest(words.view(torch.uint8)) != digest(buf)


def test_a_shifted_region_changes_the_digest():
    buf = random_bytes(4096, "shift")
    assert digest(torch.roll(buf, 16)) != digest(buf)
    # The same nonzero region one word further on in a zero buffer: only the index mixing
    # tells these apart (the multiset of words is the same).
    region = random_bytes(256, "region")
    a, b = torch.zeros(1024, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)
    a[64:320], b[68:324] = region, region
    assert digest(a) != digest(b)


def test_zero_extension_and_zero_buffers_of_other_lengths_differ():
    buf = random_bytes(1024, "extend")
    extended = torch.cat([buf, torch.zeros(16, dtype=torch.uint8)])
    assert digest(extended) != digest(buf)
    zeros = {digest(torch.zeros(n, dtype=torch.uint8)) for n in (16, 32, 48, 4096)}
    assert len(zeros) == 4


@pytest.mark.usefixtures("interpreted")
def test_the_kernel_sees_a_flipped_bit_in_its_tail_and_in_a_full_tile():
    buf = random_bytes(16 * 777, "kernel-flip")
    base = digest(buf, backend="triton", config=SMALL)
    for byte in (5, 16 * 777 - 1):  # in the first full tile; in the masked tail
        flipped = buf.clone()
        flipped[byte] ^= 0x10
        assert digest(flipped, backend="triton", config=SMALL) != base


@pytest.mark.parametrize("n", [1, 15, 17, 1000])
def test_a_length_not_a_multiple_of_16_is_refused(n):
    with pytest.raises(ValueError, match="multiple of 16"):
        digest(torch.zeros(n, dtype=torch.uint8))


def test_a_buffer_of_another_dtype_or_rank_is_refused():
    with pytest.raises(ValueError, match="1-D uint8"):
        digest(torch.zeros(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D uint8"):
        digest(torch.zeros(4, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        digest(torch.zeros(64, dtype=torch.uint8)[::2])


def test_a_slice_at_an_odd_byte_digests_as_its_bytes():
    buf = random_bytes(80, "slice")
    assert digest(buf[1:65]) == digest(buf[1:65].clone())


def test_the_reference_chunking_does_not_change_the_sums():
    buf = random_bytes(4096, "chunks")
    assert digest_reference_sums(buf, chunk_words=7) == digest_reference_sums(buf)


def test_bad_launch_shapes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        DigestConfig(block_words=100)
    with pytest.raises(ValueError, match="tile_words"):
        DigestConfig(block_words=1024, tile_words=512)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_cuda_bytes(n: int, *tag: object) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed_for("gpu-digest", n, *tag))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("config", [None, DigestConfig(block_words=1024, tile_words=1 << 14)])
def test_gpu_kernel_equals_the_cpu_reference_on_100_mb(config):
    n = 100_000_000 + 16 * 37  # full tiles and a tail
    buf = random_cuda_bytes(n, config)
    assert digest(buf, config=config) == reference(buf.cpu())


@pytest.mark.gpu
@GPU
def test_gpu_digest_sees_a_flipped_bit_and_a_swap_on_100_mb():
    buf = random_cuda_bytes(100_000_000, "faults")
    base = digest(buf)
    flipped = buf.clone()
    flipped[54_321_987] ^= 0x04
    swapped = buf.clone()
    swapped[:16], swapped[-16:] = buf[-16:], buf[:16]
    assert digest(flipped) != base and digest(swapped) != base


@pytest.mark.gpu
@pytest.mark.slow
@GPU
def test_gpu_kernel_equals_the_reference_past_2_to_the_31_words():
    # 9 GiB: more words than an int32 index reaches (64-bit addressing in the kernel). The
    # reference runs on the GPU here, in large chunks, to finish in seconds.
    n = 9 * 1024**3 + 16 * 5
    assert n // 4 > 2**31
    buf = random_cuda_bytes(n, "big")
    want = _finish(digest_reference_sums(buf, chunk_words=1 << 27), n)
    assert digest(buf) == want


@pytest.mark.parametrize("nbytes", [16, 4096, (1 << 20) + 48, (3 << 16) + 16])
def test_the_cpu_path_equals_the_reference_across_chunk_boundaries(nbytes: int) -> None:
    from kernels.digest import _digest_numpy, digest_reference_sums

    buf = torch.empty(nbytes + 16, dtype=torch.uint8).random_()[16:]  # a slice, fresh data
    assert _digest_numpy(buf, chunk_words=1 << 12) == digest_reference_sums(buf)
    assert digest(buf) == digest(buf, backend="reference")
