"""The embedded redis-server dies under a running `refitd serve`: the daemon restarts it on the
same socket (its AOF brings the state back), the rank agents and the daemon reconnect, and the
next push commits; a Redis that keeps dying makes `refitd serve` exit non-zero instead."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from orchestrator.rollout.lock import UpdateLock
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from orchestrator.state.redis_server import unix_socket_path, unix_url
from tests.api.conftest import TRAINER, Api, refitctl
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


def _is_redis(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline and "zombie" not in status


def _redis_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "redis" / "redis.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_redis(pid) else None


def _redis_url(data_dir: Path) -> str:
    redis_dir = data_dir / "redis"
    return unix_url(unix_socket_path(redis_dir), (redis_dir / "password").read_text().strip())


def _healthz(api: Api) -> httpx.Response:
    return httpx.get(f"{api.url}/healthz", timeout=30)


@pytest.fixture(scope="module")
def api(launch_api) -> Api:
    return launch_api("qwen2", tp_size=2)


def test_a_killed_embedded_redis_is_restarted_and_the_next_push_commits(api: Api) -> None:
    first = api.commit(label="before the kill")
    old_pid = _redis_pid(api.data_dir)
    assert old_pid is not None
    log_before = len(api.daemon.log().splitlines())

    os.kill(old_pid, signal.SIGKILL)

    # A new redis-server, on the same socket with the same password, holding what the AOF kept.
    new_pid = wait_until(lambda: (p := _redis_pid(api.data_dir)) not in (None, old_pid) and p,
                         timeout_s=60)  # fmt: skip
    wait_until(lambda: _healthz(api).status_code == 200, timeout_s=60)
    assert _healthz(api).json() == {"status": "ok"}
    assert api.versions()[first]["status"] == "COMMITTED"
    assert api.versions()[first]["label"] == "before the kill"
    wait_until(api.ranks_ready, timeout_s=60)

    second = api.commit(label="after the restart")
    assert second == first + 1
    active = api.active()
    assert active["active_version"] == second
    assert [r["version"] for r in active["ranks"]] == [second, second]
    assert _redis_pid(api.data_dir) == new_pid  # no second restart was needed

    # The outage is told once, and its end once; the rest of the components say little.
    after = api.daemon.log().splitlines()[log_before:]
    assert sum("restarting it from its AOF" in line for line in after) == 1, after
    assert sum("embedded redis-server is back" in line for line in after) == 1, after
    assert "was killed by SIGKILL" in next(line for line in after if "restarting it" in line)
    redis_lines = [line for line in after if "redis" in line.lower()]
    assert len(redis_lines) <= 20, redis_lines
    assert not any("Traceback" in line for line in after), after


def test_wait_true_rides_out_a_redis_outage_and_answers_the_final_state(api: Api) -> None:
    """The update is recorded and waits for the update lock (held by the test) when Redis stops
    answering (SIGSTOP: no restart, every call times out). The ?wait=true request must not
    answer 503 meanwhile: once Redis is back the update runs, and the answer is its outcome."""
    wait_until(api.ranks_ready, timeout_s=60)
    before = set(api.versions())
    keys = Keys()
    answers: list[httpx.Response] = []
    with connect(_redis_url(api.data_dir)) as client:
        held = UpdateLock(client, keys, ttl_s=300, owner="test-holds-the-pipeline")
        held.acquire()
        try:
            waiter = threading.Thread(
                target=lambda: answers.append(api.push(api.checkpoint(), wait=True))
            )
            waiter.start()
            wait_until(lambda: client.llen(keys.update_running) == 1, timeout_s=60)
            pid = _redis_pid(api.data_dir)
            assert pid is not None
            mark = len(api.daemon.log().splitlines())
            os.kill(pid, signal.SIGSTOP)
            try:
                # The daemon says that following the update met the outage: from here on, the
                # old code had answered 503.
                wait_until(lambda: any("?wait=true on update" in line and "Redis does not answer"
                                       in line for line in api.daemon.log().splitlines()[mark:]),
                           timeout_s=60)  # fmt: skip
                assert waiter.is_alive() and not answers
                # Meanwhile the daemon cannot work, and says so to a probe and to an operator.
                health = _healthz(api)
                assert health.status_code == 503, health.text
                assert health.json()["status"] == "unavailable"
                assert "does not answer" in health.json()["reason"]
                ctl = refitctl("health", url=api.url, token=TRAINER)
                assert ctl.code == 1, (ctl.stdout, ctl.stderr)
                assert ctl.stdout.startswith("live: no (redis at unix://:***@"), ctl.stdout
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_until(api.ranks_ready, timeout_s=60)
        finally:
            held.release()
        waiter.join(timeout=180)
    assert not waiter.is_alive()
    [answer] = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["stage"] == "committed"
    new = set(api.versions()) - before
    assert new == {answer.json()["version"]}
    assert api.active()["active_version"] == answer.json()["version"]
    after = api.daemon.log().splitlines()[mark:]
    assert sum("Redis answers again" in line and "?wait=true" in line for line in after) == 1


def test_stopping_serve_stops_the_redis_its_watchdog_restarted(api: Api) -> None:
    """A restarted redis-server is the watchdog thread's child: it must not outlive serve."""
    old_pid = _redis_pid(api.data_dir)
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    new_pid = wait_until(lambda: (p := _redis_pid(api.data_dir)) not in (None, old_pid) and p,
                         timeout_s=60)  # fmt: skip
    wait_until(lambda: _healthz(api).status_code == 200, timeout_s=60)
    mark = len(api.daemon.log().splitlines())
    assert api.daemon.stop() == 0
    assert not _is_redis(new_pid), "the restarted redis-server outlived serve"
    assert any("embedded redis-server stopped" in line
               for line in api.daemon.log().splitlines()[mark:])  # fmt: skip


def test_a_redis_that_keeps_dying_makes_serve_exit_non_zero(launch_api) -> None:
    """redis.max_restarts=0: the first death is one too many. Redis exits by itself here
    (SHUTDOWN), as it does on a fatal error of its own."""
    api = launch_api("qwen2", tp_size=1, launch="external",
                     env={"REFITD_REDIS__MAX_RESTARTS": "0"})  # fmt: skip
    assert _healthz(api).status_code == 200
    with connect(_redis_url(api.data_dir), retries=0) as client:
        client.shutdown(nosave=True)  # redis-py returns once the connection drops
    proc = api.daemon.proc
    assert proc is not None
    wait_until(lambda: proc.poll() is not None, timeout_s=60)
    assert proc.returncode == 1
    last = api.daemon.log().strip().splitlines()[-1]
    assert last.startswith("refitd: error: embedded redis-server exited with code 0, after 0 "
                           "restarts in 60s; giving up"), last  # fmt: skip
    assert _redis_pid(api.data_dir) is None
