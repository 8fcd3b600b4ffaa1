"""Safetensors sources in, shard artifacts out, streamed through a reusable staging pool.

Sources are read once, straight into one flat buffer on the target device: reader threads
pread file bytes into pinned host buckets (the syscall releases the GIL), and each full bucket
is copied host-to-device on a side CUDA stream while the next ones are read; an event per
bucket says when its copy finished and it may be filled again. On the CPU the threads read
into the destination directly. Artifacts go the other way, hashed (sha256) as they are
written, under a temporary name, fsynced and renamed. Nothing is ever whole in Python bytes.

No mmap anywhere: a file truncated under a mapping kills the reader with SIGBUS. Files are
opened O_NONBLOCK and must be regular files (a FIFO or a device is refused, never waited on);
a file whose size or mtime changed while it was read is refused (SourceChanged).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from orchestrator.data.flat import (
    METADATA_KEY,
    BadLayout,
    Entry,
    FlatShard,
    dtype_from_name,
    empty_like_layout,
    layout,
    padded,
)
from orchestrator.errors import InvalidUpdate

MiB = 1 << 20
MAX_HEADER_BYTES = 100 * MiB


class SourceChanged(InvalidUpdate):
    """A file changed (size or mtime) while it was being read."""


class Readable(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


# ---- staging pool ------------------------------------------------------------------------------


@dataclass
class _Bucket:
    tensor: torch.Tensor  # (bucket_bytes,) uint8 host memory, pinned when the pool pins
    view: memoryview  # the same bytes, for os.preadv / os.write / hashlib
    # The last device copy that reads or fills it. Blocking-sync events: a thread waiting on
    # one sleeps instead of spinning on a core the readers need.
    event: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Block until the last device copy touching this bucket finished."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class StagingPool:
    """Host buckets reused across calls: allocated once, on first use (pinned when CUDA is
    available, unless pin=False). A call leases between one and all of them; calls running at
    once share the pool without deadlock (a lease never waits while holding buckets)."""

    def __init__(self, bucket_bytes: int = 64 * MiB, buckets: int = 4, pin: bool | None = None):
        if bucket_bytes <= 0 or bucket_bytes % 16 or buckets <= 0:
            raise ValueError("bucket_bytes must be a positive multiple of 16, buckets positive")
        self.bucket_bytes = bucket_bytes
        self.buckets = buckets
        self.pin = torch.cuda.is_available() if pin is None else pin
        if self.pin and not torch.cuda.is_available():
            raise ValueError("pinned host memory needs CUDA")
        self._all: list[_Bucket] = []
        self._free: list[_Bucket] = []
        self._cond = threading.Condition()
        self._leases = 0
        self._lease_waits = 0
        self._bytes_staged = 0

    def _allocate(self) -> None:
        for _ in range(self.buckets):
            t = torch.empty(self.bucket_bytes, dtype=torch.uint8, pin_memory=self.pin)
            self._all.append(_Bucket(t, _host_view(t)))
        self._free = list(self._all)

    @contextmanager
    def lease(self, want: int) -> Iterator[list[_Bucket]]:
        """Up to `want` buckets (at least one), returned to the pool at the end."""
        with self._cond:
            if not self._all:
                self._allocate()
            if not self._free:
                self._lease_waits += 1
            while not self._free:
                self._cond.wait()
            n = max(1, min(want, len(self._free)))
            taken, self._free = self._free[:n], self._free[n:]
            self._leases += 1
        try:
            yield taken
        finally:
            with self._cond:
                self._free.extend(taken)
                self._cond.notify_all()

    def _staged(self, nbytes: int) -> None:
        with self._cond:
            self._bytes_staged += nbytes

    def stats(self) -> dict[str, Any]:
        """Sizes, whether allocated and pinned, and counters since creation."""
        with self._cond:
            return {
                "bucket_bytes": self.bucket_bytes,
                "buckets": self.buckets,
                "pinned": self.pin,
                "allocated": bool(self._all),
                "free": len(self._free) if self._all else self.buckets,
                "leases": self._leases,
                "lease_waits": self._lease_waits,
                "bytes_staged": self._bytes_staged,
            }


# ---- file access -------------------------------------------------------------------------------


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open read-only without blocking and without following into a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidUpdate(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InvalidUpdate(f"{path} is not a regular file")
    return fd, st


def _check_unchanged(fd: int, before: os.stat_result, path: Path) -> None:
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise SourceChanged(f"{path} changed while it was read (size or mtime); send it again")


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SourceChanged(f"{path} ended early: it changed while it was read")
        done += n


def _read_exact(stream: Readable, view: memoryview, what: str) -> None:
    done = 0
    while done < len(view):
        n = stream.readinto(view[done:])
        if not n:
            raise InvalidUpdate(f"{what} ended after {done} of {len(view)} bytes")
        done += n


# A shard file is flushed to the disk every this many bytes as it is written, not all at once
# at the end: a single fsync of 9 GB of dirty pages stalls every other fsync on the device for
# seconds (ext4 commits its journal for all files at once), the embedded Redis's
# `appendfsync always` writes included, so a rank's heartbeat and the 2PC's decisions would wait
# behind the artifact (seen on the H200 machine as 1.8 s heartbeat gaps).
SYNC_EVERY = 256 * MiB


class _Writer:
    """os.write until done, with an fdatasync every SYNC_EVERY bytes."""

    def __init__(self) -> None:
        self._unsynced = 0

    def __call__(self, fd: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        self._unsynced += len(view)
        if self._unsynced >= SYNC_EVERY:
            os.fdatasync(fd)
            self._unsynced = 0


def _host_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor."""
    return t.numpy().data.cast("B")


