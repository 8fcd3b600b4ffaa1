"""The heartbeat process: nothing the agent's own process does can starve it, and it dies with
the agent (a real redis-server and real processes)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from orchestrator.rollout.heartbeat import Heartbeat
from orchestrator.settings import REPO_ROOT
from tests.conftest import process_alive, wait_until

KEY = "refitd:rank:0:alive"
TTL_S = 0.5


def _expired(client) -> int:  # type: ignore[no-untyped-def]
    return int(client.info("stats")["expired_keys"])


def _hold_the_gil_for(seconds: float) -> float:
    """Hold the GIL without a break for at least `seconds` (a regex backtracking in C, as a C
    extension parsing a multi-GB shard does); returns how long it really held it."""
    n = 18
    while True:
        pattern = re.compile(r"(a+)+$")
        subject = "a" * n + "b"
        t0 = time.perf_counter()
        pattern.match(subject)
        held = time.perf_counter() - t0
        if held >= seconds:
            return held
        n += 1


def test_a_heartbeat_survives_its_process_holding_the_gil_past_the_timeout(start_redis) -> None:
    server = start_redis()
    client = server.client()
    beat = Heartbeat(url=server.url, key=KEY, value="me", interval_s=0.05, ttl_s=TTL_S)
    beat.start()
    try:
        assert client.get(KEY) == "me"  # the first beat is in before start() returns
        expired = _expired(client)
        held = _hold_the_gil_for(4 * TTL_S)
        assert held >= 4 * TTL_S
        # A thread in this process could not have refreshed the key: it would have expired.
        assert _expired(client) == expired
        assert client.get(KEY) == "me"
    finally:
        beat.stop()
    assert not beat.alive()


def test_a_heartbeat_stops_while_its_process_is_paused_and_dies_with_it(start_redis) -> None:
    server = start_redis()
    client = server.client()
    script = textwrap.dedent(f"""
        import os, sys, time
        from orchestrator.rollout.heartbeat import Heartbeat
        beat = Heartbeat(url={server.url!r}, key={KEY!r}, value="child", interval_s=0.05,
                         ttl_s={TTL_S})
        beat.start()
        print(beat._proc.pid, flush=True)
        time.sleep(600)
    """)
    agent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert agent.stdout is not None
        beater = int(agent.stdout.readline())
        assert client.get(KEY) == "child"
        # A paused agent (SIGSTOP) looks dead: its key expires.
        os.kill(agent.pid, signal.SIGSTOP)
        wait_until(lambda: client.get(KEY) is None, timeout_s=30)
        os.kill(agent.pid, signal.SIGCONT)
        wait_until(lambda: client.get(KEY) == "child", timeout_s=30)
        # A killed agent takes its heartbeat process with it.
        agent.kill()
        agent.wait()
        wait_until(lambda: not process_alive(beater), timeout_s=30)
        wait_until(lambda: client.get(KEY) is None, timeout_s=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0"])
def test_a_heartbeat_that_cannot_reach_redis_says_so_at_start(url: str) -> None:
    beat = Heartbeat(url=url, key=KEY, value="x", interval_s=0.05, ttl_s=TTL_S)
    with pytest.raises(RuntimeError, match="did not start"):
        beat.start()
    assert not beat.alive()
