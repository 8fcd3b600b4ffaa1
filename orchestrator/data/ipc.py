"""Hand a flat buffer to another process on the same host, without copying it through a pipe.

CUDA buffers go by CUDA IPC: torch's own `reduce_tensor` / `rebuild_cuda_tensor`, with their
arguments carried as JSON (bytes in base64) instead of pickle, so a handle can travel through
Redis and a receiver never unpickles anything. CPU buffers (CPU ranks, CI) live in a file in
/dev/shm (`SharedBuffer`), mapped by both sides.

Lifetime. The exporter keeps a buffer alive until `Exported.release()`, which it calls once
every rank acked or the transaction is decided. A receiver opens a handle, copies the bytes
into its own memory and closes it (`open_handle` is a context manager).

CUDA IPC: torch counts receivers in a shared counter per export (one "sent" reference, which
the receiver gives back when it frees the tensor it rebuilt); until the count is zero, the
exporter's allocator keeps the memory in its "limbo", even after the exporter dropped it. A
receiver that died or never opened its handle would pin the block for the exporter's lifetime,
and a reference given back twice wraps the unsigned counter and pins it too. So the lifetime
is the exporter's alone: receivers rebuild the tensor with a counter name that does not exist
(their give-back is then a no-op, which torch tolerates), and `release()` gives back each
export's reference exactly once. A receiver still reading after the release reads undefined
bytes, which the digest it checks will show.
"""

from __future__ import annotations

import base64
import fcntl
import inspect
import os
import re
import stat
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing import reductions

from orchestrator.errors import RefitError

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "refitd-"
# What a receiver passes as its reference counter: no such shared-memory object exists, so its
# give-back fails quietly (see the module docstring).
NO_REF_COUNTER = b"/refitd-receivers-give-nothing-back"
# rebuild_cuda_tensor's parameters in torch 2.11 to 2.13; the handle's fields map onto them.
REBUILD_PARAMS = (
    "tensor_cls",
    "tensor_size",
    "tensor_stride",
    "tensor_offset",
    "storage_cls",
    "dtype",
    "storage_device",
    "storage_handle",
    "storage_size_bytes",
    "storage_offset_bytes",
    "requires_grad",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)


class HandleUnavailable(RefitError):
    """A buffer handle cannot be exported or opened: the buffer was released or is gone, the
    handle is malformed or has the wrong size, or CUDA IPC refused it."""


def _check_torch() -> None:
    params = tuple(inspect.signature(reductions.rebuild_cuda_tensor).parameters)
    if params != REBUILD_PARAMS:
        raise HandleUnavailable(
            f"torch {torch.__version__}'s rebuild_cuda_tensor takes {params}; refitd's CUDA IPC "
            f"handles were written for {REBUILD_PARAMS}: update orchestrator/data/ipc.py"
        )


# ---- shared memory (CPU buffers) -------------------------------------------------------------

# Live SharedBuffers by the address of their mapping, to find the one a tensor lives in.
_shared_buffers: weakref.WeakValueDictionary[int, SharedBuffer] = weakref.WeakValueDictionary()


