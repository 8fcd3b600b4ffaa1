"""The coordinator: each 2PC Lua script against a real Redis, then whole rollouts and rollbacks
across real rank agents."""

from __future__ import annotations

import json
import time

import pytest

from orchestrator.errors import Conflict, FencedOut, NotFound, RolloutAborted, StaleTransition
from orchestrator.rollout.txn import ACK, BEGIN, DECIDE, NotPrepared
from orchestrator.state.lua import ScriptRegistry
from orchestrator.state.versions import EVENTS_MAXLEN, VersionStatus
from tests.orchestrator._cluster import Cluster, make_cluster  # noqa: F401

S = VersionStatus


# --- The scripts alone: the test plays coordinator and ranks ---------------------------------
class Scripts:
    """Calls the 2PC scripts the way the coordinator and rank agents do, for a TP 2 'cluster'
    with no agent processes."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.k = cluster.keys
        self.run = ScriptRegistry(cluster.client)

    def begin(self, txn: str, version: int, fence: int, digests: list[str]) -> list:
        k = self.k
        shards = [{"digest": d, "via": "artifact", "path": "/p", "bytes": 1} for d in digests]
        return self.run[BEGIN](
            [k.update_lock, k.epoch, k.active, k.txn(txn), k.open_txns, k.version(version),
             k.events, k.rank_commands],
            [fence, txn, version, "rollout", repr(time.time()), json.dumps(shards),
             "QUANTIZED,VERIFIED", "PREPARED", EVENTS_MAXLEN, 100],
        )  # fmt: skip

    def ack(self, txn: str, rank: int, phase: str, epoch: int, digest: str = "") -> list:
        k = self.k
        return self.run[ACK](
            [k.txn(txn), k.epoch, k.rank(rank), k.txn_acks(txn), k.open_txns, k.events],
            [txn, rank, phase, epoch, digest, "", repr(time.time()), EVENTS_MAXLEN],
        )

    def decide(self, txn: str, version: int, prev: int | None, decision: str, fence: int) -> list:
        k = self.k
        commit = decision == "COMMIT"
        return self.run[DECIDE](
            [k.update_lock, k.epoch, k.active, k.txn(txn), k.version(version),
             k.version(prev if prev else version), k.active_history, k.events,
             k.rank_commands, k.open_txns, k.txn_acks(txn)],
            [fence, decision, repr(time.time()), "" if commit else "test abort",
             "COMMITTED" if commit else "ABORTED", "PREPARED",
             "SUPERSEDED", EVENTS_MAXLEN, 100],
        )  # fmt: skip

    def commands(self) -> list[dict[str, str]]:
        return [f for _, f in self.c.client.xrange(self.k.rank_commands)]


@pytest.fixture
def scripts(make_cluster) -> Scripts:  # noqa: F811
    return Scripts(make_cluster(2, start=False))


def _digests(c: Cluster, v: int) -> list[str]:
    return [c.digest(v, r) for r in range(c.tp_size)]


def test_begin_needs_the_current_fence_and_no_open_transaction(scripts: Scripts) -> None:
    c = scripts.c
    v = c.make_version()
    lock = c.lock()
    fence = lock.acquire()
    with pytest.raises(FencedOut, match="stale"):
        scripts.begin("t1", v, fence - 1, _digests(c, v))
    assert c.status(v) == S.VERIFIED and not c.client.exists(c.keys.txn("t1"))
    epoch, active = scripts.begin("t1", v, fence, _digests(c, v))
    assert (epoch, active) == ("0", "")
    assert c.status(v) == S.PREPARED
    (prepare,) = scripts.commands()  # PREPARE went out in the same step, with every shard
    assert (prepare["type"], prepare["txn"], prepare["epoch"]) == ("PREPARE", "t1", "0")
    assert [s["digest"] for s in json.loads(prepare["shards"])] == _digests(c, v)
    assert c.client.smembers(c.keys.open_txns) == {"t1"}
    assert c.client.hget(c.keys.version(v), "last_txn") == "t1"
    v2 = c.make_version()
    with pytest.raises(StaleTransition, match="t1 are still open"):
        scripts.begin("t2", v2, fence, _digests(c, v2))
    lock.release()


def test_ack_with_an_old_epoch_is_refused_and_changes_nothing(scripts: Scripts) -> None:
    c = scripts.c
    v = c.make_version()
    with c.lock() as lock:
        epoch, _ = scripts.begin("t1", v, lock.fence, _digests(c, v))
        assert scripts.ack("t1", 0, "PREPARED", int(epoch), c.digest(v, 0)) == ["PREPARING"]
        scripts.decide("t1", v, None, "ABORT", lock.fence)
    before = c.client.hgetall(c.keys.txn("t1"))
    with pytest.raises(FencedOut, match="carries epoch 0 but the current epoch is 1"):
        scripts.ack("t1", 1, "PREPARED", int(epoch), c.digest(v, 1))
    assert c.client.hgetall(c.keys.txn("t1")) == before
    assert c.client.hget(c.keys.rank(1), "state") is None
    with pytest.raises(NotFound):
        scripts.ack("no-such-txn", 0, "PREPARED", 1)
    with pytest.raises(NotFound, match="rank 5 is not part"):
        scripts.ack("t1", 5, "PREPARED", 1)


def test_decide_commit_needs_every_rank_prepared_with_its_digest(scripts: Scripts) -> None:
    c = scripts.c
    v = c.make_version()
    with c.lock() as lock:
        epoch, _ = scripts.begin("t1", v, lock.fence, _digests(c, v))
        e = int(epoch)
        scripts.ack("t1", 0, "PREPARED", e, c.digest(v, 0))
        with pytest.raises(NotPrepared, match=r"rank\(s\) 1 have not"):
            scripts.decide("t1", v, None, "COMMIT", lock.fence)
        scripts.ack("t1", 1, "PREPARED", e, "f" * 64)  # staged something else
        with pytest.raises(NotPrepared, match=r"rank\(s\) 1 have not"):
            scripts.decide("t1", v, None, "COMMIT", lock.fence)
        assert c.client.get(c.keys.epoch) is None and c.status(v) == S.PREPARED


def test_decide_commit_records_decision_active_version_and_statuses_at_once(scripts) -> None:
    c = scripts.c
    v1, v2 = c.make_version(), c.make_version()
    with c.lock() as lock:
        e, _ = scripts.begin("t1", v1, lock.fence, _digests(c, v1))
        for r in range(2):
            scripts.ack("t1", r, "PREPARED", int(e), c.digest(v1, r))
        assert scripts.decide("t1", v1, None, "COMMIT", lock.fence) == ["1"]
        for r in range(2):
            scripts.ack("t1", r, "COMMITTED", 1, c.digest(v1, r))
        e, active = scripts.begin("t2", v2, lock.fence, _digests(c, v2))
        assert (e, active) == ("1", str(v1))
        for r in range(2):
            scripts.ack("t2", r, "PREPARED", 1, c.digest(v2, r))
        assert scripts.decide("t2", v2, v1, "COMMIT", lock.fence) == ["2"]
    assert c.client.hgetall(c.keys.active) | {"since": "x"} == {
        "version": str(v2), "epoch": "2", "txn": "t2", "since": "x"}  # fmt: skip
    assert c.status(v2) == S.COMMITTED and c.status(v1) == S.SUPERSEDED
    assert c.client.lrange(c.keys.active_history, 0, -1) == [str(v1), str(v2)]
    assert c.client.hget(c.keys.txn("t2"), "state") == "COMMITTING"
    assert c.client.smembers(c.keys.open_txns) == {"t2"}  # until the ranks ack
    # The decision and the COMMIT to the ranks are written together.
    assert scripts.commands()[-1] == {"type": "COMMIT", "txn": "t2", "version": str(v2),
                                      "epoch": "2"}  # fmt: skip
    # A second decision on a decided transaction is refused.
    with c.lock() as lock, pytest.raises(StaleTransition, match="already COMMITTING"):
        scripts.decide("t2", v2, v1, "ABORT", lock.fence)


def test_a_decision_under_a_lost_fence_is_refused(scripts: Scripts) -> None:
    c = scripts.c
    v = c.make_version()
    old = c.lock()
    old_fence = old.acquire()
    e, _ = scripts.begin("t1", v, old_fence, _digests(c, v))
    for r in range(2):
        scripts.ack("t1", r, "PREPARED", int(e), c.digest(v, r))
    new = c.lock()
    new.acquire(steal=True)  # a restarted daemon took over
    with pytest.raises(FencedOut, match=f"fence {old_fence} is stale"):
        scripts.decide("t1", v, None, "COMMIT", old_fence)
    assert c.client.hget(c.keys.active, "version") is None
    assert c.client.hget(c.keys.txn("t1"), "state") == "PREPARING"
    assert not old.release()  # it was taken over: nothing to release
    new.release()


def test_the_last_commit_ack_closes_the_transaction_and_repeats_are_harmless(scripts) -> None:
    c = scripts.c
    v = c.make_version()
    with c.lock() as lock:
        e, _ = scripts.begin("t1", v, lock.fence, _digests(c, v))
        for r in range(2):
            scripts.ack("t1", r, "PREPARED", int(e), c.digest(v, r))
        scripts.decide("t1", v, None, "COMMIT", lock.fence)
    with pytest.raises(FencedOut, match="decision was made at epoch 1"):
        scripts.ack("t1", 0, "COMMITTED", 0, c.digest(v, 0))
    assert scripts.ack("t1", 0, "COMMITTED", 1, c.digest(v, 0)) == ["COMMITTING"]
    assert scripts.ack("t1", 0, "COMMITTED", 1, c.digest(v, 0)) == ["COMMITTING"]
    assert c.client.smembers(c.keys.open_txns) == {"t1"}
    assert scripts.ack("t1", 1, "COMMITTED", 1, c.digest(v, 1)) == ["COMMITTED"]
    assert c.client.smembers(c.keys.open_txns) == set()
    rank1 = c.rank_hash(1)
    assert (rank1["version"], rank1["epoch"], rank1["digest"]) == (
        str(v), "1", c.digest(v, 1))  # fmt: skip
    assert 0 < c.client.ttl(c.keys.txn_acks("t1")) <= 86400
    txn_events = [e["to"] for e in c.events(kind="txn", txn="t1")]
    assert txn_events == ["PREPARING", "COMMITTING", "COMMITTED"]


def test_an_abort_closes_the_transaction_and_tells_every_rank_at_once(scripts) -> None:
    c = scripts.c
    v = c.make_version()
    with c.lock() as lock:
        scripts.begin("t1", v, lock.fence, _digests(c, v))
        scripts.ack("t1", 0, "PREPARED", 0, c.digest(v, 0))
        assert scripts.decide("t1", v, None, "ABORT", lock.fence) == ["1"]
    assert c.status(v) == S.ABORTED
    assert c.versions.get(v).reason == "test abort"
    assert c.client.hget(c.keys.txn("t1"), "state") == "ABORTED"
    assert c.client.smembers(c.keys.open_txns) == set()
    assert 0 < c.client.ttl(c.keys.txn_acks("t1")) <= 86400
    assert [(m["type"], m["txn"], m["epoch"]) for m in scripts.commands()] == [
        ("PREPARE", "t1", "0"), ("ABORT", "t1", "1")]  # fmt: skip
    assert [e["to"] for e in c.events(kind="txn", txn="t1")] == ["PREPARING", "ABORTED"]
    assert c.client.hget(c.keys.active, "version") is None  # nothing became active


# --- Whole rollouts across real rank agents -------------------------------------------------
def test_five_updates_in_a_row_commit_on_every_rank_with_the_artifacts_digests(
    make_cluster,  # noqa: F811
) -> None:
    c = make_cluster(4)
    epochs, versions = [], []
    for i in range(5):
        v = c.make_version(label=f"step-{i}")
        result = c.rollout(v)
        assert result["pending_ranks"] == [], c.logs()
        assert result["from_version"] == (versions[-1] if versions else None)
        state = c.coordinator.ledger.active()
        assert state["active_version"] == v
        assert state["epoch"] == result["epoch"]
        for rank in state["ranks"]:
            assert rank["alive"] and rank["state"] == "READY"
            assert rank["version"] == v and rank["epoch"] == result["epoch"]
            assert rank["digest"] == c.digest(v, rank["rank"])
            assert rank["staged_version"] is None
        assert [r["state"] for r in c.coordinator.ledger.version_ranks(v)] == ["COMMITTED"] * 4
        assert [r["digest"] for r in c.coordinator.ledger.version_ranks(v)] == [
            c.digest(v, r) for r in range(4)]  # fmt: skip
        epochs.append(result["epoch"])
        versions.append(v)
    assert epochs == sorted(set(epochs))
    assert c.committed_history() == versions
    assert [c.status(v) for v in versions] == [S.SUPERSEDED] * 4 + [S.COMMITTED]
    assert c.coordinator.ledger.open_txns() == []
    # Retention 3: the two oldest are pruned, the active and the previous kept.
    assert c.artifacts.stored_versions() == versions[2:]


def test_rolling_out_a_version_not_ready_for_it_changes_nothing(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2, start=False)
    v = c.versions.create(label=None)  # RECEIVED: not quantized yet
    with pytest.raises(Conflict, match="only a QUANTIZED or VERIFIED"):
        c.rollout(v)
    with pytest.raises(NotFound, match="version 99 does not exist"):
        c.rollout(99)
    assert c.status(v) == S.RECEIVED
    assert c.client.get(c.keys.epoch) is None


def test_rollback_to_the_previous_and_to_a_chosen_version(make_cluster) -> None:  # noqa: F811
    c = make_cluster(4)
    v1, v2, v3, v4 = (c.make_version() for _ in range(4))
    for v in (v1, v2, v3, v4):
        c.rollout(v)

    result = c.rollback()
    assert (result["version"], result["kind"], result["from_version"]) == (v3, "rollback", v4)
    assert c.status(v3) == S.COMMITTED and c.status(v4) == S.ROLLED_BACK
    state = c.coordinator.ledger.active()
    assert state["active_version"] == v3
    assert [r["digest"] for r in state["ranks"]] == [c.digest(v3, r) for r in range(4)]

    result = c.rollback(v2)
    assert (result["version"], result["from_version"]) == (v2, v3)
    assert c.status(v2) == S.COMMITTED and c.status(v3) == S.ROLLED_BACK
    state = c.coordinator.ledger.active()
    assert state["active_version"] == v2
    assert all(r["version"] == v2 for r in state["ranks"])
    assert [r["digest"] for r in state["ranks"]] == [c.digest(v2, r) for r in range(4)]
    assert c.committed_history() == [v1, v2, v3, v4, v3, v2]
    # The version rolled back from is not a default target, whatever its age.
    assert c.coordinator.ledger.previous_committed() == v1


def test_rollback_to_a_pruned_unknown_or_unfit_version_is_a_clear_error_that_changes_nothing(
    make_cluster,  # noqa: F811
) -> None:
    c = make_cluster(2)
    v1, v2, v3, v4 = (c.make_version() for _ in range(4))
    for v in (v1, v2, v3, v4):
        c.rollout(v)
    aborted = c.make_version()
    c.artifacts.remove(aborted)  # its rollout fails at once: no artifacts
    with pytest.raises(
        RolloutAborted, match=f"needs the artifact of version {aborted}, which is not stored"
    ):
        c.rollout(aborted)
    assert c.status(aborted) == S.ABORTED
    assert not c.artifacts.exists(v1)  # retention 3 pruned it

    def snapshot() -> tuple:
        statuses = {v: c.status(v) for v in (v1, v2, v3, v4, aborted)}
        events = [e for e in c.events() if e["kind"] != "lock"]
        return (c.coordinator.ledger.active(), statuses, events, c.artifacts.stored_versions(),
                c.committed_history())  # fmt: skip

    before = snapshot()
    for target, error, message in [
        (999, NotFound, "version 999 does not exist"),
        (v1, Conflict, f"needs the artifact of version {v1}, which is not stored"),
        (v4, Conflict, f"version {v4} is already the active version"),
        (aborted, Conflict, f"version {aborted} is ABORTED; only a version that was active"),
    ]:
        with pytest.raises(error, match=message):
            c.rollback(target)
    after = snapshot()
    for b, a in zip(before, after, strict=True):
        assert a == b


def test_retention_never_prunes_the_active_or_previous_version(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2, rollout={"retention": 2})
    versions = [c.make_version() for _ in range(3)]
    for v in versions:
        c.rollout(v)
    assert c.artifacts.stored_versions() == versions[1:]
    c.rollback(versions[1])  # now v2 active, v3 ROLLED_BACK, previous committed: v1 (pruned)
    assert c.coordinator.ledger.previous_committed() == versions[0]
    v4 = c.make_version()
    c.rollout(v4)
    # Active v4 and previous v2 are pinned; v3 (rolled back from) goes.
    assert c.coordinator.ledger.previous_committed() == versions[1]
    assert c.artifacts.stored_versions() == [versions[1], v4]
