"""A daemon that crashes mid-transaction, restarted: every rank ends on one recorded version.
Also readiness, and `refitd serve` keeping its local rank agents alive."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess

import httpx
import pytest

from orchestrator.data.ipc import SHM_DIR, SHM_PREFIX
from orchestrator.rollout.supervisor import Supervisor
from orchestrator.service.daemon import Refitd
from orchestrator.service.recovery import RESTART_REASON
from orchestrator.settings import load_settings
from orchestrator.state.versions import VersionStatus
from tests.conftest import process_alive, refused_port, wait_until
from tests.orchestrator._cluster import (  # noqa: F401
    Driver,
    decide_with_ranks_stopped,
    make_cluster,
    resume_ranks,
    wait_txn,
)

S = VersionStatus


def _prepared(*ranks: int):
    return lambda t: all(t.get(f"r{r}") == "PREPARED" for r in ranks)


def test_daemon_killed_after_the_decision_every_rank_ends_on_the_new_version(
    make_cluster,  # noqa: F811
) -> None:
    c = make_cluster(4, ranks={"heartbeat_timeout_s": 4.0}, rollout={"prepare_deadline_s": 8})
    v1 = c.make_version()
    c.rollout(v1)
    driver = Driver(c)  # before v2: its recovery would abort a VERIFIED v2
    v2 = c.make_version()
    try:
        txn = decide_with_ranks_stopped(c, driver, v2)
        # The decision is recorded and no rank has applied it: each serves v1, v2 staged.
        state = c.coordinator.ledger.active()
        assert state["active_version"] == v2
        assert [(r["version"], r["staged_version"]) for r in state["ranks"]] == [(v1, v2)] * 4
        driver.kill()
        restarted = Driver(c)
    finally:
        resume_ranks(c)
    assert restarted.started["recovery"]["transactions"] == [
        {"txn": txn["id"], "version": v2, "state": "COMMITTING"}]  # fmt: skip
    state = c.wait_ready(v2)
    assert state["active_version"] == v2 and state["epoch"] == int(txn["epoch"])
    wait_until(lambda: c.coordinator.ledger.open_txns() == [])
    assert c.coordinator.ledger.txn(txn["id"]).state.value == "COMMITTED"
    assert (c.status(v1), c.status(v2)) == (S.SUPERSEDED, S.COMMITTED)
    assert c.committed_history() == [v1, v2]
    restarted.stop()


def test_daemon_killed_before_the_decision_every_rank_ends_on_the_old_version(
    make_cluster,  # noqa: F811
) -> None:
    c = make_cluster(4)
    v1 = c.make_version()
    c.rollout(v1)
    driver = Driver(c)
    v2 = c.make_version()
    c.signal_rank(3, signal.SIGSTOP)  # holds the prepare phase open
    try:
        driver.send(f"rollout {v2}")
        txn = wait_txn(c, v2, _prepared(0, 1, 2))
        driver.kill()
        assert "decision" not in c.client.hgetall(c.keys.txn(txn["id"]))
    finally:
        c.signal_rank(3, signal.SIGCONT)
    # Rank 3 wakes and prepares too: nothing was decided, so its ack still counts.
    wait_txn(c, v2, _prepared(0, 1, 2, 3))

    restarted = Driver(c)
    assert restarted.started["recovery"]["transactions"] == [
        {"txn": txn["id"], "version": v2, "state": "PREPARING"}]  # fmt: skip
    state = c.wait_ready(v1)
    assert all(r["staged_version"] is None for r in state["ranks"])
    record = c.versions.get(v2)
    assert record.status == S.ABORTED
    assert record.reason == f"{RESTART_REASON} before a decision"
    assert c.committed_history() == [v1]
    assert c.coordinator.ledger.txn(txn["id"]).state.value == "ABORTED"
    # The cluster works on: the next rollout commits everywhere.
    v3 = c.make_version()
    assert restarted.call(f"rollout {v3}")["ok"]
    c.wait_ready(v3)
    restarted.stop()


def test_an_open_transaction_whose_version_was_already_aborted_is_still_settled(
    make_cluster,  # noqa: F811
) -> None:
    """A pipeline that failed mid-rollout (a Redis timeout, say) marks its version ABORTED while
    the transaction is still open; the abort decision must still go through, or every later
    update and every restart would stop on it."""
    c = make_cluster(2)
    v1 = c.make_version()
    c.rollout(v1)
    driver = Driver(c)
    v2 = c.make_version()
    c.signal_rank(1, signal.SIGSTOP)
    try:
        driver.send(f"rollout {v2}")
        txn = wait_txn(c, v2, _prepared(0))
        driver.kill()
    finally:
        c.signal_rank(1, signal.SIGCONT)
    c.versions.transition(v2, S.ABORTED, reason="the pipeline failed mid-rollout")

    restarted = Driver(c)  # recovery settles the open transaction instead of failing on it
    assert restarted.started["recovery"]["transactions"] == [
        {"txn": txn["id"], "version": v2, "state": "PREPARING"}]  # fmt: skip
    assert c.coordinator.ledger.txn(txn["id"]).state.value == "ABORTED"
    state = c.wait_ready(v1)
    assert all(r["staged_version"] is None for r in state["ranks"])
    v3 = c.make_version()
    assert restarted.call(f"rollout {v3}")["ok"]
    c.wait_ready(v3)
    restarted.stop()


def test_versions_caught_mid_pipeline_are_aborted_on_restart(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2, start=False)
    received = c.versions.create(label="r")
    quantized = c.versions.create(label="q")
    c.versions.transition(quantized, S.QUANTIZED)
    verified = c.make_version()
    rejected = c.versions.create(label="x")
    c.versions.transition(rejected, S.REJECTED, reason="verification failed")
    core = Refitd(c.settings)
    core.start()
    try:
        assert core.recovery is not None
        assert sorted(core.recovery.aborted_versions) == [received, quantized, verified]
        for v in (received, quantized, verified):
            record = c.versions.get(v)
            assert (record.status, record.reason) == (S.ABORTED, RESTART_REASON)
        assert c.versions.get(rejected).reason == "verification failed"
        # Their artifacts are of no use to any rollback.
        assert core.recovery.pruned == [verified] and not c.artifacts.exists(verified)
        # The forced lock was given back.
        assert c.client.get(c.keys.update_lock) is None
    finally:
        core.stop()


def test_a_start_removes_the_shared_buffers_of_dead_processes_only(
    make_cluster,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = make_cluster(1, start=False)
    gone = subprocess.Popen(["true"])  # its pid no longer runs once reaped
    gone.wait()
    stale = SHM_DIR / f"{SHM_PREFIX}{gone.pid}-killed.buf"
    live = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-mine.buf"
    stale.write_bytes(b"x" * 16)
    live.write_bytes(b"x" * 16)
    caplog.set_level(logging.INFO, logger="refitd")
    core = Refitd(c.settings)
    try:
        core.start()
        assert not stale.exists() and live.exists()
        assert "shared-memory buffers that dead processes left in /dev/shm" in caplog.text
    finally:
        core.stop()
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_readiness_says_why_the_cluster_is_not_ready(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2, rollout={"prepare_deadline_s": 1.0, "commit_deadline_s": 1.0})
    core = Refitd(c.settings)  # an observer daemon: readiness reads the shared state
    core.start()
    try:
        assert core.readiness().reason == "no version has been committed yet"
        v1 = c.make_version()
        c.rollout(v1)
        assert core.readiness().ready, core.readiness().reason

        c.signal_rank(1, signal.SIGSTOP)
        try:
            reason = wait_until(lambda: not core.readiness().ready and core.readiness().reason)
            assert reason.startswith("rank 1 is not alive (no heartbeat for")
        finally:
            c.signal_rank(1, signal.SIGCONT)
        wait_until(lambda: core.readiness().ready)

        # A daemon that dies mid-prepare leaves an open transaction: stuck after its deadlines.
        driver = Driver(c)
        v2 = c.make_version()
        c.signal_rank(1, signal.SIGSTOP)
        try:
            driver.send(f"rollout {v2}")
            wait_txn(c, v2, _prepared(0))
            driver.kill()
        finally:
            c.signal_rank(1, signal.SIGCONT)
        reason = wait_until(lambda: "has been PREPARING" in core.readiness().reason and
                            core.readiness().reason, timeout_s=10)  # fmt: skip
        assert reason.startswith("transaction v2-")
        Driver(c).stop()  # a restarted daemon settles it
        wait_until(lambda: core.readiness().ready)
        assert core.readiness().reason == f"version {v1} is active on every rank"
    finally:
        core.stop()


@pytest.mark.slow
def test_serve_keeps_one_agent_per_rank_and_they_stop_and_die_with_it(
    start_daemon, start_redis, clean_env
) -> None:
    server = start_redis()
    env = {
        "REFITD_DEV_MODE": "true", "REFITD_REDIS__URL": server.url,
        "REFITD_RANKS__LAUNCH": "local", "REFITD_RANKS__TP_SIZE": "2",
        "REFITD_RANKS__DEVICE": "cpu", "REFITD_RANKS__HEARTBEAT_INTERVAL_S": "0.1",
        "REFITD_RANKS__RESTART_BACKOFF_S": "0.1",
    }  # fmt: skip
    client = server.client()

    def pids() -> dict[int, int] | None:
        hashes = [client.hgetall(f"refitd:rank:{r}") for r in (0, 1)]
        if all(h.get("state") == "READY" and process_alive(int(h["pid"])) for h in hashes):
            return {r: int(h["pid"]) for r, h in enumerate(hashes)}
        return None

    daemon = start_daemon(env)
    first = wait_until(pids, timeout_s=30)
    ready = httpx.get(f"{daemon.url}/readyz")
    assert ready.status_code == 503 and "no version" in ready.json()["reason"]

    os.kill(first[1], signal.SIGKILL)
    second = wait_until(lambda: (p := pids()) and p[1] != first[1] and p, timeout_s=30)
    assert second[0] == first[0]
    assert "rank 1 agent exited with code -9; restarting" in daemon.log()
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert 'refitd_rank_agent_restarts_total{rank="1"} 1.0' in metrics
    assert 'refitd_rank_agent_restarts_total{rank="0"}' not in metrics

    assert daemon.stop() == 0
    assert not any(process_alive(p) for p in second.values())
    assert all(client.hget(f"refitd:rank:{r}", "state") == "STOPPED" for r in (0, 1))

    # SIGKILLed, the daemon cannot stop its agents: they die with it (PR_SET_PDEATHSIG).
    daemon = start_daemon(env, data_dir=daemon.data_dir)
    third = wait_until(lambda: (p := pids()) and set(p.values()).isdisjoint(second.values()) and p,
                       timeout_s=30)  # fmt: skip
    daemon.kill()
    wait_until(lambda: not any(process_alive(p) for p in third.values()), timeout_s=60)


def test_a_crash_looping_agent_is_restarted_ever_more_slowly(
    tmp_path, clean_env, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "refitd.yaml"
    config.write_text(
        f"dev_mode: true\ndata_dir: {tmp_path / 'data'}\n"
        f"redis: {{url: 'redis://127.0.0.1:{refused_port()}/0', start_timeout_s: 0.2}}\n"
        "ranks: {tp_size: 1, launch: external, restart_backoff_s: 0.1}\n"
    )
    settings = load_settings(config)
    restarted: list[int] = []

    def on_restart(rank: int) -> None:
        restarted.append(rank)
        if len(restarted) == 1:  # a broken hook must not stop the restarts
            raise RuntimeError("the metrics backend is gone")

    supervisor = Supervisor(settings, redis_url=settings.redis.url, log_dir=tmp_path / "logs",
                            on_restart=on_restart)  # fmt: skip
    caplog.set_level(logging.INFO, logger="refitd.supervisor")
    supervisor.start()
    try:
        wait_until(lambda: len(restarted) >= 3, timeout_s=30)
    finally:
        supervisor.stop()
    delays = [float(d) for d in re.findall(r"restarting in ([\d.]+)s", caplog.text)]
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert "does not answer" in (tmp_path / "logs" / "rank0.log").read_text()
    assert "the on_restart hook failed for rank 0" in caplog.text
    started = [int(p) for p in re.findall(r"rank 0 agent started \(pid (\d+)\)", caplog.text)]
    assert len(started) >= 4 and not any(process_alive(p) for p in started)
