"""The data path on one GPU, Qwen3-8B-shaped: sources in, digest, pack, artifact out, CUDA IPC.

    PYTHONPATH=. python3 bench/data_path.py                 # on the GPU machine (< 4 min)
    PYTHONPATH=. python3 bench/data_path.py --scale 0.1     # a smoke run at a tenth of the size

Writes a random bf16 checkpoint of Qwen3-8B's shapes (bench/verify.py's config; 4 safetensors
files, 16.4 GB at scale 1) into --dir, or reuses the one a previous run left there; reads it once
to warm the page cache; then prints one table, every row measured in this run against the
baseline (or floor) it names:

  load       safetensors.torch.load_file(device="cuda") of every file (the naive baseline),
             read_safetensors at each --threads count (ours), and two floors with the most
             threads: page-cached reads into pinned memory alone, pinned host-to-device copies
             of the same bytes alone
  digest     kernels.digest over the fp8-sized shard (9.4 GB), against a D2D copy of it
  pack       the quantized shard's tensors packed into a flat buffer, against that D2D copy
  write      write_shard of the shard (streamed, sha256, fsync), against sha256 alone
  ipc        CUDA IPC hand-off + D2D copy into a second (spawned) process, against the copy

"ratio" is baseline seconds / row seconds: above 1 is faster than the baseline, and for a
floor it says how close the row comes to it. GB/s counts the row's payload once (a copy moves
it twice: read and write).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from bench.verify import QWEN3_8B  # noqa: E402
from kernels.digest import digest  # noqa: E402
from kernels.grouped import quantize_blockwise_many  # noqa: E402
from orchestrator.data.files import (  # noqa: E402
    LoadedSource,
    MiB,
    StagingPool,
    read_safetensors,
    write_shard,
)
from orchestrator.data.flat import FlatShard, empty_like_layout, pack  # noqa: E402
from orchestrator.data.ipc import Exported  # noqa: E402
from orchestrator.model.hf_model import build_model, expected_shapes  # noqa: E402

FILES = 4
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The receiving process of the IPC rows: allocates its own buffer once, then for every handle
# it is sent: open, copy device to device, close, answer with its own timing.
RECEIVER = r"""
import json, sys, time, torch
from kernels.digest import digest
from orchestrator.data.ipc import open_handle
first = json.loads(sys.stdin.readline())
dst = torch.empty(first["nbytes"], dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("quit"):
        break
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with open_handle(msg["handle"]) as src:
        dst.copy_(src)
        torch.cuda.synchronize()
    del src
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    if msg.get("digest"):
        out["digest"] = digest(dst)
    print(json.dumps(out), flush=True)
"""


# ---- setup -----------------------------------------------------------------------------------


def model_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of Qwen3-8B, with layers and vocabulary scaled."""
    config = dict(QWEN3_8B)
    if scale != 1.0:
        config["num_hidden_layers"] = max(1, round(config["num_hidden_layers"] * scale))
        config["vocab_size"] = max(128, round(config["vocab_size"] * scale / 128) * 128)
    return expected_shapes(build_model(config))


def write_checkpoint(directory: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> list[Path]:
    """FILES safetensors files of random bf16 values (not zeros: a reader must move real bytes),
    split by size in checkpoint order; reused when a previous run wrote the same."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"model-{i + 1:05d}-of-{FILES:05d}.safetensors" for i in range(FILES)]
    manifest = directory / "manifest.json"
    want = {"seed": seed, "files": FILES, "shapes": {n: list(s) for n, s in shapes.items()}}
    reusable = manifest.exists() and all(p.exists() for p in paths)
    if reusable and json.loads(manifest.read_text()) == want:
        print(f"reusing the checkpoint in {directory}")
        return paths
    manifest.unlink(missing_ok=True)
    total = sum(2 * _numel(s) for s in shapes.values())
    groups: list[list[str]] = [[] for _ in range(FILES)]
    done = 0
    for name, shape in shapes.items():
        groups[min(FILES - 1, done * FILES // total)].append(name)
        done += 2 * _numel(shape)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    start = time.perf_counter()
    for path, names in zip(paths, groups, strict=True):
        tensors = {
            n: torch.randn(shapes[n], generator=gen, device="cuda", dtype=torch.bfloat16).cpu()
            for n in names
        }
        safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
        del tensors
    manifest.write_text(json.dumps(want))
    print(f"wrote {total / 1e9:.1f} GB in {FILES} files in {time.perf_counter() - start:.0f} s")
    return paths


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(64 * MiB)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def data_region(path: Path) -> tuple[int, int]:
    """(start, length) of a safetensors file's data region."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n, path.stat().st_size - 8 - n


# ---- timing ----------------------------------------------------------------------------------


def wall(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def best(fn: Callable[[], object], n: int) -> float:
    return min(wall(fn) for _ in range(n))


def median(fn: Callable[[], object], n: int) -> float:
    fn()  # warm-up: compilation, first-touch allocations
    return statistics.median(wall(fn) for _ in range(n))


class Table:
    """Rows in order; each names its baseline. ratio = baseline seconds / row seconds, except
    for a floor row, where it is floor seconds / the named row's seconds: the share of the
    floor's speed that row reaches."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int, str, bool]] = []
        self.seconds: dict[str, float] = {}

    def add(
        self, name: str, seconds: float, nbytes: int, baseline: str = "", floor: bool = False
    ) -> None:
        self.rows.append((name, seconds, nbytes, baseline, floor))
        self.seconds[name] = seconds
        print(f"  {name}: {seconds:.4f} s", flush=True)

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print()
        print(f"{'':{width}}  {'seconds':>9}  {'GB/s':>7}  {'ratio':>6}  vs")
        for name, seconds, nbytes, baseline, floor in self.rows:
            ratio, vs = "", ""
            if baseline and floor:
                ratio, vs = f"{seconds / self.seconds[baseline]:6.2f}", f"reached by {baseline}"
            elif baseline:
                ratio, vs = f"{self.seconds[baseline] / seconds:6.2f}", baseline
            print(
                f"{name:{width}}  {seconds:9.4f}  {nbytes / seconds / 1e9:7.1f}  {ratio:>6}  {vs}"
            )


# ---- rows ------------------------------------------------------------------------------------


def read_into_pinned(paths: list[Path], pool: StagingPool, threads: int) -> None:
    """Floor: page-cached reads of every data region into pinned buckets, nothing else."""
    chunks = []
    for p in paths:
        start, length = data_region(p)
        chunks += [
            (p, start + o, min(pool.bucket_bytes, length - o))
            for o in range(0, length, pool.bucket_bytes)
        ]
    fds = {p: os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths}
    try:
        with pool.lease(threads) as buckets, ThreadPoolExecutor(len(buckets)) as ex:
            free = list(buckets)

            def read(chunk: tuple[Path, int, int]) -> None:
                bucket = free.pop()
                try:
                    p, offset, n = chunk
                    view, done = bucket.view[:n], 0
                    while done < n:
                        done += os.preadv(fds[p], [view[done:]], offset + done)
                finally:
                    free.append(bucket)

            list(ex.map(read, chunks))
    finally:
        for fd in fds.values():
            os.close(fd)


def pinned_h2d(total: int, pool: StagingPool) -> Callable[[], None]:
    """Floor: the same bytes copied host to device from pinned buckets, one stream."""
    dest = torch.empty(total, dtype=torch.uint8, device="cuda")

    def run() -> None:
        with pool.lease(pool.buckets) as buckets:
            for i, o in enumerate(range(0, total, pool.bucket_bytes)):
                n = min(pool.bucket_bytes, total - o)
                dest[o : o + n].copy_(buckets[i % len(buckets)].tensor[:n], non_blocking=True)

    return run


def sha256_floor(total: int, pool: StagingPool) -> Callable[[], None]:
    """Floor of an artifact write: sha256 over as many bytes, from pinned memory."""

    def run() -> None:
        with pool.lease(1) as (bucket, *_):
            sha = hashlib.sha256()
            for o in range(0, total, pool.bucket_bytes):
                sha.update(bucket.view[: min(pool.bucket_bytes, total - o)])

    return run


def fp8_shard_tensors(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard a TP-1 rank gets: linear weights quantized (fp8 + fp32 block scales), the
    rest bf16, as views of the loaded source."""
    linear = [n for n, t in source.items() if t.dim() == 2 and n.split(".")[-2] in LINEAR]
    out = {n: t for n, t in source.items() if n not in set(linear)}
    for name, (q, s) in zip(
        linear, quantize_blockwise_many([source[n] for n in linear]), strict=True
    ):
        out[name] = q
        out[name.removesuffix("weight") + "weight_scale_inv"] = s
    return out


def start_receiver() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RECEIVER],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def ask(proc: subprocess.Popen[str], msg: dict[str, Any]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(msg) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the receiving process ended (exit code {proc.wait()})")
    return json.loads(line)


def ipc_hand_off(
    proc: subprocess.Popen[str], buffer: torch.Tensor, *, check: bool
) -> tuple[float, dict[str, Any]]:
    """One hand-off: export (a new handle), the receiver opens, copies, closes; the exporter
    releases. Wall time seen by the exporter, and the receiver's answer."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    exported = Exported()
    answer = ask(proc, {"handle": exported.export(buffer), "digest": check})
    seconds = time.perf_counter() - t0
    exported.release()
    return seconds, answer


# ---- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/refitd-bench"))
    parser.add_argument("--scale", type=float, default=1.0, help="layers and vocabulary x scale")
    parser.add_argument(
        "--threads", default="4,8", help="read_safetensors thread counts (buckets = threads)"
    )
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="runs of the fast rows (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--remove", action="store_true", help="delete the checkpoint afterwards")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",")]
    receiver = start_receiver()  # its imports and CUDA start overlap the setup below
    try:
        return run(args, threads, receiver)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
        if args.remove:
            for p in args.dir.glob("*.safetensors"):
                p.unlink()


def run(args: argparse.Namespace, threads: list[int], receiver: subprocess.Popen[str]) -> int:
    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    paths = write_checkpoint(args.dir, model_shapes(args.scale), args.seed)
    warm_page_cache(paths)
    table = Table()
    bucket = args.bucket_mb * MiB
    source = load_rows(table, paths, threads, bucket, args.repeat)
    shard = shard_rows(table, source, args.repeat)
    del source
    ipc_rows(table, receiver, shard, args.repeat)
    write_rows(table, shard, args.dir / "shard-rank0.safetensors", bucket)
    table.print()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


def load_rows(
    table: Table, paths: list[Path], threads: list[int], bucket: int, repeat: int
) -> LoadedSource:
    """The checkpoint to the GPU: naive baseline, ours at each thread count, two floors.
    Returns what the last read_safetensors loaded (checked equal to the baseline's)."""
    source_bytes = sum(data_region(p)[1] for p in paths)
    print(f"checkpoint: {source_bytes / 1e9:.2f} GB of bf16 in {len(paths)} files (page-cached)")
    baseline = "load_file(cuda)"
    reference: dict[str, torch.Tensor] = {}

    def load_file() -> None:
        reference.clear()
        for p in paths:
            reference.update(safetensors.torch.load_file(p, device="cuda"))

    table.add(baseline, best(load_file, 2), source_bytes)
    loaded: list[LoadedSource] = []
    for t in threads:
        pool = StagingPool(bucket_bytes=bucket, buckets=t)
        read_safetensors(paths[:1], device="cuda", pool=pool, threads=t)  # allocates the pool

        def read(pool: StagingPool = pool, t: int = t) -> None:
            loaded.clear()  # the previous copy goes before the next is read
            loaded.append(read_safetensors(paths, device="cuda", pool=pool, threads=t))

        table.add(f"read_safetensors {t} threads", best(read, 2), source_bytes, baseline)
    ours = loaded[0]
    mismatched = [n for n, ref in reference.items() if not torch.equal(ours.tensors[n], ref)]
    assert not mismatched and set(ours.tensors) == set(reference), mismatched[:5]
    reference.clear()

    fastest = f"read_safetensors {threads[-1]} threads"
    most = max(threads)
    floor_pool = StagingPool(bucket_bytes=bucket, buckets=most)
    read_into_pinned(paths, floor_pool, most)  # allocates the pool
    seconds = best(lambda: read_into_pinned(paths, floor_pool, most), 2)
    table.add(f"floor: read into pinned, {most} threads", seconds, source_bytes, fastest, True)
    seconds = median(pinned_h2d(source_bytes, floor_pool), repeat)
    table.add("floor: pinned H2D", seconds, source_bytes, fastest, floor=True)
    return ours


def shard_rows(table: Table, source: LoadedSource, repeat: int) -> FlatShard:
    """The fp8 shard of the source: its D2D copy (the baseline), digest, and pack into a slot."""
    tensors = fp8_shard_tensors(source.tensors)
    shard = pack(tensors, device="cuda")
    n = shard.buffer.numel()
    print(f"fp8 shard: {shard.nbytes / 1e9:.2f} GB, {len(shard.table)} tensors")
    copy = "D2D copy of the shard"
    dst = torch.empty_like(shard.buffer)
    table.add(copy, median(lambda: dst.copy_(shard.buffer), repeat), n)
    table.add("digest of the shard", median(lambda: digest(shard.buffer), repeat), n, copy)
    slot = empty_like_layout(shard.table, shard.nbytes, "cuda")
    seconds = median(lambda: pack(tensors, device="cuda", out=slot.buffer), repeat)
    table.add("pack of the shard (into a slot)", seconds, n, copy)
    assert FlatShard(slot.buffer, shard.table, shard.nbytes).digest() == shard.digest()
    return shard


def ipc_rows(table: Table, receiver: subprocess.Popen[str], shard: FlatShard, repeat: int) -> None:
    """CUDA IPC hand-off + D2D copy into the receiving process, against the in-process copy."""
    n = shard.buffer.numel()
    ask(receiver, {"nbytes": n})  # it allocates its buffer, answers "ready"
    _, answer = ipc_hand_off(receiver, shard.buffer, check=True)
    assert answer["digest"] == digest(shard.buffer), "the receiver got other bytes"
    runs = [ipc_hand_off(receiver, shard.buffer, check=False) for _ in range(repeat)]
    copy = "D2D copy of the shard"
    table.add("CUDA IPC hand-off + D2D copy", statistics.median(r[0] for r in runs), n, copy)
    seconds = statistics.median(r[1]["seconds"] for r in runs)
    table.add("  (in the receiver: open, copy, close)", seconds, n, copy)
    ask_quit(receiver)


def write_rows(table: Table, shard: FlatShard, artifact: Path, bucket: int) -> None:
    """The artifact: write_shard (streamed, hashed, fsynced) against sha256 alone."""
    pool = StagingPool(bucket_bytes=bucket, buckets=4)
    table.add("floor: sha256 alone", wall(sha256_floor(shard.nbytes, pool)), shard.nbytes)

    def write() -> None:
        write_shard(artifact, shard, metadata={"version": "1"}, pool=pool)

    table.add("write_shard (sha256, fsync)", wall(write), shard.nbytes, "floor: sha256 alone")
    artifact.unlink()


def ask_quit(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"quit": True}) + "\n")
    proc.stdin.flush()
    proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
