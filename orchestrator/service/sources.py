"""Where an update's weights come from: a safetensors file or directory under an allowed root, or
an upload streamed to disk. Safetensors only: nothing is ever unpickled."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from orchestrator.data import files as safetensors_files
from orchestrator.data.files import open_regular
from orchestrator.errors import (
    InsufficientStorage,
    InvalidUpdate,
    PayloadTooLarge,
    RefitError,
    SourceNotAllowed,
    StorageUnavailable,
)
from orchestrator.model.structure import compare
from orchestrator.state.artifacts import fsync_dir

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of one update, in a fixed order."""

    files: tuple[Path, ...]


def resolve_path_source(raw: str, allowed_roots: Iterable[Path]) -> WeightFiles:
    """Check that `raw` lies inside an allowed root (after resolving `..` and symlinks) and
    names a safetensors file or a directory of them."""
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not roots:
        raise SourceNotAllowed(
            "path sources are disabled: no sources.allowed_roots are configured "
            "(set REFITD_SOURCES__ALLOWED_ROOTS, or upload the safetensors bytes)"
        )
    if not raw or "\x00" in raw:
        raise SourceNotAllowed("source.path is empty or holds a NUL byte")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise SourceNotAllowed(f"source.path must be absolute, got {raw!r}")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise SourceNotAllowed(
            f"source.path {raw!r} resolves to {resolved}, outside every allowed root "
            f"({', '.join(map(str, roots))})"
        )
    try:
        if not resolved.exists():
            raise SourceNotAllowed(f"source.path {raw!r} does not exist")
        mode = resolved.stat().st_mode
        if stat.S_ISREG(mode):
            return WeightFiles((_check_file(resolved),))
        if not stat.S_ISDIR(mode):
            raise SourceNotAllowed(
                f"source.path {raw!r} is {_kind(mode)}, not a .safetensors file or a directory "
                "of them"
            )
        return _directory_files(resolved, roots)
    except OSError as exc:  # a name too long, a directory refitd may not list: the caller's input
        raise SourceNotAllowed(f"source.path {raw!r} cannot be read: {exc.strerror}") from None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _check_file(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceNotAllowed(
            f"{path.name} is a pickle checkpoint, which refitd never loads (it can run code); "
            "convert it to safetensors first (safetensors.torch.save_file(state_dict, path))"
        )
    if path.suffix.lower() != ".safetensors":
        raise SourceNotAllowed(f"{path.name} is not a .safetensors file")
    return path


def _directory_files(directory: Path, roots: list[Path]) -> WeightFiles:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidUpdate(f"{INDEX_NAME} is not a valid index: {exc}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "\x00" not in v for v in weight_map.values()
        ):
            raise InvalidUpdate(
                f"{INDEX_NAME}: weight_map must map tensor names to file names in its directory"
            )
        files = []
        for name in sorted(set(weight_map.values())):
            f = (directory / name).resolve()
            # However it is spelled (a/b, ../x, an absolute path, a link out): one answer.
            if (
                "/" in name
                or name in (".", "..")
                or f.parent != directory
                or not any(f.is_relative_to(root) for root in roots)
            ):
                raise SourceNotAllowed(
                    f"{INDEX_NAME} names {name!r}, which is not a file of {directory}; "
                    "weight_map must map tensor names to file names in the index's directory"
                )
            if not f.is_file():
                raise InvalidUpdate(f"{INDEX_NAME} names {name!r}, which does not exist")
            files.append(_check_file(f))
        return WeightFiles(tuple(files))
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".safetensors")
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _check_file(directory / pickles[0])
        raise InvalidUpdate(f"{directory} holds no .safetensors file")
    for f in files:
        if not any(f.resolve().is_relative_to(root) for root in roots):
            raise SourceNotAllowed(f"{f.name} in {directory} links outside every allowed root")
    return WeightFiles(tuple(files))


