"""The fused weight check (kernels/weight_error.py): the Triton kernel, run in Triton's
interpreter, against its torch reference; the reference against first principles; the bound an
honest quantization keeps, and what a broken one does to it."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.blockwise import quantize_blockwise_reference
from kernels.fp8 import BLOCK
from kernels.per_channel import quantize_per_channel_reference
from kernels.weight_error import Item, Unit, weight_errors
from tests.kernels.shapes import INTERPRETER_SHAPES, make_weight, seed_for


def weight_errors_reference(item: Item) -> torch.Tensor:
    """The oracle: plain torch, one item's own unit errors (fp32, [units]) in the kernel's order."""
    return weight_errors([item], backend="reference")[0]


HONEST_BOUND = 2.0**-4


def _blockwise(shape, seed) -> Item:
    w = make_weight(shape, torch.bfloat16, seed)
    q, s = quantize_blockwise_reference(w)
    return Item(w, q, s, Unit.BLOCKS)


def _per_channel(shape, seed) -> Item:
    w = make_weight(shape, torch.bfloat16, seed)
    q, s = quantize_per_channel_reference(w)
    return Item(w, q, s, Unit.ROWS)


def _plain(shape, seed) -> Item:
    w = make_weight(shape, torch.bfloat16, seed)
    return Item(w, w.clone(), None, Unit.PLAIN)


MAKERS = {"blocks": _blockwise, "rows": _per_channel, "plain": _plain}


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES)
def test_kernel_equals_reference_on_every_kind_in_one_call(shape):
    seed = seed_for("weight_error", shape)
    items = [make(shape, seed + i) for i, make in enumerate(MAKERS.values())]
    # A TP piece: columns 128..255 of a wider tensor, strided rows in all three operands.
    wide = _blockwise((shape[0], 384), seed + 7)
    items.append(Item(wide.ref[:, 128:256], wide.got[:, 128:256], wide.scale[:, 1:2], Unit.BLOCKS))
    got, starts = weight_errors(items, backend="triton")
    assert starts[-1] == got.numel()
    for i, item in enumerate(items):
        want = weight_errors_reference(item)
        assert torch.allclose(got[starts[i] : starts[i + 1]], want, rtol=1e-5, atol=1e-7), i


def test_reference_matches_first_principles():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=gen).bfloat16()
    q, s = quantize_blockwise_reference(w)
    errors = weight_errors_reference(Item(w, q, s, Unit.BLOCKS))
    assert errors.shape == (2 * 3,)  # blocks row-major over a 2 x 3 grid
    full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:200, :300]
    deq = q.float() * full
    block = (slice(128, 200), slice(256, 300))  # the last block, cut by both edges
    want = (deq[block] - w.float()[block]).norm() / w.float()[block].norm()
    assert float(errors[5]) == pytest.approx(float(want), rel=1e-5)
    q_rows, s_rows = quantize_per_channel_reference(w)
    rows = weight_errors_reference(Item(w, q_rows, s_rows, Unit.ROWS))
    want_row = (q_rows[17].float() * s_rows[17] - w[17].float()).norm() / w[17].float().norm()
    assert float(rows[17]) == pytest.approx(float(want_row), rel=1e-5)


@pytest.mark.parametrize("kind", ["blocks", "rows"])
def test_an_honest_quantization_stays_under_two_to_the_minus_four(kind):
    # Planted all-zero and outlier blocks included (make_weight): the bound holds for any input.
    for shape in [(129, 257), (1823, 781), (256, 4096)]:
        item = MAKERS[kind](shape, seed_for("bound", kind, shape))
        errors, _ = weight_errors([item])
        assert float(errors.max()) < HONEST_BOUND, shape
        assert float(errors.max()) > HONEST_BOUND / 4  # rounding is there, not zero


def test_broken_scales_and_data_are_far_over_the_bound_and_nan_is_inf():
    item = _blockwise((256, 384), 3)
    scale = item.scale.clone()
    scale[1, 2] *= 1000
    scale[0, 0] = float("nan")
    errors, _ = weight_errors([Item(item.ref, item.got, scale, Unit.BLOCKS)])
    assert math.isinf(float(errors[0]))  # NaN scale: inf, so max() sees it
    assert float(errors[5]) > 500  # block (1, 2), row-major in a 2 x 3 grid
    assert float(errors[1]) < HONEST_BOUND  # the others untouched
    swapped = torch.cat([item.got[128:], item.got[:128]])
    errors, _ = weight_errors([Item(item.ref, swapped, item.scale, Unit.BLOCKS)])
    assert float(errors.min()) > 0.5


def test_zero_reference_rows_are_zero_error_unless_the_shipped_row_is_not():
    ref = torch.zeros(3, 8, dtype=torch.bfloat16)
    got = ref.clone()
    got[2, 5] = 1.0
    errors, _ = weight_errors([Item(ref, got, None, Unit.PLAIN)])
    assert errors.tolist() == [0.0, 0.0, math.inf]


def test_pieces_of_a_row_are_judged_as_one_row():
    """A row-parallel per-channel weight: each rank holds some columns of every row, all scaled
    by the row's one scale. A piece holding only tiny values of an outlier row is far off on its
    own (its values fall below e4m3's normal range), yet the whole row is an honest rounding."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(4, 256, generator=gen) * 1e-5).bfloat16()
    w[:, 7] = 10.0  # one outlier per row, in the first rank's columns
    q, s = quantize_per_channel_reference(w)
    left = Item(w[:, :128], q[:, :128], s, Unit.ROWS)
    right = Item(w[:, 128:], q[:, 128:], s, Unit.ROWS)
    alone, _ = weight_errors([left, right])
    assert float(alone[4:].max()) > HONEST_BOUND  # the right piece judged on its own
    together, starts = weight_errors([left, Item(right.ref, right.got, s, Unit.ROWS, adds_to=0)])
    whole = weight_errors_reference(Item(w, q, s, Unit.ROWS))
    assert torch.allclose(together[: starts[1]], whole, rtol=1e-5)
    assert together[starts[1] :].tolist() == [0.0] * 4  # the merged piece's own units
    assert float(together.max()) < HONEST_BOUND


def test_items_are_checked():
    item = _blockwise((128, 128), 1)
    with pytest.raises(ValueError, match="bf16"):
        weight_errors([Item(item.ref.float(), item.got, item.scale, Unit.BLOCKS)])
    with pytest.raises(ValueError, match="scale for a 128x128 BLOCKS item"):
        weight_errors([Item(item.ref, item.got, item.scale[:, :0], Unit.BLOCKS)])
    with pytest.raises(ValueError, match="only row units add up"):
        weight_errors([item, Item(item.ref, item.got, item.scale, Unit.BLOCKS, adds_to=0)])
    rows = _per_channel((128, 128), 2)
    with pytest.raises(ValueError, match="not an earlier row item"):
        weight_errors([item, Item(rows.ref, rows.got, rows.scale, Unit.ROWS, adds_to=0)])
    with pytest.raises(ValueError, match="not an earlier row item"):
        weight_errors([Item(rows.ref, rows.got, rows.scale, Unit.ROWS, adds_to=0)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(1823, 781), (384, 1024)], ids=["unaligned", "aligned"])
def test_the_compiled_kernel_equals_the_reference_on_the_gpu(shape):
    # Rows of 781 elements take the launch without alignment hints; rows of 1024 the one with.
    items = [make(shape, seed_for("gpu", kind)) for kind, make in MAKERS.items()]
    wide = _blockwise((256, 512), 9)
    items.append(Item(wide.ref[:, 128:384], wide.got[:, 128:384], wide.scale[:, 1:3], Unit.BLOCKS))
    on_gpu = [
        Item(i.ref.cuda(), i.got.cuda(), None if i.scale is None else i.scale.cuda(), i.unit)
        for i in items
    ]
    got, starts = weight_errors(on_gpu)
    for i, item in enumerate(items):
        want = weight_errors_reference(item)
        assert torch.allclose(got[starts[i] : starts[i + 1]].cpu(), want, rtol=1e-4, atol=1e-7)
