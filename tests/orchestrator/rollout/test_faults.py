"""Faults mid-rollout on real processes: a rank SIGKILLed, Redis SIGKILLed, a rank paused past
its deadline, and a seeded random schedule of such faults over many updates."""

from __future__ import annotations

import random
import signal
import threading
import time
from typing import Any

import pytest
import torch

from orchestrator.errors import RolloutAborted
from orchestrator.state.versions import VersionStatus
from tests.conftest import wait_until
from tests.orchestrator._cluster import (  # noqa: F401
    Driver,
    decide_with_ranks_stopped,
    make_cluster,
    random_shards,
    resume_ranks,
    wait_txn,
)

S = VersionStatus


def test_a_rank_killed_during_prepare_aborts_within_the_deadline(make_cluster) -> None:  # noqa: F811
    c = make_cluster(4)
    v1 = c.make_version()
    c.rollout(v1)
    v2 = c.make_version()
    deadline = c.settings.rollout.prepare_deadline_s
    # Stopped first, so that it is certainly mid-prepare (holding an unread PREPARE) when killed.
    victim = c.signal_rank(2, signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    def roll() -> None:
        t0 = time.monotonic()
        try:
            c.rollout(v2)
        except RolloutAborted as exc:
            outcome["error"] = exc.message
        outcome["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=roll)
    thread.start()
    wait_txn(c, v2, lambda t: t.get("r0") == "PREPARED")
    c.signal_rank(2, signal.SIGKILL)
    # The other ranks keep serving v1 all along.
    for r in (0, 1, 3):
        assert c.rank_hash(r)["version"] == str(v1)
    thread.join(30)

    assert "rank 2" in outcome["error"], outcome
    assert outcome["seconds"] < deadline + 0.5
    assert c.status(v2) == S.ABORTED
    state = c.wait_ready(v1)  # rank 2, restarted, comes back on v1; no one holds v2 staged
    assert c.pid(2) != victim
    assert [r["staged_version"] for r in state["ranks"]] == [None] * 4
    assert state["active_version"] == v1
    v3 = c.make_version()
    assert c.rollout(v3)["pending_ranks"] == []


def test_redis_killed_between_prepare_and_commit_loses_no_decision(make_cluster) -> None:  # noqa: F811
    c = make_cluster(4, ranks={"heartbeat_timeout_s": 4.0}, rollout={"prepare_deadline_s": 8})
    v1 = c.make_version()
    c.rollout(v1)
    driver = Driver(c)
    v2 = c.make_version()
    try:
        # Every rank prepared; COMMIT decided while no rank can apply it.
        txn = decide_with_ranks_stopped(c, driver, v2)
        c.redis.kill()  # SIGKILL: only what appendfsync always wrote survives
        c.redis.start()
        after = c.client.hgetall(c.keys.txn(txn["id"]))
        assert after["decision"] == "COMMIT" and after["epoch"] == txn["epoch"]
        assert c.client.hgetall(c.keys.active)["version"] == str(v2)
        assert c.coordinator.committed_history() == [v1, v2]
        assert (c.status(v1), c.status(v2)) == (S.SUPERSEDED, S.COMMITTED)
        commands = [f for _, f in c.client.xrange(c.keys.rank_commands)]
        assert commands[-1] == {"type": "COMMIT", "txn": txn["id"], "version": str(v2),
                                "epoch": txn["epoch"]}  # fmt: skip
    finally:
        resume_ranks(c)
    # The ranks reconnect and apply it. The driver either saw its acks through the restart or
    # lost its connection; then the next daemon start settles the transaction.
    reply = driver.read(timeout_s=30)
    if not reply["ok"]:
        assert reply["error"] == "RedisUnavailable", reply
        driver.kill()
        driver = Driver(c)
    c.wait_ready(v2)
    wait_until(lambda: c.coordinator.open_txns() == [])
    driver.stop()


def test_a_rank_paused_past_the_deadline_is_refused_with_its_old_epoch(make_cluster) -> None:  # noqa: F811
    c = make_cluster(4)
    v1 = c.make_version()
    c.rollout(v1)
    # Rank 2's shard is large enough that fetching, checking and staging it takes a while after
    # the others have acked: the window in which it is paused, past its epoch check and before
    # its PREPARED ack. (Paused before its epoch check instead, it refuses the PREPARE itself.)
    shards = random_shards(4, seed=7)
    shards[2]["big"] = torch.randn(4096, 8192).to(torch.bfloat16)
    v2 = c.make_version(shards=shards)
    outcome: dict[str, str] = {}

    def roll() -> None:
        try:
            c.rollout(v2)
        except RolloutAborted as exc:
            outcome["error"] = exc.message

    thread = threading.Thread(target=roll)
    thread.start()
    txn = wait_txn(c, v2, lambda t: all(t[f"r{r}"] == "PREPARED" for r in (0, 1, 3)))["id"]
    c.signal_rank(2, signal.SIGSTOP)
    try:
        thread.join(30)
        assert "rank 2" in outcome["error"]
        begin_epoch = int(c.client.hget(c.keys.txn(txn), "begin_epoch"))
        assert int(c.client.get(c.keys.epoch)) > begin_epoch  # the abort decided past it
    finally:
        c.signal_rank(2, signal.SIGCONT)

    refused = wait_until(lambda: c.events(kind="rank", rank="2", to="REFUSED"), timeout_s=15)
    assert refused[0]["txn"] == txn
    assert f"carries epoch {begin_epoch} but the current epoch is" in refused[0]["reason"]
    assert c.client.hget(c.keys.txn(txn), "r2") == "PENDING"  # its late ack changed nothing
    state = c.wait_ready(v1)
    assert [r["staged_version"] for r in state["ranks"]] == [None] * 4
    v3 = c.make_version()
    assert c.rollout(v3)["pending_ranks"] == []


FAULTS = ["none", "kill_rank", "kill_daemon", "kill_daemon_after_decision", "pause_rank"]
WEIGHTS = [0.25, 0.20, 0.15, 0.15, 0.25]


@pytest.mark.slow
def test_a_seeded_random_fault_schedule_leaves_every_rank_on_the_recorded_active_version(
    make_cluster,  # noqa: F811
) -> None:
    rng = random.Random(20261128)
    c = make_cluster(4, ranks={"heartbeat_timeout_s": 1.0},
                     rollout={"prepare_deadline_s": 2.0, "commit_deadline_s": 2.0})  # fmt: skip
    driver = Driver(c)
    history: list[int] = []
    seen: dict[str, int] = dict.fromkeys(FAULTS, 0)
    for step in range(30):
        fault = rng.choices(FAULTS, WEIGHTS)[0]
        seen[fault] += 1
        rank = rng.randrange(4)
        v = c.make_version()
        driver.send(f"rollout {v}")
        reply = None
        if fault == "kill_rank":
            time.sleep(rng.uniform(0.0, 0.03))
            c.signal_rank(rank, signal.SIGKILL)
        elif fault == "pause_rank":
            c.signal_rank(rank, signal.SIGSTOP)
            # Either side of ranks.heartbeat_timeout_s (1.0): a slow rank, or a dead-looking one.
            time.sleep(rng.uniform(0.05, 1.5))
            c.signal_rank(rank, signal.SIGCONT)
        if fault in ("kill_daemon", "kill_daemon_after_decision"):
            if fault == "kill_daemon":
                time.sleep(rng.uniform(0.0, 0.04))
            else:
                wait_txn(c, v, lambda t: t.get("decision") == "COMMIT")
            driver.kill()
            driver = Driver(c)
        else:
            reply = driver.read(timeout_s=30)

        # Settled: no open transaction, every rank alive on the active version's digests.
        wait_until(lambda: c.coordinator.open_txns() == [], timeout_s=30)
        state = c.wait_ready(timeout_s=40)
        now = c.coordinator.committed_history()
        context = f"step {step} ({fault}), version {v}, reply {reply}, history {now}\n{c.logs()}"
        assert now[: len(history)] == history, "a committed decision was lost: " + context
        assert len(now) - len(history) <= 1, context
        history = now
        assert state["active_version"] == (history[-1] if history else None), context
        committed = bool(history) and history[-1] == v
        assert c.status(v) == (S.COMMITTED if committed else S.ABORTED), context
        if reply is not None:
            assert reply["ok"] == committed, context
            if not committed:
                assert reply["error"] == "RolloutAborted", context
        for older in history[:-1]:
            if older != history[-1]:
                assert c.status(older) == S.SUPERSEDED, context
        assert len({r["epoch"] for r in state["ranks"]}) == 1, context
    driver.stop()
    assert all(seen.values()), seen  # every kind of fault happened
    assert len(history) >= 10, history  # and most updates still went through
