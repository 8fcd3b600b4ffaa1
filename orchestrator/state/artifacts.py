"""The artifact store: each version's per-rank shards as safetensors files under the data dir.

Layout: `<data_dir>/artifacts/v<version>/rank<r>.safetensors` and `manifest.json`. Every file is
written under a temporary name, fsynced, renamed, and its directory fsynced, so a crash leaves
either the whole file or none. The manifest is written last: a version exists once it does.

Two digests per shard, both sha256 in hex:
- `digest`: over the file's bytes. A rank checks it on what it fetched before parsing anything.
- `tensor_digest`: over the tensors themselves (`tensor_digest()` below), computed here from the
  tensors written and by a rank's adapter from the tensors it holds in memory, so the two compare
  whatever device or file format lies between them.

torch and safetensors are imported only where tensors are handled: the coordinator and the
daemon's recovery use this module without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import Conflict, NotFound

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 20
_VERSION_DIR = re.compile(r"^v(\d+)$")
MANIFEST = "manifest.json"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors, in name order: for each, its name, dtype, shape and raw bytes.

    Each tensor contributes `name \\0 dtype \\0 d0,d1,... \\0 <8-byte little-endian length>` and
    then its bytes in C order as they lie in memory (little-endian on every host refitd runs on).
    CUDA tensors are copied to the host to be hashed.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = ",".join(str(d) for d in t.shape)
        h.update(f"{name}\0{dtype}\0{shape}\0".encode())
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw.data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


class ArtifactStore:
    """Per-rank shard files of every kept version, under `<data_dir>/artifacts`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "artifacts"

    # Paths -------------------------------------------------------------------------------
    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version}"

    def path(self, version: int, rank: int) -> Path:
        """Where rank `rank`'s shard of `version` lives (whether or not it exists)."""
        return self.version_dir(version) / f"rank{rank}.safetensors"

    # Writing -----------------------------------------------------------------------------
    def write_version(
        self,
        version: int,
        rank_shards: list[dict[str, torch.Tensor]],
        *,
        metadata: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Write one safetensors file per rank and the manifest, each durably.

        Returns `{"tp_size", "ranks": [{"rank", "path", "digest", "tensor_digest", "bytes"}]}`,
        which the pipeline stores with the version (`VersionStore.set_fields(v, artifact=...)`):
        rank agents read their shard's location and digests from there.
        Raises Conflict if a complete set of files for `version` already exists.
        """
        from safetensors.torch import save_file

        if not rank_shards:
            raise ValueError("write_version needs at least one rank shard")
        if self.exists(version):
            raise Conflict(f"artifacts of version {version} already exist")
        vdir = self.version_dir(version)
        if vdir.exists():
            # A crash mid-write left some files but no manifest: nothing refers to them.
            shutil.rmtree(vdir)
        vdir.mkdir(parents=True)
        fsync_dir(self.root)
        tp_size = len(rank_shards)
        ranks = []
        for rank, shard in enumerate(rank_shards):
            final = self.path(version, rank)
            tmp = _tmp_name(final)
            tensors = {name: t.contiguous() for name, t in shard.items()}
            header = {
                "refitd.version": str(version),
                "refitd.rank": str(rank),
                "refitd.tp_size": str(tp_size),
            }
            save_file(tensors, str(tmp), metadata=header)
            _fsync_file(tmp)
            digest = file_digest(tmp)
            os.replace(tmp, final)
            ranks.append(
                {
                    "rank": rank,
                    "path": str(final),
                    "digest": digest,
                    "tensor_digest": tensor_digest(tensors),
                    "bytes": final.stat().st_size,
                }
            )
        fsync_dir(vdir)
        info: dict[str, Any] = {"tp_size": tp_size, "ranks": ranks}
        manifest = {
            "version": version,
            "created_at": time.time(),
            "metadata": dict(metadata),
            **info,
        }
        final = vdir / MANIFEST
        tmp = _tmp_name(final)
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(vdir)
        return info

    # Reading -----------------------------------------------------------------------------
    def manifest(self, version: int) -> dict[str, Any]:
        """The manifest of a stored version; NotFound if it is not (or no longer) stored."""
        try:
            return json.loads((self.version_dir(version) / MANIFEST).read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise NotFound(f"no artifacts are stored for version {version}") from None

    def exists(self, version: int) -> bool:
        """True when the manifest and every rank file it names are on disk, at their sizes."""
        try:
            manifest = self.manifest(version)
        except NotFound:
            return False
        for entry in manifest["ranks"]:
            try:
                if self.path(version, entry["rank"]).stat().st_size != entry["bytes"]:
                    return False
            except FileNotFoundError:
                return False
        return True

    def shard_info(self, version: int, rank: int) -> dict[str, Any]:
        """The manifest entry of one rank's shard; NotFound if the version or rank is unknown."""
        manifest = self.manifest(version)
        for entry in manifest["ranks"]:
            if entry["rank"] == rank:
                return entry  # type: ignore[no-any-return]
        raise NotFound(f"version {version} has no shard for rank {rank} "
                       f"(tp_size {manifest['tp_size']})")  # fmt: skip

    def stored_versions(self) -> list[int]:
        """Every version with a directory here, complete or not, ascending."""
        if not self.root.exists():
            return []
        found = []
        for entry in self.root.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m and entry.is_dir():
                found.append(int(m.group(1)))
        return sorted(found)

    # Deleting ----------------------------------------------------------------------------
    def remove(self, version: int) -> bool:
        """Delete one version's files. Returns whether there was anything to delete."""
        vdir = self.version_dir(version)
        if not vdir.exists():
            return False
        # Renamed first so that exists() turns false in one step, even if rmtree is interrupted.
        doomed = self.root / f".deleting-v{version}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(vdir, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def prune(self, keep: Iterable[int], retention: int) -> list[int]:
        """Keep `retention` versions: every one in `keep` (even past `retention`), then the
        newest others while there is room; delete the rest.

        Returns the versions deleted, newest first. Leftovers of interrupted deletions go too.
        """
        if retention < 0:
            raise ValueError("retention must be >= 0")
        stored = sorted(self.stored_versions(), reverse=True)
        pinned = set(keep) & set(stored)
        room = max(0, retention - len(pinned))
        doomed = [v for v in stored if v not in pinned][room:]
        for version in doomed:
            self.remove(version)
        if self.root.exists():
            for entry in self.root.iterdir():
                if entry.name.startswith(".deleting-"):
                    with contextlib.suppress(OSError):
                        shutil.rmtree(entry)
        return doomed
