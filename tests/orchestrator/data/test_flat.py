"""Flat shards: the layout, typed views, pack, the JSON table, the digest and the safetensors
header (read back by safetensors itself)."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from orchestrator.data.flat import (
    BadLayout,
    Entry,
    FlatShard,
    empty_like_layout,
    layout,
    pack,
    padded,
)
from orchestrator.errors import InvalidUpdate
from tests.kernels.shapes import seed_for

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_tensor(shape, dtype, *tag) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for("flat", shape, dtype, *tag))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def mixed_tensors(tag: str = "") -> dict[str, torch.Tensor]:
    """Several dtypes and awkward shapes, a scalar, zero-size tensors, and non-contiguous
    sources (a transpose, a strided slice)."""
    base = random_tensor((7, 130), torch.float32, tag)
    return {
        "layers.0.q.weight": random_tensor((129, 257), torch.float32, tag).to(torch.float8_e4m3fn),
        "layers.0.q.weight_scale_inv": random_tensor((2, 3), torch.float32, tag),
        "norm.weight": random_tensor((131,), torch.bfloat16, tag),
        "embed.weight": random_tensor((5, 3), torch.float16, tag),
        "steps": random_tensor((3,), torch.int64, tag),
        "mask": random_tensor((9,), torch.bool, tag),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty.f32": torch.empty(0, 4, dtype=torch.float32),
        "empty.bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
    }


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (bitwise equality: NaN == NaN, -0.0 != 0.0)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(as_bytes(g), as_bytes(w)), name


def test_the_layout_is_back_to_back_itemsize_descending_then_by_name():
    table, total = layout(
        {
            "b": (torch.bfloat16, (3,)),
            "a": (torch.bfloat16, (1,)),
            "q": (torch.float8_e4m3fn, (5,)),
            "s": (torch.float32, (3,)),
            "z": (torch.float32, (0,)),
            "d": (torch.float64, (1,)),
        }
    )
    assert [(e.name, e.offset, e.nbytes) for e in table] == [
        ("d", 0, 8),
        ("s", 8, 12),
        ("z", 20, 0),
        ("a", 20, 2),
        ("b", 22, 6),
        ("q", 28, 5),
    ]
    assert total == 33
    assert all(e.offset % e.dtype.itemsize == 0 for e in table)


def test_the_layout_does_not_depend_on_insertion_order():
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in mixed_tensors().items()}
    assert layout(specs) == layout(dict(reversed(list(specs.items()))))


def test_pack_copies_every_tensor_into_views_of_one_buffer():
    tensors = mixed_tensors("pack")
    shard = pack(tensors, device="cpu")
    assert shard.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert shard.buffer.numel() == padded(shard.nbytes) and shard.buffer.numel() % 16 == 0
    assert torch.equal(shard.buffer[shard.nbytes :], torch.zeros_like(shard.buffer[shard.nbytes :]))
    views = shard.views()
    assert_same(views, tensors)
    # Views, not copies: a write through one is a write into the buffer.
    views["steps"][0] = 12345
    offset = next(e.offset for e in shard.table if e.name == "steps")
    assert shard.buffer[offset : offset + 8].view(torch.int64).item() == 12345


def test_pack_reuses_a_large_enough_out_buffer_and_refuses_a_small_one():
    tensors = mixed_tensors("out")
    out = torch.full((65536,), 0xAB, dtype=torch.uint8)
    shard = pack(tensors, device="cpu", out=out)
    assert shard.buffer.data_ptr() == out.data_ptr()
    assert_same(shard.views(), tensors)
    assert shard.nbytes % 16  # there is padding, and it held 0xAB before
    assert (shard.buffer[shard.nbytes :] == 0).all()
    with pytest.raises(ValueError, match="needs"):
        pack(tensors, device="cpu", out=torch.empty(64, dtype=torch.uint8))


def test_the_table_round_trips_through_json():
    shard = pack(mixed_tensors("json"), device="cpu")
    text = json.dumps(shard.table_json())
    table = FlatShard.layout_from_json(json.loads(text))
    assert table == shard.table
    dtypes = {item["dtype"] for item in shard.table_json()}
    assert {"F8_E4M3", "BF16", "F32", "F16", "F64", "I64", "BOOL"} <= dtypes


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t[0].update(dtype="F12"), "unknown dtype"),
        (lambda t: t[0].update(offset=8), "offset"),
        (lambda t: t[0].update(nbytes=t[0]["nbytes"] + 1), "bytes for"),
        (lambda t: t[1].update(name=t[0]["name"]), "twice"),
        (lambda t: t[0].update(shape=[-1]), "non-negative"),
        (lambda t: t[0].update(offset=True), "non-negative integer"),
        (lambda t: t[0].pop("nbytes"), "exactly"),
        (lambda t: t.reverse(), "offset"),
    ],
)
def test_a_wrong_json_table_is_refused_with_what_is_wrong(mutate, message):
    items = pack(mixed_tensors("bad-json"), device="cpu").table_json()
    mutate(items)
    with pytest.raises(BadLayout, match=message) as info:
        FlatShard.layout_from_json(items)
    assert isinstance(info.value, InvalidUpdate)


def test_a_shard_refuses_a_buffer_of_the_wrong_length_or_a_table_that_overruns_it():
    shard = pack(mixed_tensors("wrong"), device="cpu")
    with pytest.raises(ValueError, match="needs a buffer"):
        FlatShard(shard.buffer[:16], shard.table, shard.nbytes)
    with pytest.raises(BadLayout, match="covers"):
        FlatShard(shard.buffer, shard.table[:-1], shard.nbytes)


def test_the_digest_sees_a_changed_byte_and_a_changed_table():
    shard = pack(mixed_tensors("digest"), device="cpu")
    d = shard.digest()
    data, table = d.split("-")
    assert len(data) == 32 and len(table) == 16
    assert pack(mixed_tensors("digest"), device="cpu").digest() == d

    changed = FlatShard(shard.buffer.clone(), shard.table, shard.nbytes)
    changed.buffer[3] ^= 1
    assert changed.digest().split("-")[0] != data

    # Same bytes, another reading of them: one tensor renamed, or read as another dtype.
    renamed = [
        Entry("norm.weight.x", e.dtype, e.shape, e.offset, e.nbytes)
        if e.name == "norm.weight"
        else e
        for e in shard.table
    ]
    retyped = [
        Entry(e.name, torch.float16, e.shape, e.offset, e.nbytes) if e.name == "norm.weight" else e
        for e in shard.table
    ]
    for table in (renamed, retyped):
        other = FlatShard(shard.buffer, table, shard.nbytes)
        assert other.digest() == f"{data}-{other.table_hash()[:16]}"
        assert other.digest() != d


def test_empty_like_layout_builds_a_receiving_slot_from_a_table():
    src = pack(mixed_tensors("slot"), device="cpu")
    table = FlatShard.layout_from_json(src.table_json())
    slot = empty_like_layout(table, src.nbytes, "cpu")
    slot.buffer.copy_(src.buffer)
    assert_same(slot.views(), mixed_tensors("slot"))
    assert slot.digest() == src.digest()


def test_the_header_makes_a_safetensors_file_that_safetensors_reads(tmp_path):
    tensors = mixed_tensors("header")
    shard = pack(tensors, device="cpu")
    header = shard.header_bytes({"version": "7", "format": "pt"})
    (n,) = struct.unpack("<Q", header[:8])
    assert n == len(header) - 8 and n % 8 == 0
    assert json.loads(header[8:])["__metadata__"] == {"version": "7", "format": "pt"}
    path = tmp_path / "shard.safetensors"
    path.write_bytes(header + shard.buffer[: shard.nbytes].numpy().tobytes())
    assert_same(safetensors.torch.load_file(path), tensors)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"version": "7", "format": "pt"}


def test_a_dtype_without_a_safetensors_name_is_refused():
    with pytest.raises(BadLayout, match="no safetensors name"):
        pack({"c": torch.zeros(2, dtype=torch.complex128)}, device="cpu")


@pytest.mark.gpu
@GPU
def test_gpu_pack_from_host_and_device_sources_and_back():
    tensors = mixed_tensors("gpu")
    on_gpu = {n: (t.cuda() if i % 2 else t) for i, (n, t) in enumerate(tensors.items())}
    shard = pack(on_gpu, device="cuda")
    assert shard.buffer.is_cuda
    assert_same(shard.views(), tensors)
    back = pack(shard.views(), device="cpu")  # GPU sources into host memory: one wait
    assert_same(back.views(), tensors)
    assert back.digest() == shard.digest()
