"""The `distributed` route on real processes: the daemon (this test process) sends each rank its
shard over gloo on loopback (`ranks.transport: distributed` makes the ranks on this host take
the route other hosts take), and a rank that is killed, paused or cut off at each phase of a
transfer aborts the update, leaves every rank on the previous version, and the next update
goes through on a new group.

Faults land at named failpoints in the victim rank (rollout/dist_recv.py): `rendezvous` (it
reached the daemon's store, no group yet), `header` (group formed, header checked), `bucket`
(one bucket in, the others not). Timeouts are only bounds for "it never happened".
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import RolloutAborted
from orchestrator.state.versions import VersionStatus
from tests.conftest import wait_until
from tests.orchestrator._cluster import (  # noqa: F401
    Cluster,
    make_cluster,
    random_shards,
    wait_txn,
)

S = VersionStatus
PHASES = ("rendezvous", "header", "bucket")
VICTIM = 1
# 64 KiB buckets and ~2 MiB shards: 33 buckets per rank, so that a fault after the first one
# lands mid-transfer (gloo sends no further ahead than the receives posted, two here).
DIST = {"transport": "distributed", "dist_host": "127.0.0.1", "dist_bucket_mb": 1 / 16}


def _version(c: Cluster, seed: int) -> int:
    return c.make_version(shards=random_shards(c.tp_size, seed, rows=2048, cols=1024))


def _prepare_entries(c: Cluster, txn: str) -> list[dict[str, Any]]:
    for _, fields in c.client.xrange(c.keys.rank_commands):
        if fields.get("type") == "PREPARE" and fields.get("txn") == txn:
            return json.loads(fields["shards"])  # type: ignore[no-any-return]
    raise AssertionError(f"no PREPARE for transaction {txn}")


@pytest.mark.parametrize("tp", [2, 4])
def test_shards_arrive_over_gloo_and_the_groups_outlive_a_commit(make_cluster, tp: int) -> None:  # noqa: F811
    c = make_cluster(tp, ranks=DIST)
    v1 = _version(c, seed=1)
    first = c.rollout(v1, in_memory=True)
    # Every rank checked what arrived against the digest of the daemon's bytes (wait_ready
    # compares each rank's reported digest with the version's layout record).
    state = c.wait_ready(v1)
    assert [r["transport"] for r in state["ranks"]] == ["distributed/gloo"] * tp
    entries = _prepare_entries(c, first["txn"])
    assert [e["via"] for e in entries] == ["distributed"] * tp
    assert len({e["group"] for e in entries}) == tp  # one group of two per rank

    v2 = _version(c, seed=2)
    second = c.rollout(v2, in_memory=True)
    c.wait_ready(v2)
    # Committed transactions keep their groups: the next update forms none.
    assert [e["group"] for e in _prepare_entries(c, second["txn"])] == [e["group"] for e in entries]

    # A rollback moves no bytes; the ranks still say how those bytes once arrived.
    back = c.rollback()
    state = c.wait_ready(v1)
    assert [e["via"] for e in _prepare_entries(c, back["txn"])] == ["resident"] * tp
    assert [r["transport"] for r in state["ranks"]] == ["distributed/gloo"] * tp


def test_a_rank_without_a_distributed_address_is_refused_when_distributed_is_required(
    make_cluster,  # noqa: F811
) -> None:
    # No agent has registered, so none advertises an address: refused before anything is sent.
    c = make_cluster(2, ranks=DIST, start=False)
    v1 = _version(c, seed=3)
    with pytest.raises(RolloutAborted, match="rank 0 advertises no torch.distributed address"):
        c.rollout(v1, in_memory=True)
    assert c.status(v1) == S.ABORTED


def _roll_in_background(c: Cluster, version: int) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def roll() -> None:
        try:
            outcome["result"] = c.rollout(version, in_memory=True)
        except RolloutAborted as exc:
            outcome["error"] = exc.message

    thread = threading.Thread(target=roll)
    thread.start()
    return thread, outcome


def _assert_aborted_on_previous(c: Cluster, version: int, previous: int, outcome: dict) -> None:
    assert "result" not in outcome, outcome
    assert f"rank {VICTIM}" in outcome["error"], outcome
    assert c.status(version) == S.ABORTED
    state = c.wait_ready(previous)
    assert state["active_version"] == previous
    assert [r["staged_version"] for r in state["ranks"]] == [None] * c.tp_size


@pytest.mark.parametrize("fault", ["kill", "stop", "close"])
def test_a_rank_faulted_at_each_phase_of_a_transfer_aborts_and_the_next_update_commits(
    make_cluster,  # noqa: F811
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    fault: str,
) -> None:
    gates = {p: tmp_path / f"{fault}-{p}" for p in PHASES}
    if fault == "close":
        # Armed by creating the file; firing removes it.
        points = {p: f"shutdown-sockets-if:{gates[p]}" for p in PHASES}
    else:
        # The rank waits at the point until the file exists; absent, it is armed.
        points = {p: f"wait-file:{gates[p]}" for p in PHASES}
        for gate in gates.values():
            gate.touch()
    clean_env.setenv(
        "REFITD_FAILPOINTS", ",".join(f"rank{VICTIM}.dist.{p}={a}" for p, a in points.items())
    )
    c = make_cluster(2, ranks=DIST)
    # From the artifact, so that the first distributed transfer (rendezvous first) forms groups.
    previous = _version(c, seed=10)
    c.rollout(previous)
    c.wait_ready(previous)

    for i, phase in enumerate(PHASES):
        gate = gates[phase]
        waiting = gate.with_name(gate.name + ".waiting")
        waiting.unlink(missing_ok=True)
        if fault == "close":
            gate.touch()
        else:
            gate.unlink()
        version = _version(c, seed=20 + i)
        thread, outcome = _roll_in_background(c, version)
        if fault == "close":
            wait_until(lambda g=gate: not g.exists(), timeout_s=30)
        else:
            wait_until(waiting.exists, timeout_s=30)
            c.signal_rank(VICTIM, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        thread.join(60)
        assert not thread.is_alive(), f"the rollout never ended ({fault} at {phase})"
        if fault == "stop":
            c.signal_rank(VICTIM, signal.SIGCONT)
        if fault != "close":
            gate.touch()
        _assert_aborted_on_previous(c, version, previous, outcome)

        following = _version(c, seed=30 + i)
        c.rollout(following, in_memory=True)
        state = c.wait_ready(following)
        assert [r["transport"] for r in state["ranks"]] == ["distributed/gloo"] * 2
        previous = following


def test_an_aborted_rollback_leaves_the_kept_groups_and_the_next_update_uses_them(
    make_cluster,  # noqa: F811
) -> None:
    # A rollback moves no bytes (`resident`), so its abort drops no group: not on the daemon's
    # side, which sent nothing, and not on a rank's, which would otherwise rejoin a group the
    # daemon still holds and fail the next update.
    c = make_cluster(2, ranks=DIST)
    v1, v2 = _version(c, seed=41), _version(c, seed=42)
    c.rollout(v1, in_memory=True)
    c.wait_ready(v1)
    kept = c.rollout(v2, in_memory=True)
    c.wait_ready(v2)
    groups = [e["group"] for e in _prepare_entries(c, kept["txn"])]

    c.signal_rank(VICTIM, signal.SIGSTOP)
    try:
        with pytest.raises(RolloutAborted, match=f"rank {VICTIM}"):
            c.rollback()
    finally:
        c.signal_rank(VICTIM, signal.SIGCONT)
    state = c.wait_ready(v2)
    assert [r["staged_version"] for r in state["ranks"]] == [None, None]

    v3 = _version(c, seed=43)
    third = c.rollout(v3, in_memory=True)
    state = c.wait_ready(v3)
    assert [e["group"] for e in _prepare_entries(c, third["txn"])] == groups
    assert [r["transport"] for r in state["ranks"]] == ["distributed/gloo"] * 2
