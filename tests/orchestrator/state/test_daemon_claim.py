"""One daemon per Redis key prefix: a second one is refused with one line; a stopped or dead
one's claim does not keep its successor out."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.errors import AlreadyRunning
from orchestrator.state.daemon_claim import DaemonClaim
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from tests.conftest import DaemonProcess, RedisProcess, wait_until

DEV = {"REFITD_DEV_MODE": "true", "REFITD_RANKS__LAUNCH": "external"}
KEYS = Keys("refitd")


def test_a_second_daemon_on_the_same_redis_and_prefix_is_refused_with_one_line(
    start_daemon: Callable[..., DaemonProcess],
    start_redis: Callable[..., RedisProcess],
    tmp_path,
) -> None:
    server = start_redis()
    env = {**DEV, "REFITD_REDIS__URL": server.url}
    first = start_daemon(env, data_dir=tmp_path / "first")
    with server.client() as client:
        owner = client.get(KEYS.daemon)
        assert owner is not None and f":{first.proc.pid}:" in owner  # type: ignore[union-attr]
        events = client.xlen(KEYS.events)

        second = start_daemon(env, data_dir=tmp_path / "second", wait=False)
        assert second.proc is not None and second.proc.wait(120) == 2
        errors = [line for line in second.log().splitlines() if line.startswith("refitd: error")]
        assert errors == [
            f"refitd: error: another refitd daemon ({owner}) serves this Redis with key prefix "
            "'refitd'; stop it, or use another redis.key_prefix (a dead daemon's claim expires "
            "after 15s)"
        ]
        # The refused one touched nothing: the claim, the lock and the audit log are as they were.
        assert client.get(KEYS.daemon) == owner
        assert client.get(KEYS.update_lock) is None
        assert client.xlen(KEYS.events) == events

        # Another prefix on the same Redis is another deployment: allowed.
        other = start_daemon({**env, "REFITD_REDIS__KEY_PREFIX": "other"},
                             data_dir=tmp_path / "other")  # fmt: skip
        assert other.stop() == 0

        # A daemon that stops gives its claim back: the next one starts at once.
        assert first.stop() == 0
        assert client.get(KEYS.daemon) is None
        third = start_daemon(env, data_dir=tmp_path / "third")
        # One killed outright leaves its claim, but a successor on this host sees that its
        # process is gone and takes over without waiting for the TTL.
        third.kill()
        assert client.get(KEYS.daemon) is not None
        fourth = start_daemon(env, data_dir=tmp_path / "fourth")
        assert f":{fourth.proc.pid}:" in client.get(KEYS.daemon)  # type: ignore[union-attr,operator]
        assert "took over the daemon claim" in fourth.log()


def test_a_claim_held_elsewhere_keeps_others_out_until_it_expires(redis_url: str) -> None:
    with connect(redis_url) as client:
        client.set(KEYS.daemon, "another-host:4242:cafe", px=500)  # a daemon on another host
        claim = DaemonClaim(client, KEYS, ttl_s=1.5)
        with pytest.raises(AlreadyRunning, match=r"another refitd daemon \(another-host:4242"):
            claim.take()
        wait_until(lambda: client.get(KEYS.daemon) is None)  # it died: its claim runs out
        claim.take()
        try:
            # Kept alive past its TTL by renewals: count the PTTL going up twice.
            seen = {"ups": 0, "last": client.pttl(KEYS.daemon)}

            def renewed_twice() -> bool:
                now = client.pttl(KEYS.daemon)
                assert now > 0, "the claim expired while its daemon lives"
                seen["ups"] += now > seen["last"]
                seen["last"] = now
                return seen["ups"] >= 2

            wait_until(renewed_twice, timeout_s=30, step_s=0.02)
            assert client.get(KEYS.daemon) == claim.owner
        finally:
            claim.release()
        assert client.get(KEYS.daemon) is None
