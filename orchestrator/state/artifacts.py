"""The artifact store: each version's per-rank shards as safetensors files under the data dir.

Layout: `<data_dir>/artifacts/v<version>/rank<r>.safetensors` and `manifest.json`. Every file is
written under a temporary name, fsynced, renamed, and its directory fsynced, so a crash leaves
either the whole file or none. The manifest is written last: a version's artifact exists (is
durable) once it does.

A rank's file is its flat shard buffer behind a safetensors header (orchestrator/data/flat.py):
the data section holds exactly the bytes that ranks receive by IPC, so the version's digest (a
GPU digest over those bytes and the table) checks a shard however it arrived. The file's sha256
is computed as it is written (off the rollout's critical path: see the pipeline) and recorded
in the manifest, for the bytes at rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.data.files import StagingPool, write_shard
from orchestrator.errors import Conflict, NotFound

if TYPE_CHECKING:
    from orchestrator.data.flat import FlatShard

_VERSION_DIR = re.compile(r"^v(\d+)$")
MANIFEST = "manifest.json"


def layout_record(shards: Sequence[FlatShard]) -> dict[str, Any]:
    """The version's layout record: per rank, the digest, data size and table of its shard."""
    return {
        "tp_size": len(shards),
        "ranks": [
            {"rank": r, "digest": s.digest(), "nbytes": s.nbytes, "table": s.table_json()}
            for r, s in enumerate(shards)
        ],
    }


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
        shards: Sequence[FlatShard],
        *,
        metadata: Mapping[str, Any],
        pool: StagingPool | None = None,
    ) -> dict[str, Any]:
        """Write one safetensors file per rank and then the manifest, each durably.

        Returns `{"tp_size", "ranks": [{"rank", "path", "bytes", "sha256"}]}`, which the
        pipeline stores with the version once this returns (`artifact`): the version's bytes
        are durable from then on. Raises Conflict if they already are.
        """
        if not shards:
            raise ValueError("write_version needs at least one rank shard")
        if self.exists(version):
            raise Conflict(f"artifacts of version {version} already exist")
        pool = pool or StagingPool()
        vdir = self.version_dir(version)
        if vdir.exists():
            # A crash mid-write left some files but no manifest: nothing refers to them.
            shutil.rmtree(vdir)
        vdir.mkdir(parents=True)
        fsync_dir(self.root)
        tp_size = len(shards)
        ranks = []
        for rank, shard in enumerate(shards):
            header = {
                "refitd.version": str(version),
                "refitd.rank": str(rank),
                "refitd.tp_size": str(tp_size),
                **{f"refitd.{k}": str(v) for k, v in metadata.items()},
            }
            written = write_shard(self.path(version, rank), shard, metadata=header, pool=pool)
            ranks.append(
                {"rank": rank, "path": written["path"], "bytes": written["bytes"],
                 "sha256": written["sha256"]}
            )  # fmt: skip
        fsync_dir(vdir)
        info: dict[str, Any] = {"tp_size": tp_size, "ranks": ranks}
        manifest = {
            "version": version,
            "created_at": time.time(),
            "metadata": {k: str(v) for k, v in metadata.items()},
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