# ---- headers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets within the file's data region
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidUpdate(f"the header names {key!r} twice")
        out[key] = value
    return out


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(
    raw: bytes, data_size: int | None, where: str
) -> tuple[list[_Tensor], dict[str, str]]:
    """The tensors of a safetensors header, in data order, and its metadata; refuses anything
    safetensors would refuse, and gaps, overlaps or bytes left over in the data region
    (data_size None: a stream's, known from the header alone)."""
    limit = math.inf if data_size is None else data_size
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidUpdate(f"{where}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidUpdate(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidUpdate(f"{where}: __metadata__ must map strings to strings")
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidUpdate(f"{where}: {name}: needs exactly dtype, shape, data_offsets")
        try:
            dtype = dtype_from_name(info["dtype"])
        except BadLayout as e:
            raise InvalidUpdate(f"{where}: {name}: {e.message}") from None
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise InvalidUpdate(f"{where}: {name}: shape must be a list of integers >= 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_nonneg_int(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= limit
        ):
            raise InvalidUpdate(
                f"{where}: {name}: data_offsets {offsets} outside the data ({data_size} bytes)"
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != itemsize * math.prod(shape):
            raise InvalidUpdate(
                f"{where}: {name}: {offsets[1] - offsets[0]} bytes for {info['dtype']} {shape}"
            )
        tensors.append(_Tensor(name, dtype, tuple(shape), offsets[0], offsets[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    position = 0
    for t in tensors:
        if t.begin != position:
            raise InvalidUpdate(
                f"{where}: {t.name} starts at {t.begin}, expected {position} (data must be "
                "contiguous, without gaps or overlaps)"
            )
        position = t.end
    if data_size is not None and position != data_size:
        raise InvalidUpdate(f"{where}: the tensors cover {position} of {data_size} data bytes")
    return tensors, metadata


def _header_length(prefix: bytes, limit: int, available: int | None, where: str) -> int:
    (n,) = struct.unpack("<Q", prefix)
    if n == 0 or n > limit:
        raise InvalidUpdate(f"{where}: header of {n} bytes (the limit is {limit})")
    if available is not None and 8 + n > available:
        raise InvalidUpdate(f"{where}: header of {n} bytes in a file of {available}")
    return n


# ---- host -> device pipeline -------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    dest: int  # offset in the destination buffer
    length: int  # <= the pool's bucket size
    source: int  # offset in its source (a file), or 0 for a stream
    fd: int = -1
    path: Path = field(default_factory=Path)


Fill = Callable[[_Chunk, memoryview], None]


def _pread_fill(chunk: _Chunk, view: memoryview) -> None:
    _pread_exact(chunk.fd, view, chunk.source, chunk.path)


def _chunks(
    dest: int, length: int, size: int, fd: int = -1, source: int = 0, path: Path = Path()
) -> list[_Chunk]:
    return [
        _Chunk(dest + o, min(size, length - o), source + o, fd, path)
        for o in range(0, length, size)
    ]


def _fill_device(
    chunks: Sequence[_Chunk], fill: Fill, dest: torch.Tensor, pool: StagingPool, threads: int
) -> None:
    """Fill dest (a CUDA uint8 tensor) chunk by chunk through the pool's buckets: reads in
    worker threads, each bucket copied to the device on a side stream as soon as it is full,
    and filled again only once that copy finished. The current stream waits on the copies;
    the host does not."""
    device = dest.device
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)  # dest may have been allocated (or be in use) on `current`

    def read(bucket: _Bucket, chunk: _Chunk) -> None:
        bucket.wait()
        fill(chunk, bucket.view[: chunk.length])

    with pool.lease(len(chunks)) as buckets:
        free = deque(buckets)
        todo = iter(chunks)
        inflight: deque[tuple[_Chunk, _Bucket, Future[None]]] = deque()
        executor = ThreadPoolExecutor(max(1, min(threads, len(buckets))), "refitd-read")
        try:

            def submit() -> None:
                chunk = next(todo, None)
                if chunk is not None:
                    bucket = free.popleft()
                    inflight.append((chunk, bucket, executor.submit(read, bucket, chunk)))

            for _ in range(len(free)):
                submit()
            while inflight:
                chunk, bucket, future = inflight.popleft()
                future.result()
                with torch.cuda.stream(side):
                    dest[chunk.dest : chunk.dest + chunk.length].copy_(
                        bucket.tensor[: chunk.length], non_blocking=True
                    )
                    bucket.event = torch.cuda.Event(blocking=True)
                    bucket.event.record(side)
                pool._staged(chunk.length)
                free.append(bucket)
                submit()
        finally:
            # On an error, reads already running still write into their buckets: wait for
            # them before the buckets go back to the pool (each carries its copy's event).
            executor.shutdown(wait=True, cancel_futures=True)
            # Even on an error: copies queued into dest must be ordered before whatever the
            # caller's stream does next with (or after freeing) dest.
            current.wait_stream(side)


def _fill_host(chunks: Sequence[_Chunk], fill: Fill, dest: torch.Tensor, threads: int) -> None:
    """Fill dest (a CPU uint8 tensor) directly, chunks read in parallel."""
    view = _host_view(dest)
    if threads <= 1 or len(chunks) <= 1:
        for c in chunks:
            fill(c, view[c.dest : c.dest + c.length])
        return
    with ThreadPoolExecutor(threads, "refitd-read") as executor:
        futures = [executor.submit(fill, c, view[c.dest : c.dest + c.length]) for c in chunks]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()


def _fill(
    chunks: Sequence[_Chunk], fill: Fill, dest: torch.Tensor, pool: StagingPool, threads: int
) -> None:
    if dest.device.type == "cuda":
        _fill_device(chunks, fill, dest, pool, threads)
    elif dest.device.type == "cpu":
        _fill_host(chunks, fill, dest, threads)
    else:
        raise ValueError(f"cannot read into a tensor on {dest.device}")


# ---- sources in --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One source file: where its data region sits in the loaded buffer, and its metadata."""

    path: Path
    offset: int  # of its data region in LoadedSource.buffer (a multiple of 16)
    nbytes: int
    metadata: dict[str, str]


@dataclass
class LoadedSource:
    """Every file's data region back to back (each starting on 16 bytes) in one flat uint8
    buffer on the device, and the tensors as typed views into it."""

    buffer: torch.Tensor
    tensors: dict[str, torch.Tensor]
    nbytes: int  # data bytes read, without the alignment gaps
    seconds: float  # wall time of the call (the device copies are queued, maybe not done)
    files: tuple[SourceFile, ...] = ()


@dataclass
class _OpenSource:
    path: Path
    fd: int
    stat: os.stat_result
    data_start: int  # in the file
    tensors: list[_Tensor]
    metadata: dict[str, str]

    @property
    def data_size(self) -> int:
        return self.stat.st_size - self.data_start


def _open_source(path: Path, max_header_bytes: int) -> _OpenSource:
    fd, st = open_regular(path)
    try:
        prefix = bytearray(8)
        if st.st_size < 8:
            raise InvalidUpdate(f"{path}: {st.st_size} bytes, not a safetensors file")
        _pread_exact(fd, memoryview(prefix), 0, path)
        n = _header_length(bytes(prefix), max_header_bytes, st.st_size, str(path))
        raw = bytearray(n)
        _pread_exact(fd, memoryview(raw), 8, path)
        tensors, metadata = _parse_header(bytes(raw), st.st_size - 8 - n, str(path))
        return _OpenSource(path, fd, st, 8 + n, tensors, metadata)
    except BaseException:
        os.close(fd)
        raise


def validate_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
    """Validate one file's header as `read_safetensors` does (JSON, dtypes, offsets, no name
    twice), reading no tensor data; raises InvalidUpdate."""
    os.close(_open_source(path, max_header_bytes).fd)


def _typed(
    buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * math.prod(shape)
    raw = buffer[offset : offset + nbytes]
    if offset % itemsize:
        # A tensor placed off its alignment by its writer: a view cannot start there (rare).
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def read_safetensors(
    paths: Sequence[Path],
    *,
    device: torch.device | str,
    pool: StagingPool,
    threads: int = 4,
    max_header_bytes: int = MAX_HEADER_BYTES,
    _after_read: Callable[[Path], None] | None = None,
) -> LoadedSource:
    """Read safetensors files once into one flat buffer on `device` (see the module docstring).
    Headers are validated (JSON, dtypes, offsets, no duplicates, within the file and across
    files); structure checks against a model are the caller's. `_after_read(path)` is a test
    seam, called after a file's bytes were read and before it is checked for changes."""
    start = time.perf_counter()
    device = torch.device(device)
    sources: list[_OpenSource] = []
    try:
        for p in paths:
            sources.append(_open_source(Path(p), max_header_bytes))
        names: set[str] = set()
        for s in sources:
            for t in s.tensors:
                if t.name in names:
                    raise InvalidUpdate(f"{s.path}: tensor {t.name!r} is also in another file")
                names.add(t.name)
        offsets, total = [], 0
        for s in sources:
            offsets.append(total)
            total = padded(total + s.data_size)
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
        chunks = []
        for s, off in zip(sources, offsets, strict=True):
            buffer[off + s.data_size : padded(off + s.data_size)].zero_()
            chunks += _chunks(off, s.data_size, pool.bucket_bytes, s.fd, s.data_start, s.path)
        _fill(chunks, _pread_fill, buffer, pool, threads)
        for s in sources:
            if _after_read is not None:
                _after_read(s.path)
            _check_unchanged(s.fd, s.stat, s.path)
    finally:
        for s in sources:
            os.close(s.fd)
    tensors = {
        t.name: _typed(buffer, off + t.begin, t.dtype, t.shape)
        for s, off in zip(sources, offsets, strict=True)
        for t in s.tensors
    }
    return LoadedSource(
        buffer=buffer,
        tensors=tensors,
        nbytes=sum(s.data_size for s in sources),
        seconds=time.perf_counter() - start,
        files=tuple(
            SourceFile(s.path, off, s.data_size, s.metadata)
            for s, off in zip(sources, offsets, strict=True)
        ),
    )


# ---- artifacts out -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(
    path: Path, shard: FlatShard, *, metadata: Mapping[str, str], pool: StagingPool
) -> dict[str, Any]:
    """Write a shard as a safetensors file: streamed in bucket-sized chunks (device -> pinned
    bucket -> file), sha256 computed over the bytes as they are written (in a second thread),
    written under a temporary name, fsynced, renamed into place, directory fsynced.
    Returns {"path", "bytes", "sha256"}."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    header = shard.header_bytes(dict(metadata))
    sha = hashlib.sha256(header)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            write = _Writer()
            write(fd, memoryview(header))
            with ThreadPoolExecutor(1, "refitd-sha256") as hasher:
                # One hashing thread takes the chunks in order; the file writes go on here.
                if shard.buffer.device.type == "cuda":
                    _write_from_device(fd, shard, pool, hasher, sha, write)
                else:
                    view = _host_view(shard.buffer)
                    for c in _chunks(0, shard.nbytes, pool.bucket_bytes):
                        part = view[c.dest : c.dest + c.length]
                        hashed = hasher.submit(sha.update, part)
                        write(fd, part)
                        hashed.result()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {"path": str(path), "bytes": len(header) + shard.nbytes, "sha256": sha.hexdigest()}


def _write_from_device(
    fd: int,
    shard: FlatShard,
    pool: StagingPool,
    hasher: ThreadPoolExecutor,
    sha: Any,
    write: _Writer,
) -> None:
    device = shard.buffer.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # the shard was written there
    chunks = _chunks(0, shard.nbytes, pool.bucket_bytes)
    with pool.lease(len(chunks)) as buckets:
        hashing: dict[int, Future[None]] = {}

        def copy_out(i: int) -> None:
            """Queue chunk i's device-to-host copy into its bucket."""
            k = i % len(buckets)
            if k in hashing:
                hashing.pop(k).result()  # the hasher is done reading this bucket
            b, c = buckets[k], chunks[i]
            b.wait()
            with torch.cuda.stream(side):
                b.tensor[: c.length].copy_(
                    shard.buffer[c.dest : c.dest + c.length], non_blocking=True
                )
                b.event = torch.cuda.Event(blocking=True)
                b.event.record(side)

        try:
            if chunks:
                copy_out(0)
            for i, c in enumerate(chunks):
                k = i % len(buckets)
                b = buckets[k]
                b.wait()
                pool._staged(c.length)
                part = b.view[: c.length]
                hashing[k] = hasher.submit(sha.update, part)
                # With two buckets or more, the next chunk's copy runs while this one is
                # written and hashed.
                if i + 1 < len(chunks) and len(buckets) > 1:
                    copy_out(i + 1)
                write(fd, part)
                if i + 1 < len(chunks) and len(buckets) == 1:
                    copy_out(i + 1)
        finally:
            for f in hashing.values():
                f.result()
            # On an error a copy may still be queued: the shard's memory must outlive it.
            for b in buckets:
                b.wait()


# ---- shards in ---------------------------------------------------------------------------------


class IterStream(io.RawIOBase):
    """A readable stream over an iterator of bytes chunks (an HTTP response body, say), so a
    shard can be read into place without ever being whole in memory."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        while not self._pending:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._pending = memoryview(nxt).cast("B")
        n = min(len(out), len(self._pending))
        out[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _shard_table(tensors: list[_Tensor], where: str) -> tuple[tuple[Entry, ...], int]:
    """The table of a shard file: its offsets must be the canonical layout's."""
    table, nbytes = layout({t.name: (t.dtype, t.shape) for t in tensors})
    found = {t.name: t.begin for t in tensors}
    for e in table:
        if found[e.name] != e.offset:
            raise InvalidUpdate(
                f"{where}: {e.name} at {found[e.name]}, a refitd shard has it at {e.offset}"
            )
    return table, nbytes


def _check_expected(table: tuple[Entry, ...], expected: Sequence[Entry], where: str) -> None:
    if table == tuple(expected):
        return
    mine = {e.name: e for e in table}
    theirs = {e.name: e for e in expected}
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    differ = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
    raise InvalidUpdate(
        f"{where}: the shard's table is not the expected one (missing {missing[:5]}, "
        f"unexpected {extra[:5]}, different {differ[:5]})"
    )


def read_shard(
    source: Path | Readable,
    *,
    device: torch.device | str,
    pool: StagingPool,
    expected: Sequence[Entry] | None = None,
    threads: int = 4,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> FlatShard:
    """The inverse of write_shard: a shard file (read with pread) or a stream (anything with
    `readinto`, e.g. IterStream over an HTTP body) read into a FlatShard on `device`. The header
    is validated; with `expected`, the table must equal it."""
    device = torch.device(device)
    if isinstance(source, (str, Path)):
        return _read_shard_file(Path(source), device, pool, expected, threads, max_header_bytes)
    return _read_shard_stream(source, device, pool, expected, max_header_bytes)


def _read_shard_file(
    path: Path,
    device: torch.device,
    pool: StagingPool,
    expected: Sequence[Entry] | None,
    threads: int,
    max_header_bytes: int,
) -> FlatShard:
    src = _open_source(path, max_header_bytes)
    try:
        table, nbytes = _shard_table(src.tensors, str(path))
        if expected is not None:
            _check_expected(table, expected, str(path))
        shard = empty_like_layout(table, nbytes, device)
        chunks = _chunks(0, nbytes, pool.bucket_bytes, src.fd, src.data_start, path)
        _fill(chunks, _pread_fill, shard.buffer, pool, threads)
        _check_unchanged(src.fd, src.stat, path)
    finally:
        os.close(src.fd)
    return shard


def _read_shard_stream(
    stream: Readable,
    device: torch.device,
    pool: StagingPool,
    expected: Sequence[Entry] | None,
    max_header_bytes: int,
) -> FlatShard:
    where = "the shard stream"
    prefix = bytearray(8)
    _read_exact(stream, memoryview(prefix), where)
    n = _header_length(bytes(prefix), max_header_bytes, None, where)
    raw = bytearray(n)
    _read_exact(stream, memoryview(raw), where)
    tensors, _ = _parse_header(bytes(raw), None, where)
    table, nbytes = _shard_table(tensors, where)
    if expected is not None:
        _check_expected(table, expected, where)
    shard = empty_like_layout(table, nbytes, device)

    def fill(chunk: _Chunk, view: memoryview) -> None:
        _read_exact(stream, view, where)

    # One reader: a stream is read in order.
    _fill(_chunks(0, nbytes, pool.bucket_bytes), fill, shard.buffer, pool, threads=1)
    if stream.readinto(bytearray(1)):
        raise InvalidUpdate(f"{where}: bytes after the last tensor")
    return shard
