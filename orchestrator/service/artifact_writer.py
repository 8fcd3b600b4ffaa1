"""Writing a committed version's artifact after its rollout, off the critical path.

Durability rule (README "Durability"): a version's artifact (its rank files, fsynced, then the
manifest) is what a restarted rank or daemon loads. Writing 9.4 GB with sha256 and fsync takes
seconds, so for a version committed while a durable fallback exists (the version active before
it, whose artifact is durable and which every rank keeps resident) it is written here, after the
commit. At most one version is ever without durable bytes: the pipeline starts no rollout before
the previous version's artifact is durable (`wait`). Without such a fallback (the first version,
`ranks.keep_previous: false`, a rank that reads artifacts) the pipeline writes the artifact
before the rollout instead. If the daemon dies in between, recovery (service/recovery.py) returns
every rank to the fallback and records why, so no rank is left on bytes that exist nowhere else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from orchestrator import failpoints
from orchestrator.errors import RefitError
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.versions import VersionStore

if TYPE_CHECKING:
    from orchestrator.data.files import StagingPool
    from orchestrator.data.flat import FlatShard

log = logging.getLogger("refitd.artifacts")


class ArtifactWriter:
    """One background write at a time; `wait` blocks until the last one is durable."""

    def __init__(self, artifacts: ArtifactStore, versions: VersionStore, pool: StagingPool) -> None:
        self._artifacts = artifacts
        self._versions = versions
        self._pool = pool
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._done.set()
        self.last: dict[str, Any] = {}

    def write_now(
        self, version: int, shards: Sequence[FlatShard], metadata: dict[str, str]
    ) -> dict[str, Any]:
        """Write `version`'s artifact in this thread and record it; returns the artifact info."""
        t0 = time.perf_counter()
        info = self._artifacts.write_version(version, shards, metadata=metadata, pool=self._pool)
        seconds = time.perf_counter() - t0
        self._versions.set_fields(version, artifact=info, artifact_seconds=f"{seconds:.3f}")
        self.last = {"version": version, "seconds": seconds, "error": None}
        log.info("version %d is durable: %d rank file(s), %.1f GB in %.2fs", version,
                 len(info["ranks"]), sum(r["bytes"] for r in info["ranks"]) / 1e9,
                 seconds)  # fmt: skip
        return info

    def submit(
        self,
        version: int,
        shards: Sequence[FlatShard],
        metadata: dict[str, str],
        *,
        before: Callable[[], object] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Write `version`'s artifact in the background (after the last write finished).
        `before` runs first in that thread (the pipeline prunes old versions there: right after
        a commit, when no update is running, since deleting GBs slows every fsync on the disk,
        the 2PC's included); `then` once it is durable or has failed."""
        self.wait()
        self._done.clear()

        def _write() -> None:
            try:
                if before is not None:
                    before()
                failpoints.hit("artifact.background")
                self.write_now(version, shards, metadata)
            except Exception as exc:
                # The version stays committed and served; the next rollout, finding no durable
                # fallback, writes its own artifact first. Readiness is not affected.
                message = exc.message if isinstance(exc, RefitError) else repr(exc)
                self.last = {"version": version, "seconds": None, "error": message}
                log.exception("the artifact of version %d could not be written: %s", version,
                              message)  # fmt: skip
            finally:
                # Durable (or failed) now: the next rollout need not wait for what follows.
                self._done.set()
                if then is not None:
                    then()

        self._thread = threading.Thread(target=_write, name=f"artifact-v{version}", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until the background write (if any) has ended; False if `timeout_s` passed first."""
        return self._done.wait(timeout_s)

    @property
    def busy(self) -> bool:
        return not self._done.is_set()
