"""Sources in and artifacts out, on real files: round trips bit for bit, agreement with the
safetensors library both ways, and every refusal (FIFO, changed file, bad header, wrong table)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from orchestrator.data.files import (
    IterStream,
    SourceChanged,
    StagingPool,
    read_safetensors,
    read_shard,
    write_shard,
)
from orchestrator.data.flat import Entry, FlatShard, pack
from orchestrator.errors import InvalidUpdate
from tests.kernels.shapes import seed_for

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Tiny buckets: every file below spans many chunks, so the pipeline turns over its buckets.
SMALL_POOL = {"bucket_bytes": 256, "buckets": 3}


def small_pool() -> StagingPool:
    return StagingPool(**SMALL_POOL)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), name
        assert torch.equal(as_bytes(g), as_bytes(w)), name


def shard_tensors(tag: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed_for("files", tag))
    return {
        "model.layers.0.mlp.up_proj.weight": (torch.randn(129, 257, generator=g) * 50).to(
            torch.float8_e4m3fn
        ),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(2, 3, generator=g),
        "model.norm.weight": torch.randn(131, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(7, 33, generator=g).to(torch.float16),
        "step": torch.tensor([3, 1, 4], dtype=torch.int64),
        "empty": torch.empty(0, 5, dtype=torch.bfloat16),
        "odd": torch.randn(1, 1, 3, generator=g),
    }


def source_tensors(tag: str, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed_for("source", tag, n))
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    shapes = [(37, 129), (5,), (64, 3), (1, 1000)]
    return {
        f"layer.{n}.t{i}": torch.randn(*shape, generator=g).to(dtype)
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))
    }


def hand_made(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ---- write_shard / read_shard --------------------------------------------------------------


@pytest.mark.parametrize("pool", [StagingPool, small_pool], ids=["default-pool", "tiny-buckets"])
def test_a_shard_round_trips_through_a_file_bit_for_bit(tmp_path, pool):
    tensors = shard_tensors("round-trip")
    shard = pack(tensors, device="cpu")
    p = pool()
    info = write_shard(tmp_path / "rank0.safetensors", shard, metadata={"version": "3"}, pool=p)
    raw = (tmp_path / "rank0.safetensors").read_bytes()
    assert info == {
        "path": str(tmp_path / "rank0.safetensors"),
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    assert os.listdir(tmp_path) == ["rank0.safetensors"]  # no temporary left behind

    back = read_shard(tmp_path / "rank0.safetensors", device="cpu", pool=p, expected=shard.table)
    assert back.table == shard.table and back.nbytes == shard.nbytes
    assert torch.equal(back.buffer, shard.buffer)
    assert back.digest() == shard.digest()
    assert_same(back.views(), tensors)


def test_safetensors_reads_a_written_shard_as_the_same_tensors(tmp_path):
    tensors = shard_tensors("safe-open")
    path = tmp_path / "s.safetensors"
    write_shard(path, pack(tensors, device="cpu"), metadata={"k": "v"}, pool=small_pool())
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert_same({k: f.get_tensor(k) for k in f.keys()}, tensors)  # noqa: SIM118


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()  # the final rename cannot replace a directory
    shard = pack(shard_tensors("fail"), device="cpu")
    with pytest.raises(OSError):
        write_shard(tmp_path / "taken", shard, metadata={}, pool=small_pool())
    assert os.listdir(tmp_path) == ["taken"]


def test_a_stream_is_read_into_place_from_chunks_of_any_size(tmp_path):
    tensors = shard_tensors("stream")
    shard = pack(tensors, device="cpu")
    path = tmp_path / "s.safetensors"
    write_shard(path, shard, metadata={}, pool=small_pool())
    raw = path.read_bytes()
    sizes = [1, 7, 8, 100, 1000, 3]
    chunks, at = [], 0
    while at < len(raw):
        n = sizes[len(chunks) % len(sizes)]
        chunks.append(raw[at : at + n])
        at += n
    back = read_shard(IterStream(iter(chunks)), device="cpu", pool=small_pool())
    assert torch.equal(back.buffer, shard.buffer) and back.table == shard.table


def test_a_short_or_long_stream_is_refused(tmp_path):
    shard = pack(shard_tensors("short"), device="cpu")
    path = tmp_path / "s.safetensors"
    write_shard(path, shard, metadata={}, pool=small_pool())
    raw = path.read_bytes()
    with pytest.raises(InvalidUpdate, match="ended after"):
        read_shard(IterStream(iter([raw[:-1]])), device="cpu", pool=small_pool())
    with pytest.raises(InvalidUpdate, match="bytes after the last tensor"):
        read_shard(IterStream(iter([raw, b"x"])), device="cpu", pool=small_pool())


def test_a_shard_with_another_table_than_expected_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, pack(shard_tensors("exp"), device="cpu"), metadata={}, pool=small_pool())
    other = pack({**shard_tensors("exp"), "extra": torch.zeros(4)}, device="cpu").table
    with pytest.raises(InvalidUpdate, match=r"unexpected \[\]"):
        read_shard(path, device="cpu", pool=small_pool(), expected=other)


def test_a_file_not_in_the_canonical_shard_layout_is_refused_as_a_shard(tmp_path):
    # Valid safetensors, but b before a: not how a refitd shard lays out two bf16 tensors.
    data = torch.arange(4, dtype=torch.bfloat16)
    path = hand_made(
        tmp_path / "x.safetensors",
        {
            "b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
            "a": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]},
        },
        as_bytes(data).numpy().tobytes(),
    )
    with pytest.raises(InvalidUpdate, match="a refitd shard has it at 0"):
        read_shard(path, device="cpu", pool=small_pool())


# ---- read_safetensors ----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_read_safetensors_equals_safetensors_load_file_on_several_files(tmp_path, threads):
    paths, want = [], {}
    for n in range(3):
        tensors = source_tensors("multi", n)
        path = tmp_path / f"model-{n:05d}-of-00003.safetensors"
        safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
        paths.append(path)
        want.update(safetensors.torch.load_file(path))
    pool = small_pool()
    loaded = read_safetensors(paths, device="cpu", pool=pool, threads=threads)
    assert_same(loaded.tensors, want)
    sizes = [p.stat().st_size - 8 - struct.unpack("<Q", p.read_bytes()[:8])[0] for p in paths]
    assert loaded.nbytes == sum(sizes)
    assert [f.path for f in loaded.files] == paths
    assert all(f.offset % 16 == 0 for f in loaded.files)
    assert loaded.files[0].metadata == {"format": "pt"}
    assert loaded.buffer.numel() % 16 == 0
    # The tensors are views into the one buffer.
    base = loaded.buffer.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in loaded.tensors.values())


def test_a_tensor_off_its_alignment_is_read_into_an_aligned_copy(tmp_path):
    f32 = torch.tensor([1.5, -2.25], dtype=torch.float32)
    path = hand_made(
        tmp_path / "odd.safetensors",
        {
            "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
        },
        b"\x01\x02\x03" + as_bytes(f32).numpy().tobytes(),
    )
    loaded = read_safetensors([path], device="cpu", pool=small_pool())
    assert torch.equal(loaded.tensors["b"], f32)
    assert loaded.tensors["a"].tolist() == [1, 2, 3]


def test_the_same_name_in_two_files_is_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, a)
    safetensors.torch.save_file({"w": torch.ones(2)}, b)
    with pytest.raises(InvalidUpdate, match="also in another file"):
        read_safetensors([a, b], device="cpu", pool=small_pool())


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_safetensors([fifo], device="cpu", pool=small_pool())
        except BaseException as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # unblock the reader before failing, so the test run ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidUpdate)
    assert "not a regular file" in str(outcome[0])


def test_a_device_file_is_refused():
    with pytest.raises(InvalidUpdate, match="not a regular file"):
        read_safetensors([Path("/dev/zero")], device="cpu", pool=small_pool())


def test_a_file_truncated_after_it_was_read_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(source_tensors("trunc", 0), path)

    def truncate(p: Path) -> None:
        os.truncate(p, p.stat().st_size - 4)

    with pytest.raises(SourceChanged, match=r"m\.safetensors changed while it was read"):
        read_safetensors([path], device="cpu", pool=small_pool(), _after_read=truncate)


def test_a_file_rewritten_in_place_after_it_was_read_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(source_tensors("rewrite", 0), path)
    # An old file (an mtime well in the past), then rewritten: same size, new mtime.
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))

    def rewrite(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(-2, os.SEEK_END)
            f.write(b"\x00\x00")

    with pytest.raises(SourceChanged, match="changed while it was read"):
        read_safetensors([path], device="cpu", pool=small_pool(), _after_read=rewrite)


def test_an_untouched_file_passes_the_change_check(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(source_tensors("calm", 0), path)
    seen: list[Path] = []
    read_safetensors([path], device="cpu", pool=small_pool(), _after_read=seen.append)
    assert seen == [path]


TENSOR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ('{"w": 1, "w": 2}', b"", "names 'w' twice"),
        ("not json", b"", "not JSON"),
        ("[1, 2]", b"", "not a JSON object"),
        ({"w": {**TENSOR, "dtype": "F12"}}, bytes(8), "unknown dtype"),
        ({"w": {**TENSOR, "shape": [3]}}, bytes(8), "8 bytes for F32"),
        # A stream's data size comes from its header: there the same fault reads differently.
        ({"w": {**TENSOR, "data_offsets": [0, 16]}}, bytes(8), "outside the data|16 bytes for"),
        ({"w": {**TENSOR, "shape": [-2]}}, bytes(8), "integers >= 0"),
        ({"w": {**TENSOR, "extra": 1}}, bytes(8), "exactly dtype"),
        ({"w": TENSOR}, bytes(12), "cover 8 of 12|bytes after the last tensor"),
        (
            {"a": TENSOR, "b": {**TENSOR, "data_offsets": [4, 12]}},
            bytes(12),
            "expected 8",
        ),
        ({"__metadata__": {"k": 1}, "w": TENSOR}, bytes(8), "__metadata__"),
    ],
    ids=[
        "duplicate",
        "not-json",
        "not-object",
        "dtype",
        "size",
        "past-end",
        "negative",
        "extra-key",
        "leftover",
        "overlap",
        "metadata",
    ],
)
def test_a_bad_header_is_refused_with_what_is_wrong(tmp_path, header, data, message):
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    file_message, _, stream_message = message.partition("|")
    with pytest.raises(InvalidUpdate, match=file_message):
        read_safetensors([path], device="cpu", pool=small_pool())
    with pytest.raises(InvalidUpdate, match=stream_message or file_message):
        read_shard(IterStream(iter([path.read_bytes()])), device="cpu", pool=small_pool())


def test_a_header_over_the_limit_or_past_the_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, path)
    with pytest.raises(InvalidUpdate, match="the limit is 16"):
        read_safetensors([path], device="cpu", pool=small_pool(), max_header_bytes=16)
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidUpdate, match="in a file of 10"):
        read_safetensors([liar], device="cpu", pool=small_pool())
    with pytest.raises(InvalidUpdate, match="not a safetensors file"):
        (tmp_path / "tiny").write_bytes(b"abc")
        read_safetensors([tmp_path / "tiny"], device="cpu", pool=small_pool())


# ---- staging pool --------------------------------------------------------------------------


def test_the_pool_allocates_once_lazily_and_is_reused_across_calls(tmp_path):
    pool = small_pool()
    assert pool.stats()["allocated"] is False
    path = tmp_path / "s.safetensors"
    write_shard(path, pack(shard_tensors("pool"), device="cpu"), metadata={}, pool=pool)
    with pool.lease(3) as first:
        ptrs = {b.tensor.data_ptr() for b in first}
    with pool.lease(3) as second:
        assert {b.tensor.data_ptr() for b in second} == ptrs
    stats = pool.stats()
    assert stats["allocated"] is True and stats["free"] == 3 and stats["leases"] == 2
    assert stats["pinned"] is torch.cuda.is_available()


def test_a_lease_waits_for_a_free_bucket_and_never_holds_while_waiting():
    pool = StagingPool(bucket_bytes=64, buckets=2, pin=False)
    got: list[int] = []
    with pool.lease(5) as everything:
        assert len(everything) == 2

        def second() -> None:
            with pool.lease(1) as one:
                got.append(len(one))

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and got == []  # no bucket free yet
    waiter.join(timeout=30)
    assert got == [1] and pool.stats()["lease_waits"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinned_buckets_without_cuda_are_refused():
    with pytest.raises(ValueError, match="needs CUDA"):
        StagingPool(pin=True)


# ---- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("pool", [StagingPool, small_pool], ids=["default-pool", "tiny-buckets"])
def test_gpu_read_safetensors_equals_load_file(tmp_path, pool):
    paths, want = [], {}
    for n in range(3):
        path = tmp_path / f"m{n}.safetensors"
        safetensors.torch.save_file(source_tensors("gpu", n), path)
        paths.append(path)
        want.update(safetensors.torch.load_file(path))
    p = pool()
    loaded = read_safetensors(paths, device="cuda", pool=p, threads=3)
    assert loaded.buffer.is_cuda
    assert_same(loaded.tensors, want)
    # The buckets were reused: read it again through the same pool.
    assert_same(read_safetensors(paths, device="cuda", pool=p).tensors, want)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("pool", [StagingPool, small_pool], ids=["default-pool", "tiny-buckets"])
def test_gpu_a_shard_round_trips_through_a_file_and_a_stream(tmp_path, pool):
    tensors = shard_tensors("gpu-round-trip")
    shard = pack(tensors, device="cuda")
    p = pool()
    path = tmp_path / "rank0.safetensors"
    info = write_shard(path, shard, metadata={"version": "1"}, pool=p)
    raw = path.read_bytes()
    assert info["sha256"] == hashlib.sha256(raw).hexdigest()
    back = read_shard(path, device="cuda", pool=p, expected=shard.table)
    assert back.buffer.is_cuda and torch.equal(back.buffer, shard.buffer)
    assert back.digest() == shard.digest()
    streamed = read_shard(
        IterStream(iter([raw[i : i + 1000] for i in range(0, len(raw), 1000)])),
        device="cuda",
        pool=p,
    )
    assert torch.equal(streamed.buffer, shard.buffer)


@pytest.mark.gpu
@GPU
def test_gpu_a_large_shard_round_trips_through_a_file(tmp_path):
    # 300 MB over 64 MiB buckets: several turns of every bucket, both directions.
    g = torch.Generator(device="cuda").manual_seed(seed_for("gpu-large"))
    w = torch.randint(0, 255, (300_000_000 - 37,), dtype=torch.uint8, device="cuda", generator=g)
    tensors = {
        "w": w.view(torch.float8_e4m3fn),
        "s": torch.rand(1000, 3, device="cuda", generator=g),
    }
    shard = pack(tensors, device="cuda")
    pool = StagingPool()
    write_shard(tmp_path / "big.safetensors", shard, metadata={}, pool=pool)
    back = read_shard(tmp_path / "big.safetensors", device="cuda", pool=pool)
    assert back.digest() == shard.digest()


def test_a_read_shard_table_is_a_flat_shard_table(tmp_path):
    shard = pack(shard_tensors("table"), device="cpu")
    write_shard(tmp_path / "t.safetensors", shard, metadata={}, pool=small_pool())
    back = read_shard(tmp_path / "t.safetensors", device="cpu", pool=small_pool())
    assert FlatShard.layout_from_json(back.table_json()) == shard.table
    assert all(isinstance(e, Entry) for e in back.table)