class SharedBuffer:
    """A uint8 CPU tensor backed by a file in shared memory (mode 0600, a unique name), that
    another process can map by its path. `release()` unlinks the file (mappings stay valid).

    Its creator holds a shared flock on the file until the release (or its death, which closes
    the descriptor): that, not the pid in the name, tells `remove_stale_shared_buffers` that
    the file is in use, in any pid namespace that shares this /dev/shm."""

    def __init__(self, path: Path, tensor: torch.Tensor, lock_fd: int | None = None) -> None:
        self.path = path
        self.tensor = tensor
        self.released = False
        self._unlock = weakref.finalize(self, os.close, lock_fd) if lock_fd is not None else None
        if tensor.numel():
            _shared_buffers[tensor.untyped_storage().data_ptr()] = self

    @classmethod
    def create(cls, nbytes: int, dir: Path = SHM_DIR) -> SharedBuffer:
        """A new zero-filled shared buffer of nbytes."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        # The pid in the name lets a restarted daemon find the files of a dead process.
        fd, name = tempfile.mkstemp(prefix=f"{SHM_PREFIX}{os.getpid()}-", suffix=".buf", dir=dir)
        path = Path(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, nbytes)
            tensor = (
                torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
                if nbytes
                else torch.empty(0, dtype=torch.uint8)
            )
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        return cls(path, tensor, lock_fd=fd)

    def release(self) -> None:
        """Unlink the file (no new receiver can open it) and drop its lock. Idempotent."""
        self.released = True
        self.path.unlink(missing_ok=True)
        if self._unlock is not None:
            self._unlock()

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_shared_buffers(dir: Path = SHM_DIR) -> list[Path]:
    """Unlink the shared buffers that dead processes left in `dir` (a killed daemon or trainer
    never released its own); returns what it removed. A file goes only when the pid in its name
    does not run here and no process holds its lock (one in another pid namespace does); a
    name that is not `refitd-<pid>-*.buf`, anything but a regular file, and whatever cannot be
    opened or unlinked stay."""
    removed = []
    for path in sorted(dir.glob(f"{SHM_PREFIX}*.buf")):
        match = _SHM_NAME.fullmatch(path.name)
        if match is None or _alive(int(match[1])):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
        except OSError:  # held (BlockingIOError), or not ours to remove
            continue
        finally:
            os.close(fd)
        removed.append(path)
    return removed


# refitd-<pid>-<mkstemp's random part>.buf; pid_max is at most 2^22 (7 digits).
_SHM_NAME = re.compile(rf"{re.escape(SHM_PREFIX)}([0-9]{{1,7}})-[^/]*\.buf", re.ASCII)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _shared_buffer_of(tensor: torch.Tensor) -> SharedBuffer | None:
    return _shared_buffers.get(tensor.untyped_storage().data_ptr())


# ---- export ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def export(shard_buffer: torch.Tensor) -> dict[str, Any]:
    """A JSON-able handle to a contiguous 1-D uint8 buffer, for `open_handle` in another
    process on this host: CUDA IPC for a CUDA tensor, the shared-memory file for a tensor of a
    SharedBuffer (any other CPU tensor is refused). The caller keeps the buffer alive (see
    `Exported`); for CUDA, the writes queued on the current stream before the export are
    visible to the receiver (torch records an event that the receiver waits on)."""
    buf = shard_buffer
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError("export takes a contiguous 1-D uint8 tensor")
    if buf.device.type == "cuda":
        return _export_cuda(buf)
    if buf.device.type != "cpu":
        raise ValueError(f"cannot export a tensor on {buf.device}")
    shared = _shared_buffer_of(buf)
    if buf.numel() and shared is None:
        raise ValueError(
            "a CPU buffer must live in a SharedBuffer to be exported (SharedBuffer.create)"
        )
    if shared is None:
        return {"kind": "shm", "path": "", "nbytes": 0, "offset": 0}
    if shared.released:
        raise HandleUnavailable(f"{shared.path} was released")
    offset = buf.data_ptr() - shared.tensor.data_ptr()
    return {"kind": "shm", "path": str(shared.path), "nbytes": buf.numel(), "offset": offset}


def _export_cuda(buf: torch.Tensor) -> dict[str, Any]:
    _check_torch()
    rebuild, args = reductions.reduce_tensor(buf)
    if rebuild is not reductions.rebuild_cuda_tensor or len(args) != len(REBUILD_PARAMS):
        raise HandleUnavailable(
            f"torch {torch.__version__} reduced a CUDA tensor to {rebuild.__name__} with "
            f"{len(args)} arguments; refitd expects rebuild_cuda_tensor with {len(REBUILD_PARAMS)}"
        )
    a = dict(zip(REBUILD_PARAMS, args, strict=True))
    if a["storage_handle"] is None:  # an empty storage: nothing to share
        return {"kind": "cuda", "device": buf.device.index, "nbytes": 0, "empty": True}
    event = a["event_handle"]
    return {
        "kind": "cuda",
        "device": int(a["storage_device"]),
        "nbytes": buf.numel(),
        "tensor_offset": int(a["tensor_offset"]),
        "storage_handle": _b64(a["storage_handle"]),
        "storage_size_bytes": int(a["storage_size_bytes"]),
        "storage_offset_bytes": int(a["storage_offset_bytes"]),
        "ref_counter_handle": _b64(a["ref_counter_handle"]),
        "ref_counter_offset": int(a["ref_counter_offset"]),
        "event_handle": _b64(event) if event is not None else None,
        "event_sync_required": bool(a["event_sync_required"]),
        "device_uuid": _device_uuid(int(a["storage_device"])),
        "pid": os.getpid(),
    }


def _device_uuid(index: int) -> str | None:
    # Device indices depend on each process's CUDA_VISIBLE_DEVICES; the UUID names the GPU.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else None


def _local_device(handle: dict[str, Any]) -> int:
    """This process's index of the exporter's GPU: found by UUID when the handle has one."""
    index = _int(handle, "device")
    if not torch.cuda.is_available():
        raise HandleUnavailable("a CUDA IPC handle, and no CUDA device in this process")
    uuid = handle.get("device_uuid")
    if uuid is None:
        if index >= torch.cuda.device_count():
            raise HandleUnavailable(f"a CUDA IPC handle of device {index}, and no such device")
        return index
    for i in range(torch.cuda.device_count()):
        if _device_uuid(i) == uuid:
            return i
    raise HandleUnavailable(
        f"the exporter's GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES?)"
    )


class Exported:
    """The exporter's side of a hand-off: keeps every exported buffer alive until `release()`
    (once every rank acked, or the transaction is decided)."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._shared: list[SharedBuffer] = []
        self._cuda_handles: list[dict[str, Any]] = []
        self.handles: list[dict[str, Any]] = []
        self.released = False

    def export(self, buffer: torch.Tensor | SharedBuffer) -> dict[str, Any]:
        """A handle for one receiver; a SharedBuffer passed here is released with this."""
        if self.released:
            raise HandleUnavailable("this export was released")
        if isinstance(buffer, SharedBuffer):
            self._shared.append(buffer)
            tensor = buffer.tensor
        else:
            tensor = buffer
        handle = export(tensor)
        self._tensors.append(tensor)
        if handle["kind"] == "cuda" and not handle.get("empty"):
            self._cuda_handles.append(handle)
        self.handles.append(handle)
        return handle

    def release(self) -> None:
        """Drop the buffers: shared-memory files are unlinked, CUDA memory goes back to the
        exporter's allocator (see the module docstring). Idempotent."""
        if self.released:
            return
        self.released = True
        for shared in self._shared:
            shared.release()
        self._tensors.clear()
        for h in self._cuda_handles:
            # The one give-back of this export's reference (receivers give back nothing).
            torch.UntypedStorage._release_ipc_counter_cuda(
                base64.b64decode(h["ref_counter_handle"]), h["ref_counter_offset"]
            )
        if self._cuda_handles:
            torch.cuda.ipc_collect()
        self._cuda_handles.clear()

    def __enter__(self) -> Exported:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- open --------------------------------------------------------------------------------


