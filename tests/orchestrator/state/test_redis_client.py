"""The Redis client's retry policy and outage logging, against real redis-servers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
import redis

from orchestrator.errors import RedisUnavailable
from orchestrator.state.redis_client import OutageLog, connect, keep_trying
from tests.conftest import RedisProcess, wait_until


def test_a_command_rides_out_a_redis_restart_and_without_retries_it_fails(
    start_redis: Callable[..., RedisProcess],
) -> None:
    server = start_redis()
    with connect(server.url, retries=20) as patient, connect(server.url, retries=0) as hasty:
        patient.set("k", "v")
        server.stop()
        with pytest.raises(redis.ConnectionError):
            hasty.get("k")
        # Restarted while the command backs off (20 retries span ~9 s): it gets its answer.
        restart = threading.Timer(0.2, server.start)
        restart.start()
        assert patient.get("k") == "v"
        restart.join()  # its own wait for the server ends before the fixture stops it


def test_connect_waits_for_a_server_that_comes_up_and_names_one_that_never_does(
    start_redis: Callable[..., RedisProcess], tmp_path
) -> None:
    server = start_redis()
    server.stop()
    restart = threading.Timer(0.3, server.start)
    restart.start()
    with connect(server.url, wait_s=30) as client:
        assert client.ping()
    restart.join()
    nowhere = tmp_path / "nothing-here.sock"
    with pytest.raises(RedisUnavailable, match="does not answer"):
        connect(f"unix://{nowhere}?db=0", wait_s=0.2)


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    start_redis: Callable[..., RedisProcess], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis()
    log = logging.getLogger("refitd.test-outage")
    caplog.set_level(logging.DEBUG, logger=log.name)
    outage = OutageLog(log, "the test loop")
    stop = threading.Event()
    with connect(server.url, retries=0) as client:
        server.kill()
        result: dict[str, object] = {}

        def loop() -> None:
            result["value"] = keep_trying(lambda: client.set("k", "back"), outage=outage,
                                          stop=stop)  # fmt: skip

        thread = threading.Thread(target=loop)
        thread.start()
        # Several failed attempts, so that "once" means something.
        wait_until(lambda: caplog.text.count("still does not answer") >= 2, timeout_s=30)
        server.start()
        thread.join(60)
        assert not thread.is_alive()
        assert result == {"value": True}
        assert client.get("k") == "back"
    loud = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
    assert [level for level, _ in loud] == ["WARNING", "INFO"], loud
    assert loud[0][1].startswith("the test loop: Redis does not answer (")
    assert loud[1][1].startswith("the test loop: Redis answers again after ")
    assert not outage.down


def test_keep_trying_gives_up_when_told_to_stop(tmp_path) -> None:
    outage = OutageLog(logging.getLogger("refitd.test-stop"), "stopping loop")
    stop = threading.Event()
    stop.set()

    def step() -> None:
        raise ConnectionRefusedError("nothing listens")

    with pytest.raises(ConnectionRefusedError):
        keep_trying(step, outage=outage, stop=stop)
    assert outage.down
