"""What a starting daemon does before it serves: finish what a crashed one left half-done.

Every recovery rule lives here, in the order they run:
1. Take the update lock by force: this daemon runs no pipeline yet, and the fence it gets makes
   any older holder (a daemon that was SIGKILLed, whose lock has not expired) unable to decide.
2. Drive every open transaction to its recorded decision: a COMMIT still waiting for acks is
   re-sent (its ranks got it with the decision; ranks that restart load the active version by
   themselves); no decision recorded: abort (which tells the ranks and closes it).
3. Updates whose source lived only in the dead daemon's memory (a trainer's tensors, copied
   at the door, service/tensor_source.py) and whose version was not committed: no daemon can
   run or finish them. Their version becomes ABORTED and the update says that its in-memory
   source was lost (push it again); they leave the queue.
4. Versions caught mid-pipeline (RECEIVED, QUANTIZED, VERIFIED, PREPARED) become ABORTED with the
   reason "daemon restarted": no pipeline is running to finish them. Acknowledged updates that
   had not started yet (their version still RECEIVED, their id still queued) are spared.
5. The queue: an update that was running when the daemon died is re-queued if its version had
   not changed yet, else closed with its version's outcome.
6. Durability: if the active version's artifact is not durable (the daemon died after its
   commit and before the background write ended, see service/artifact_writer.py), every rank
   returns to the previous committed version, whose artifact is durable and which the ranks
   hold resident, by a recorded rollback. The version becomes ROLLED_BACK with the reason, and
   its update says so: nothing acknowledged is lost silently. An update from an in-memory
   source is then ABORTED (its bytes existed nowhere but in the daemon's memory and on the
   ranks that were sent back).
7. Prune artifacts that no rollback can use.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import RefitError, StaleTransition
from orchestrator.rollout.coordinator import Coordinator
from orchestrator.rollout.lock import UpdateLock
from orchestrator.service.stages import drop_upload
from orchestrator.service.tensor_source import TENSOR_SOURCE
from orchestrator.service.updates import Stage, UpdateQueue, UpdateRecord
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.versions import (
    EVER_COMMITTED,
    FINAL_FAILURES,
    IN_FLIGHT,
    VersionStatus,
    VersionStore,
)

log = logging.getLogger("refitd.recovery")

RESTART_REASON = "daemon restarted"
NOT_DURABLE_REASON = (
    "the daemon stopped after committing version {version} and before its artifact was durable; "
    "every rank went back to version {target}; push the update again"
)
SOURCE_LOST_REASON = (
    "the daemon stopped before this update was committed, and its in-memory source (the "
    "daemon's copy of the trainer's tensors) was lost with it; nothing was applied; push the "
    "update again"
)
NOT_DURABLE_SOURCE_LOST_REASON = (
    "the daemon stopped after committing version {version} and before its artifact was "
    "durable, and its in-memory source (the daemon's copy of the trainer's tensors) was lost "
    "with it; every rank went back to version {target}; push the update again"
)
# Versions are only ever stuck near the top: one pipeline runs at a time, and every start
# recovers the ones a crash left behind. This bounds the scan on a long history.
_SCAN_VERSIONS = 1000


@dataclass
class RecoveryReport:
    """What recovery found and did."""

    transactions: list[dict[str, Any]] = field(default_factory=list)
    not_durable: dict[str, Any] | None = None
    aborted_versions: list[int] = field(default_factory=list)
    sources_lost: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "not_durable": self.not_durable,
            "aborted_versions": self.aborted_versions,
            "sources_lost": self.sources_lost,
            "requeued": self.requeued,
            "pruned": self.pruned,
        }


def recover(
    coordinator: Coordinator,
    versions: VersionStore,
    artifacts: ArtifactStore,
    queue: UpdateQueue,
    lock: UpdateLock,
) -> RecoveryReport:
    """Run every recovery rule under the update lock (taken by force; see the module
    docstring)."""
    report = RecoveryReport()
    fence = lock.acquire(steal=True)
    try:
        report.transactions = coordinator.settle_open(
            fence=fence, wait=False, reason=f"{RESTART_REASON} before a decision"
        )
        report.sources_lost = _abort_lost_sources(queue, versions)
        spare = _unstarted(queue, versions)
        for record in versions.list(limit=_SCAN_VERSIONS):
            if record.status not in IN_FLIGHT:
                continue
            if record.status is VersionStatus.RECEIVED and record.version in spare:
                continue
            try:
                versions.transition(record.version, VersionStatus.ABORTED, reason=RESTART_REASON)
            except StaleTransition:
                continue  # it moved on meanwhile; nothing to recover
            report.aborted_versions.append(record.version)
        report.requeued = _recover_queue(queue, versions)
        # After the queue's rule: an update that was still running when the daemon died is
        # closed there as committed, and this rule then says what became of it.
        report.not_durable = _restore_durable(coordinator, versions, artifacts, queue, fence)
        report.pruned = coordinator.retention.prune()
    finally:
        lock.release()
    if report.sources_lost:
        log.warning("recovery: aborted %d update(s) whose in-memory source was lost: %s",
                    len(report.sources_lost), ", ".join(report.sources_lost))  # fmt: skip
    if report.transactions or report.aborted_versions or report.not_durable:
        log.warning("recovery: settled %d transaction(s), aborted version(s) %s%s",
                    len(report.transactions), report.aborted_versions or "none",
                    f", {report.not_durable['reason']}" if report.not_durable else "")  # fmt: skip
    return report


def _restore_durable(
    coordinator: Coordinator,
    versions: VersionStore,
    artifacts: ArtifactStore,
    queue: UpdateQueue,
    fence: int,
) -> dict[str, Any] | None:
    """Rule 6: no rank may stay on a version whose bytes are nowhere durable."""
    active = coordinator.ledger.active_version()
    if active is None or artifacts.exists(active):
        return None
    target = coordinator.ledger.previous_committed()
    if target is None or not artifacts.exists(target):
        # The artifact-first rule makes this impossible for versions this daemon committed;
        # say so loudly rather than guess.
        log.error("version %d is active but its artifact is not durable, and no durable version "
                  "precedes it; ranks cannot load it after a restart", active)  # fmt: skip
        return {"version": active, "target": None, "reason": "no durable version to return to"}
    update_id = versions.get(active).update_id
    record: UpdateRecord | None = None
    if update_id:
        with contextlib.suppress(RefitError):
            record = queue.get(update_id)
    in_memory = record is not None and record.source.get("type") == TENSOR_SOURCE
    template = NOT_DURABLE_SOURCE_LOST_REASON if in_memory else NOT_DURABLE_REASON
    reason = template.format(version=active, target=target)
    coordinator.restore(target, fence=fence, reason=reason)
    if record is not None:
        with contextlib.suppress(RefitError):
            if in_memory:
                queue.finish(record.update_id, ok=False, stage=Stage.ABORTED, error=reason)
            else:
                queue.annotate(record.update_id, error=reason)
                drop_upload(record)
    return {"version": active, "target": target, "reason": reason}


def _abort_lost_sources(queue: UpdateQueue, versions: VersionStore) -> list[str]:
    """Rule 3; returns the ids of the updates closed."""
    lost = []
    for update_id in queue.queued() + queue.running():
        record = queue.get(update_id)
        if record.source.get("type") != TENSOR_SOURCE:
            continue
        if versions.get(record.version).status in EVER_COMMITTED:
            continue  # committed before the stop: rule 5 closes it, rule 6 says the rest
        with contextlib.suppress(StaleTransition):
            versions.transition(record.version, VersionStatus.ABORTED, reason=SOURCE_LOST_REASON)
        final = versions.get(record.version)
        if final.status is VersionStatus.REJECTED:  # its content was refused before the stop
            queue.finish(update_id, ok=False, stage=Stage.REJECTED, error=final.reason)
        else:
            queue.finish(update_id, ok=False, stage=Stage.ABORTED, error=SOURCE_LOST_REASON)
        queue.remove(update_id)
        lost.append(update_id)
    return lost


def _unstarted(queue: UpdateQueue, versions: VersionStore) -> set[int]:
    """Versions still RECEIVED whose update waits in the queue or was taken but not begun."""
    spare = set()
    for update_id in queue.queued() + queue.running():
        version = queue.get(update_id).version
        if versions.get(version).status is VersionStatus.RECEIVED:
            spare.add(version)
    return spare


def _recover_queue(queue: UpdateQueue, versions: VersionStore) -> list[str]:
    """Rule 5; returns the ids re-queued."""
    requeued = []
    for update_id in queue.running():
        record = queue.get(update_id)
        status = versions.get(record.version).status
        if status is VersionStatus.RECEIVED:
            log.info("re-queueing update %s (version %d): the daemon stopped before it ran",
                     update_id, record.version)  # fmt: skip
            queue.requeue_front(update_id)
            requeued.append(update_id)
            continue
        if status in EVER_COMMITTED:
            queue.finish(update_id, ok=True, stage=Stage.COMMITTED, error=None)
        else:
            if status not in FINAL_FAILURES:
                with contextlib.suppress(RefitError):
                    versions.transition(
                        record.version, VersionStatus.ABORTED,
                        reason="the daemon restarted during this update; push it again",
                    )  # fmt: skip
            final = versions.get(record.version)
            stage = Stage.REJECTED if final.status is VersionStatus.REJECTED else Stage.ABORTED
            queue.finish(update_id, ok=False, stage=stage, error=final.reason)
        drop_upload(record)
        queue.done(update_id)
    return requeued