def inspect_files(source: WeightFiles, *, max_tensors: int) -> dict[str, tuple[str, list[int]]]:
    """Validate every header (offsets, coverage, dtypes) and return {name: (dtype, shape)}.

    No tensor data is read; a lying or truncated file is refused here, before any work.
    """
    found: dict[str, tuple[str, list[int]]] = {}
    for path in source.files:
        # A FIFO or a device would block (or never end) the open below, on a worker the API
        # needs: only regular files, checked without blocking.
        fd, _ = open_regular(path)
        os.close(fd)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name in found:
                        raise InvalidUpdate(f"tensor {name!r} appears in more than one file")
                    sl = f.get_slice(name)
                    found[name] = (sl.get_dtype(), list(sl.get_shape()))
                    if len(found) > max_tensors:
                        raise PayloadTooLarge(
                            f"the update holds more than limits.max_tensors={max_tensors} tensors"
                        )
        except SafetensorError as exc:
            if _looks_pickled(path):
                raise InvalidUpdate(
                    f"{path.name} holds a pickle checkpoint (torch.save), which refitd never loads "
                    "(it can run code); convert it to safetensors first "
                    "(safetensors.torch.save_file(state_dict, path))"
                ) from None
            raise InvalidUpdate(f"{path.name} is not a valid safetensors file: {exc}") from None
        except OSError as exc:
            raise InvalidUpdate(f"{path.name} cannot be read: {exc}") from None
        # safetensors keeps the last of two entries with one name (a JSON object read into a
        # map); the pipeline's own reader refuses them, and the door must refuse what it would.
        safetensors_files.validate_header(path)
    if not found:
        raise InvalidUpdate("the update holds no tensors")
    return found


def _looks_pickled(path: Path) -> bool:
    """Whether a file that is not safetensors starts like torch.save's output: a zip archive, or
    (before torch 1.6) a bare pickle stream (PROTO opcode, protocol 2 to 5). Nothing is loaded."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def storage_error(exc: OSError, what: str) -> RefitError:
    """What the API answers when writing `what` under the data directory failed: 507 when its
    filesystem is full, 503 for any other I/O error (the request may be sent again later)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(
            f"the data directory's filesystem is full ({reason}) while storing {what}; nothing "
            "was kept: free space there, or send a path source instead of an upload"
        )
    return StorageUnavailable(
        f"the data directory cannot be written ({reason}) while storing {what}; nothing was "
        "kept: send it again once the data directory is writable"
    )


class UploadSink:
    """Streams an upload to a file under the data directory, hashing as it goes, within a limit.
    An I/O error (a full disk) removes what was written and raises `storage_error`'s answer."""

    def __init__(self, directory: Path, name: str, *, max_bytes: int) -> None:
        self.path = directory / f"{name}.safetensors"
        self._partial = directory / f".{name}.partial"
        self._hash = hashlib.sha256()
        self._max = max_bytes
        self.size = 0
        self._file: BinaryIO | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = self._partial.open("wb")
        except OSError as exc:
            self.discard()
            raise storage_error(exc, f"an upload in {directory}") from None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            self.discard()
            raise PayloadTooLarge(
                f"the upload exceeds limits.max_upload_bytes={self._max} bytes; "
                "put the files under an allowed root and send a path source instead"
            )
        assert self._file is not None, "write() after discard()"
        self._hash.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as exc:
            self.discard()
            raise storage_error(exc, f"an upload of {self.size} bytes") from None

    def finish(self) -> str:
        """fsync, move into place, and return the sha256 of the bytes."""
        if self.size == 0:
            self.discard()
            raise InvalidUpdate("the upload is empty; send the bytes of a .safetensors file")
        assert self._file is not None, "finish() after discard()"
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._partial.replace(self.path)
            fsync_dir(self.path.parent)  # the 202 promises the bytes survive a crash
        except OSError as exc:
            self.discard()
            self.path.unlink(missing_ok=True)
            raise storage_error(exc, f"an upload of {self.size} bytes") from None
        return self._hash.hexdigest()

    def discard(self) -> None:
        """Remove what was written; safe to call more than once, and after a failed write."""
        file, self._file = self._file, None
        if file is not None and not file.closed:
            # Closing flushes what is buffered, which fails again on a full disk: the
            # descriptor is closed either way, and the bytes are being thrown away.
            with contextlib.suppress(OSError):
                file.close()
        with contextlib.suppress(OSError):
            self._partial.unlink(missing_ok=True)


# safetensors' dtype names of the float formats an update may carry.
UPDATE_DTYPE_NAMES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def check_header(
    header: dict[str, tuple[str, list[int]]],
    expected: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]],
) -> None:
    """Refuse an update whose tensor names, shapes or dtypes (from its headers) differ from the
    model's. One InvalidUpdate lists every problem, naming the tensors."""
    found = {name: (shape, UPDATE_DTYPE_NAMES.get(dt, dt)) for name, (dt, shape) in header.items()}
    mismatch = compare(found, expected)
    if mismatch:
        raise InvalidUpdate(mismatch.describe())
