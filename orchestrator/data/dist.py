"""One flat buffer from one process to another over torch.distributed (NCCL between GPUs, gloo
on the CPU), with every wait bounded.

A `Link` is a process group of exactly two, the sender (group rank 0, the daemon) and the
receiver (group rank 1, a rank agent), built directly on a store (`ProcessGroupGloo` /
`ProcessGroupNCCL` objects, not `init_process_group`): so groups can be formed and dropped again
and again in one process, one per generation, and nothing depends on a default group.

The transfer: a header (magic, version, bytes, bucket size) that the receiver checks, then the
buffer in buckets, two in flight. A buffer on the backend's device moves as views of itself
(no copy, no extra memory); one that is not (a CUDA shard over gloo) is staged through two
bucket buffers, so the copy of bucket i+1 overlaps the send of bucket i: at most two buckets of
extra memory per side.

Bounds. NCCL collectives have no timeout of their own and gloo's honour only the group's one,
and neither can be interrupted from another thread. So each wait here is given the time left
to the caller's deadline (gloo: `Work.wait(timeout)`; NCCL: polling `is_completed`), and the
caller runs the whole transfer in a `Bounded` thread that it walks away from on its deadline or
when it is cancelled: a stuck transfer then ends by its own deadline, in a thread nobody waits
for, while its group is dropped (`Link.close`) and the next transfer forms a new one.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.errors import RefitError

SENDER, RECEIVER = 0, 1
BACKENDS = ("gloo", "nccl")
# The header's first word: a receiver that reads anything else is not talking to a refitd sender.
MAGIC = 0x52454649  # "REFI"
_HEADER_TAG = 0
# Buckets in flight per side: one moving while the next is staged (double buffering).
_DEPTH = 2
_NCCL_POLL_S = 0.0002
_STORE_KEY_PREFIX = "refitd"

Phase = Callable[[str], None]


class TransferFailed(RefitError):
    """A transfer could not form its group, or did not finish by its deadline, or its peer
    failed, went away or sent something else."""


def _remaining(deadline: float, what: str) -> datetime.timedelta:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferFailed(f"{what}: the deadline passed")
    # A timedelta below a millisecond reads as 0 to gloo, which means "no timeout" to some calls.
    return datetime.timedelta(seconds=max(left, 0.001))


def open_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store served by this process, on a port the OS picks (`.port`)."""
    return dist.TCPStore(
        host,
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def connect_store(address: str, deadline: float) -> dist.TCPStore:
    """A client of the store at `address` ("host:port")."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TransferFailed(f"bad store address {address!r} (expected host:port)")
    try:
        return dist.TCPStore(
            host.strip("[]"),
            int(port),
            is_master=False,
            timeout=_remaining(deadline, f"connecting to the store at {address}"),
        )
    except (RuntimeError, ValueError) as exc:
        raise TransferFailed(f"cannot reach the rendezvous store at {address}: {exc}") from None


def backend_available(backend: str) -> bool:
    if not dist.is_available():
        return False
    if backend == "nccl":
        return dist.is_nccl_available() and torch.cuda.is_available()
    return dist.is_gloo_available()


class Link:
    """A process group of two (sender, receiver) over which whole buffers move."""

    def __init__(self, pg: Any, *, backend: str, device: torch.device, group: str) -> None:
        self._pg = pg
        self.backend = backend
        self.device = device
        self.group = group
        # What the last transfer allocated for staging (0 when it moved views of the buffer).
        self.staging_bytes = 0
        self._closed = False

    @classmethod
    def join(
        cls,
        store: dist.Store,
        *,
        group: str,
        role: int,
        backend: str,
        device: torch.device | str,
        bind_host: str | None,
        deadline: float,
    ) -> Link:
        """Form group `group` as `role` (SENDER or RECEIVER); returns once the peer has joined
        too, or raises TransferFailed by the deadline. `device`: the CUDA device the buffers
        live on (NCCL); gloo moves CPU tensors. `bind_host`: the address gloo listens on."""
        if backend not in BACKENDS:
            raise TransferFailed(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if not backend_available(backend):
            raise TransferFailed(f"torch.distributed has no {backend} backend here")
        timeout = _remaining(deadline, f"forming group {group}")
        prefixed = dist.PrefixStore(f"{_STORE_KEY_PREFIX}/{group}/", store)
        try:
            if backend == "gloo":
                pg = _gloo(prefixed, role, timeout, bind_host)
                on = torch.device("cpu")
            else:
                on = torch.device(device)
                if on.type != "cuda":
                    raise TransferFailed(f"nccl moves CUDA buffers; this side's device is {on}")
                pg = _nccl(prefixed, role, timeout)
        except RuntimeError as exc:
            raise TransferFailed(f"group {group} could not be formed: {exc}") from None
        return cls(pg, backend=backend, device=on, group=group)

    @property
    def process_group(self) -> Any:
        """The underlying process group (bench/transfer.py measures its own send/recv)."""
        return self._pg

    # Moving bytes ---------------------------------------------------------------------------
    def send(
        self,
        buffer: torch.Tensor,
        *,
        version: int,
        bucket_bytes: int,
        deadline: float,
        stop: threading.Event | None = None,
        stage: bool | None = None,
    ) -> None:
        """Send `buffer` (1-D uint8) to the receiver. `stage`: copy through two bucket buffers
        on the backend's device (default: when `buffer` is on another device)."""
        _check_buffer(buffer, bucket_bytes)
        header = torch.tensor(
            [MAGIC, version, buffer.numel(), bucket_bytes], dtype=torch.int64, device=self.device
        )
        self.wait(self._pg.send([header], RECEIVER, _HEADER_TAG), deadline, "the header")
        staging = self._staging(buffer, bucket_bytes, stage)
        pending: collections.deque[Any] = collections.deque()
        for i, (start, size) in enumerate(_buckets(buffer.numel(), bucket_bytes)):
            if stop is not None and stop.is_set():
                raise TransferFailed("the transfer was cancelled")
            if len(pending) == _DEPTH:
                self.wait(pending.popleft(), deadline, f"bucket {i - _DEPTH}")
            if staging:
                # The slot's previous bucket was sent (waited for just above).
                src = staging[i % _DEPTH][:size]
                src.copy_(buffer[start : start + size])
            else:
                src = buffer[start : start + size]
            pending.append(self._post(self._pg.send, RECEIVER, src, i))
        while pending:
            self.wait(pending.popleft(), deadline, "the last buckets")

    def recv_into(
        self,
        buffer: torch.Tensor,
        *,
        version: int,
        bucket_bytes: int,
        deadline: float,
        phase: Phase | None = None,
        stage: bool | None = None,
    ) -> None:
        """Receive the sender's buffer into `buffer` (1-D uint8, exactly its size). `phase` is
        called with "header" once the header checked out and "bucket" after the first bucket (before
        the receive of the third is posted: gloo sends no further than the receives posted)."""
        _check_buffer(buffer, bucket_bytes)
        header = torch.zeros(4, dtype=torch.int64, device=self.device)
        self.wait(self._pg.recv([header], SENDER, _HEADER_TAG), deadline, "the header")
        expected = [MAGIC, version, buffer.numel(), bucket_bytes]
        got = header.tolist()
        if got != expected:
            raise TransferFailed(
                f"the sender announced (magic, version, bytes, bucket) = {tuple(got)}, this "
                f"receiver expects {tuple(expected)}"
            )
        if phase is not None:
            phase("header")
        staging = self._staging(buffer, bucket_bytes, stage)
        buckets = _buckets(buffer.numel(), bucket_bytes)
        pending: collections.deque[tuple[int, Any, torch.Tensor]] = collections.deque()

        def post(i: int) -> None:
            start, size = buckets[i]
            dst = staging[i % _DEPTH][:size] if staging else buffer[start : start + size]
            pending.append((i, self._post(self._pg.recv, SENDER, dst, i), dst))

        for i in range(min(_DEPTH, len(buckets))):
            post(i)
        while pending:
            i, work, dst = pending.popleft()
            self.wait(work, deadline, f"bucket {i}")
            if staging:
                start, size = buckets[i]
                # Copied out before the slot takes bucket i + 2 (posted just below); the
                # receive of bucket i + 1 is in flight meanwhile.
                buffer[start : start + size].copy_(dst)
            if i == 0 and phase is not None:
                phase("bucket")
            if i + _DEPTH < len(buckets):
                post(i + _DEPTH)

    def close(self) -> None:
        """Drop the group, in the background: an NCCL abort, or a gloo group's destructor while
        an abandoned transfer still waits in it, may take until that transfer's deadline."""
        if self._closed:
            return
        self._closed = True
        pg, self._pg = self._pg, None
        threading.Thread(target=_drop, args=(pg,), name=f"drop-{self.group}", daemon=True).start()

    # Internals ------------------------------------------------------------------------------
    def _staging(
        self, buffer: torch.Tensor, bucket_bytes: int, stage: bool | None
    ) -> list[torch.Tensor]:
        if stage is None:
            stage = buffer.device != self.device
        self.staging_bytes = 0
        if not stage:
            return []
        size = min(bucket_bytes, buffer.numel())
        self.staging_bytes = _DEPTH * size
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        return [
            torch.empty(size, dtype=torch.uint8, device=self.device, pin_memory=pin)
            for _ in range(_DEPTH)
        ]

    def _post(self, op: Callable[..., Any], peer: int, tensor: torch.Tensor, i: int) -> Any:
        try:
            return op([tensor], peer, i + 1)
        except RuntimeError as exc:
            # gloo raises at once when the peer's socket is already closed.
            raise TransferFailed(f"bucket {i}: {_first_line(exc)}") from None

    def wait(self, work: Any, deadline: float, what: str) -> None:
        """Wait for one operation of this group until `deadline` (TransferFailed after it)."""
        try:
            if self.backend == "gloo":
                work.wait(_remaining(deadline, what))
                return
            while not work.is_completed():
                if time.monotonic() >= deadline:
                    raise TransferFailed(f"{what}: the deadline passed")
                time.sleep(_NCCL_POLL_S)
            work.wait()  # raises the communicator's error, if any
        except RuntimeError as exc:
            raise TransferFailed(f"{what}: {_first_line(exc)}") from None


class Bounded:
    """Runs `fn` in a daemon thread; the caller waits for it up to a deadline, or until it is
    cancelled, and then walks away (the thread ends by its own deadline, unseen)."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        return self._done.is_set() and self.error is None

    def wait(
        self,
        deadline: float,
        cancelled: Callable[[], str | None] | None = None,
        poll_s: float = 0.05,
    ) -> Any:
        """The result; TransferFailed on the deadline or when `cancelled()` gives a reason;
        the thread's own exception otherwise."""
        while not self._done.wait(max(0.0, min(poll_s, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TransferFailed("the transfer did not finish by its deadline")
            reason = cancelled() if cancelled is not None else None
            if reason:
                raise TransferFailed(f"the transfer was abandoned: {reason}")
        if self.error is not None:
            raise self.error
        return self.result


def _gloo(store: dist.Store, role: int, timeout: datetime.timedelta, host: str | None) -> Any:
    gloo = dist.ProcessGroupGloo
    # `_Options` is the name torch 2.x has always had for it; `Options` is newer.
    options_cls: Any = getattr(gloo, "_Options", None) or gloo.Options
    options = options_cls()
    options._timeout = timeout
    device = gloo.create_device(hostname=host) if host else gloo.create_default_device()
    options._devices = [device]
    return gloo(store, role, 2, options)


def _nccl(store: dist.Store, role: int, timeout: datetime.timedelta) -> Any:
    # The watchdog's default reaction to a failed or timed-out collective is to kill this
    # process (the daemon, or a rank agent). Failures here are the transfer's to report: the
    # caller bounds every wait and aborts the group itself. Read when a group is constructed.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    nccl = dist.ProcessGroupNCCL
    options = nccl.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return nccl(store, role, 2, options)


def _drop(pg: Any) -> None:
    abort = getattr(pg, "abort", None)
    if abort is not None and type(pg).__name__ == "ProcessGroupNCCL":
        with contextlib.suppress(RuntimeError):
            abort()
    del pg


def _buckets(nbytes: int, bucket_bytes: int) -> list[tuple[int, int]]:
    return [(s, min(bucket_bytes, nbytes - s)) for s in range(0, nbytes, bucket_bytes)]


def _check_buffer(buffer: torch.Tensor, bucket_bytes: int) -> None:
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError("a transfer moves a contiguous 1-D uint8 buffer")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
