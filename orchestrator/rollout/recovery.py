"""What a starting daemon does before it serves: finish what a crashed one left half-done.

1. Take the update lock by force: this daemon runs no pipeline yet, and the fence it gets makes
   any older holder (a daemon that was SIGKILLed, whose lock has not expired) unable to decide.
2. Drive every open transaction to its recorded decision: a COMMIT still waiting for acks is
   re-sent (its ranks got it with the decision; ranks that restart load the active version by
   themselves); no decision recorded: abort (which tells the ranks and closes it).
3. Versions caught mid-pipeline (RECEIVED, QUANTIZED, VERIFIED, PREPARED) become ABORTED with the
   reason "daemon restarted": no pipeline is running to finish them. Acknowledged updates that
   had not started yet (their version still RECEIVED, their id still queued) are spared: the
   pipeline runs them once recovery is done.
4. Prune artifacts that no rollback can use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import StaleTransition
from orchestrator.rollout.coordinator import IN_FLIGHT, Coordinator
from orchestrator.rollout.lock import UpdateLock
from orchestrator.state.versions import VersionStatus, VersionStore

log = logging.getLogger("refitd.recovery")

RESTART_REASON = "daemon restarted"
# Versions are only ever stuck near the top: one pipeline runs at a time, and every start
# recovers the ones a crash left behind. This bounds the scan on a long history.
_SCAN_VERSIONS = 1000


@dataclass
class RecoveryReport:
    """What recovery found and did."""

    transactions: list[dict[str, Any]] = field(default_factory=list)
    aborted_versions: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "aborted_versions": self.aborted_versions,
            "pruned": self.pruned,
        }


def recover(
    coordinator: Coordinator,
    versions: VersionStore,
    lock: UpdateLock,
    *,
    spare: set[int] | frozenset[int] = frozenset(),
) -> RecoveryReport:
    """Run recovery under the update lock (taken by force; see the module docstring).

    `spare`: RECEIVED versions of acknowledged updates that have not started; the pipeline runs
    them after recovery, so they are not aborted."""
    report = RecoveryReport()
    fence = lock.acquire(steal=True)
    try:
        report.transactions = coordinator.settle_open(
            fence=fence, wait=False, reason=f"{RESTART_REASON} before a decision"
        )
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
        report.pruned = coordinator.prune()
    finally:
        lock.release()
    if report.transactions or report.aborted_versions:
        log.warning("recovery: settled %d transaction(s), aborted version(s) %s",
                    len(report.transactions), report.aborted_versions or "none")  # fmt: skip
    return report