def _int(handle: dict[str, Any], key: str) -> int:
    value = handle.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HandleUnavailable(f"malformed handle: {key} is {value!r}")
    return value


def _str(handle: dict[str, Any], key: str) -> str:
    value = handle.get(key)
    if not isinstance(value, str):
        raise HandleUnavailable(f"malformed handle: {key} is {value!r}")
    return value


@contextmanager
def open_handle(handle: dict[str, Any], *, owner_uid: int | None = None) -> Iterator[torch.Tensor]:
    """Yield a uint8 tensor over the exporter's bytes (CUDA: on the exporter's GPU, whatever
    index this process gives it; shm: a CPU mapping); copy what you need out of it before the
    block ends. Raises HandleUnavailable (never blocks) when the buffer cannot be opened, or
    (`owner_uid`) when a shared-memory file belongs to another user."""
    if not isinstance(handle, dict):
        raise HandleUnavailable(f"a handle is a dict, got {type(handle).__name__}")
    kind = handle.get("kind")
    if kind == "shm":
        opened = _open_shm(handle, owner_uid)
    elif kind == "cuda":
        opened = _open_cuda(handle)
    else:
        raise HandleUnavailable(f"unknown handle kind {kind!r}")
    try:
        yield opened
    finally:
        # Our reference goes; the mapping (shared memory, or CUDA IPC) goes with the last one.
        del opened


