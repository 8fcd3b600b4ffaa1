"""Retention: which versions' artifacts a rollback may still need, and deleting the others."""

from __future__ import annotations

import logging

from orchestrator.errors import NotFound, RedisUnavailable
from orchestrator.rollout.ledger import RolloutLedger, redis_errors
from orchestrator.settings import Settings
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.versions import FINAL_FAILURES, IN_FLIGHT, VersionStore

log = logging.getLogger("refitd.retention")


class Retention:
    """Keeps rollout.retention committed versions on disk; the active and the previous committed
    versions, and versions in flight, are never deleted."""

    def __init__(
        self,
        ledger: RolloutLedger,
        versions: VersionStore,
        artifacts: ArtifactStore,
        settings: Settings,
    ) -> None:
        self._ledger = ledger
        self._versions = versions
        self._artifacts = artifacts
        self._settings = settings

    def prune(self) -> list[int]:
        """Delete artifacts no rollback can use: failed versions', and committed ones beyond
        rollout.retention. The active, the previous committed, and in-flight versions stay."""
        with redis_errors():
            stored = self._artifacts.stored_versions()
            if not stored:
                return []
            keep = {
                v
                for v in (self._ledger.active_version(), self._ledger.previous_committed())
                if v is not None
            }
            removed = []
            for version in stored:
                try:
                    status = self._versions.get(version).status
                except NotFound:
                    continue
                if status in IN_FLIGHT:
                    keep.add(version)
                elif status in FINAL_FAILURES and version not in keep:
                    self._artifacts.remove(version)
                    removed.append(version)
        removed += self._artifacts.prune(keep, self._settings.rollout.retention)
        if removed:
            log.info(
                "pruned the artifacts of version(s) %s", ", ".join(str(v) for v in sorted(removed))
            )
        return sorted(removed)

    def prune_quietly(self) -> list[int]:
        """`prune`, logging instead of raising: a commit stands whatever happens here, and a
        failed prune is retried after the next one."""
        try:
            return self.prune()
        except (OSError, RedisUnavailable) as exc:
            log.warning("could not prune artifacts: %s", exc)
            return []

    # The two phases ------------------------------------------------------------------------
