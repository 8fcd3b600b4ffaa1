"""Faults mid-rollout on real processes: a rank SIGKILLed, Redis SIGKILLed, a rank paused past
its deadline, and a seeded schedule of such faults over many updates.

Every fault lands at a protocol point seen in Redis (the transaction's PREPARE sent, the Nth
PREPARED ack, the decision recorded) or in the shard transport, never after a sleep: so each
test asserts what happens and in what order, and the seeded schedule replays the same faults
with the same outcomes on any machine. Timeouts are only bounds for "it never happened".
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request

from api.errors import install_error_handlers
from api.routers import artifacts as artifacts_router
from orchestrator.errors import RolloutAborted
from orchestrator.service.daemon import Refitd
from orchestrator.state.versions import VersionStatus
from tests.conftest import wait_until
from tests.orchestrator._cluster import (  # noqa: F401
    Cluster,
    Driver,
    decide_with_ranks_stopped,
    make_cluster,
    resume_ranks,
    wait_txn,
)

S = VersionStatus
TRAINER = "trainer-token-0123456789"
ADMIN = "admin-token-0123456789ab"


def _prepared(cluster: Cluster, ranks: Any, n: int) -> Callable[[dict[str, str]], bool]:
    """A transaction predicate: at least `n` of `ranks` have acked PREPARED."""
    return lambda t: sum(t.get(f"r{r}") == "PREPARED" for r in ranks) >= n


def test_a_rank_killed_during_prepare_aborts_the_update(make_cluster) -> None:  # noqa: F811
    c = make_cluster(4)
    v1 = c.make_version()
    c.rollout(v1)
    v2 = c.make_version()
    # Stopped first, so that it is certainly mid-prepare (holding an unread PREPARE) when killed.
    victim = c.signal_rank(2, signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    def roll() -> None:
        try:
            c.rollout(v2)
        except RolloutAborted as exc:
            outcome["error"] = exc.message

    thread = threading.Thread(target=roll)
    thread.start()
    wait_txn(c, v2, _prepared(c, (0, 1, 3), 3))
    c.signal_rank(2, signal.SIGKILL)
    # The other ranks keep serving v1 all along.
    for r in (0, 1, 3):
        assert c.rank_hash(r)["version"] == str(v1)
    thread.join(60)
    assert not thread.is_alive(), "the rollout never ended"

    assert "rank 2" in outcome["error"], outcome
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
        assert c.committed_history() == [v1, v2]
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
    wait_until(lambda: c.coordinator.ledger.open_txns() == [])
    driver.stop()


@pytest.fixture
def gated_shards(make_cluster) -> Iterator[tuple[Cluster, dict[str, threading.Event]]]:  # noqa: F811
    """A TP 4 cluster whose ranks fetch shards over HTTP from the real artifacts router, where
    rank 2's request for version 2 is held until the test opens the gate: a protocol point
    (rank 2 is past its epoch check and has not acked) that no timing decides.
    Events: `arrived` (rank 2's request is held), `open` (let it through)."""
    # The server's socket is bound (port 0) before the ranks learn its address: no free-port race.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    c = make_cluster(4, start=False, dev_mode=False, server={"port": port},
                     auth={"trainer_token": TRAINER, "admin_token": ADMIN},
                     ranks={"fetch": "http"})  # fmt: skip
    gate = {"arrived": threading.Event(), "open": threading.Event()}
    app = FastAPI()
    app.state.core = Refitd(c.settings)
    install_error_handlers(app)
    app.include_router(artifacts_router.router)

    @app.middleware("http")
    async def _hold(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.url.path == "/artifacts/2/2":
            gate["arrived"].set()
            while not gate["open"].is_set():
                await asyncio.sleep(0.01)
        return await call_next(request)

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        c.start_ranks()
        yield c, gate
    finally:
        gate["open"].set()
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_rank_paused_past_the_deadline_is_refused_with_its_old_epoch(gated_shards) -> None:
    c, gate = gated_shards
    v1 = c.make_version()
    c.rollout(v1)
    v2 = c.make_version()
    assert v2 == 2
    outcome: dict[str, str] = {}

    def roll() -> None:
        try:
            c.rollout(v2)
        except RolloutAborted as exc:
            outcome["error"] = exc.message

    thread = threading.Thread(target=roll)
    thread.start()
    assert gate["arrived"].wait(60), "rank 2 never asked for its shard"
    txn = wait_txn(c, v2, _prepared(c, (0, 1, 3), 3))["id"]
    # Paused mid-fetch (past its epoch check, before its ack), until its heartbeat expires and
    # the coordinator aborts.
    c.signal_rank(2, signal.SIGSTOP)
    try:
        thread.join(60)
        assert not thread.is_alive(), "the rollout never ended"
        assert "rank 2" in outcome["error"], outcome
        begin_epoch = int(c.client.hget(c.keys.txn(txn), "begin_epoch"))
        assert int(c.client.get(c.keys.epoch)) > begin_epoch  # the abort decided past it
    finally:
        c.signal_rank(2, signal.SIGCONT)
        gate["open"].set()

    refused = wait_until(lambda: c.events(kind="rank", rank="2", to="REFUSED"), timeout_s=30)
    assert refused[0]["txn"] == txn
    assert f"carries epoch {begin_epoch} but the current epoch is" in refused[0]["reason"]
    assert c.client.hget(c.keys.txn(txn), "r2") == "PENDING"  # its late ack changed nothing
    state = c.wait_ready(v1)
    assert [r["staged_version"] for r in state["ranks"]] == [None] * 4
    v3 = c.make_version()
    assert c.rollout(v3)["pending_ranks"] == []


# Each fault and the outcome it must have: the victim is stopped before the rollout where its
# ack must not come, so whether the update commits is fixed by the fault, not by timing.
OUTCOMES = {
    "none": S.COMMITTED,
    "kill_rank": S.ABORTED,  # stopped, then killed after the Nth ack of the others
    "kill_daemon": S.ABORTED,  # the daemon killed after the Nth ack: no decision, recovery aborts
    "kill_daemon_after_decision": S.COMMITTED,  # killed once COMMIT is recorded
    "slow_rank": S.COMMITTED,  # stopped, resumed after the Nth ack of the others
    "dead_looking_rank": S.ABORTED,  # stopped until its heartbeat expires and the abort is decided
}
FAULTS = list(OUTCOMES)
WEIGHTS = [0.20, 0.20, 0.15, 0.15, 0.15, 0.15]


@pytest.mark.slow
def test_a_seeded_fault_schedule_has_fixed_outcomes_and_ends_every_rank_on_the_active_version(
    make_cluster,  # noqa: F811
) -> None:
    rng = random.Random(20261128)
    c = make_cluster(4)
    driver = Driver(c)
    expected_history: list[int] = []
    seen: dict[str, int] = dict.fromkeys(FAULTS, 0)
    for step in range(30):
        fault = rng.choices(FAULTS, WEIGHTS)[0]
        seen[fault] += 1
        victim = rng.randrange(4)
        others = [r for r in range(4) if r != victim]
        n_acks = rng.randrange(len(others) + 1)  # 0: as soon as the PREPARE is out
        v = c.make_version()
        if fault in ("kill_rank", "kill_daemon", "slow_rank", "dead_looking_rank"):
            c.signal_rank(victim, signal.SIGSTOP)
        driver.send(f"rollout {v}")
        reply = None
        if fault == "kill_daemon_after_decision":
            wait_txn(c, v, lambda t: t.get("decision") == "COMMIT", timeout_s=60)
        elif fault != "none":
            wait_txn(c, v, _prepared(c, others, n_acks), timeout_s=60)
        if fault == "kill_rank":
            c.signal_rank(victim, signal.SIGKILL)
        elif fault == "slow_rank":
            c.signal_rank(victim, signal.SIGCONT)
        elif fault == "dead_looking_rank":
            wait_txn(c, v, lambda t: t.get("decision") == "ABORT", timeout_s=60)
            c.signal_rank(victim, signal.SIGCONT)
        if fault in ("kill_daemon", "kill_daemon_after_decision"):
            driver.kill()
            if fault == "kill_daemon":
                c.signal_rank(victim, signal.SIGCONT)
            driver = Driver(c)  # its recovery drives the open transaction to its decision
        else:
            reply = driver.read(timeout_s=60)
        committed = OUTCOMES[fault] is S.COMMITTED
        if committed:
            expected_history.append(v)

        # Settled: no open transaction, every rank alive on the active version's digests.
        wait_until(lambda: c.coordinator.ledger.open_txns() == [], timeout_s=60)
        state = c.wait_ready(timeout_s=60)
        history = c.committed_history()
        context = f"step {step} ({fault}, rank {victim}, {n_acks} acks), version {v}, reply " \
                  f"{reply}, history {history}\n{c.logs()}"  # fmt: skip
        assert history == expected_history, context
        assert state["active_version"] == (history[-1] if history else None), context
        assert c.status(v) == OUTCOMES[fault], context
        if reply is not None:
            assert reply["ok"] == committed, context
            if not committed:
                assert reply["error"] == "RolloutAborted", context
        for older in history[:-1]:
            assert c.status(older) == S.SUPERSEDED, context
        assert len({r["epoch"] for r in state["ranks"]}) == 1, context
    driver.stop()
    assert all(seen.values()), seen  # the seed exercises every kind of fault