def _open_shm(handle: dict[str, Any], owner_uid: int | None = None) -> torch.Tensor:
    nbytes = _int(handle, "nbytes")
    offset = _int(handle, "offset")
    path = _str(handle, "path")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if "\x00" in path or not Path(path).name.startswith(SHM_PREFIX):
        raise HandleUnavailable(f"{path!r} is not a refitd shared buffer")
    try:
        # O_NONBLOCK: a FIFO planted at the path must not block the open.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise HandleUnavailable(
            f"cannot open shared buffer {path} ({e.strerror}): released or never created"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandleUnavailable(f"{path} is not a regular file")
        if owner_uid is not None and st.st_uid != owner_uid:
            raise HandleUnavailable(
                f"{path} belongs to uid {st.st_uid}, not to the exporter's uid {owner_uid}"
            )
        if st.st_size < offset + nbytes:
            raise HandleUnavailable(
                f"{path} holds {st.st_size} bytes, the handle wants [{offset}, {offset + nbytes})"
            )
        # Map the file we opened and checked (through its descriptor), not whatever the path
        # names a moment later; a shared mapping of a smaller file would grow it.
        mapping = torch.from_file(
            f"/proc/self/fd/{fd}", shared=True, size=st.st_size, dtype=torch.uint8
        )
    except RuntimeError as e:
        raise HandleUnavailable(f"cannot map shared buffer {path}: {e}") from None
    finally:
        os.close(fd)
    return mapping[offset : offset + nbytes]


def _open_cuda(handle: dict[str, Any]) -> torch.Tensor:
    _check_torch()
    nbytes = _int(handle, "nbytes")
    device = _local_device(handle)
    if handle.get("empty"):
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
    event = handle.get("event_handle")
    tensor_offset = _int(handle, "tensor_offset")
    storage_size = _int(handle, "storage_size_bytes")
    if tensor_offset + nbytes > storage_size:
        raise HandleUnavailable(
            f"malformed CUDA IPC handle: [{tensor_offset}, {tensor_offset + nbytes}) past a "
            f"storage of {storage_size} bytes"
        )
    try:
        args = (
            torch.Tensor,
            torch.Size([nbytes]),
            (1,),
            tensor_offset,
            torch.storage.TypedStorage,
            torch.uint8,
            device,
            base64.b64decode(_str(handle, "storage_handle"), validate=True),
            storage_size,
            _int(handle, "storage_offset_bytes"),
            False,
            NO_REF_COUNTER,
            0,
            base64.b64decode(event, validate=True) if event is not None else None,
            bool(handle.get("event_sync_required")),
        )
    except ValueError as e:
        raise HandleUnavailable(f"malformed CUDA IPC handle: {e}") from None
    try:
        tensor = reductions.rebuild_cuda_tensor(*args)
    except (RuntimeError, TypeError) as e:
        raise HandleUnavailable(
            f"CUDA IPC refused the handle of device {device} from process "
            f"{handle.get('pid')} (gone, released, or another host?): {e}"
        ) from None
    if tensor.numel() != nbytes or tensor.dtype != torch.uint8:
        raise HandleUnavailable("the CUDA IPC handle opened to a tensor of another size")
    return tensor
