"""The update lock and its fencing numbers, against a real Redis."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from orchestrator.errors import LockHeld
from orchestrator.rollout.lock import UpdateLock
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from tests.conftest import wait_until

KEYS = Keys("t")


@pytest.fixture
def client(redis_url: str):
    with connect(redis_url) as c:
        yield c


def _lock(client, **kw) -> UpdateLock:
    return UpdateLock(client, KEYS, ttl_s=kw.pop("ttl_s", 5.0), **kw)


def test_fence_rises_with_every_holder_and_is_stored_with_the_owner(client) -> None:
    first = _lock(client, owner="a")
    f1 = first.acquire()
    assert client.get(KEYS.update_lock) == f"{f1}:a"
    assert 0 < client.pttl(KEYS.update_lock) <= 5000
    assert first.release()
    assert client.get(KEYS.update_lock) is None
    with _lock(client, owner="b") as second:
        assert second.fence is not None and second.fence > f1
    events = [f for _, f in client.xrange(KEYS.events) if f["kind"] == "lock"]
    assert [(e["to"], e["owner"].split(":")[-1]) for e in events] == [
        ("held", "a"), ("free", "a"), ("held", "b"), ("free", "b")]  # fmt: skip


def test_a_busy_lock_raises_at_once_or_after_the_wait(client) -> None:
    holder = _lock(client, owner="holder")
    holder.acquire()
    with pytest.raises(LockHeld, match="held by .*:holder"):
        _lock(client).acquire()
    t0 = time.monotonic()
    with pytest.raises(LockHeld):
        _lock(client).acquire(timeout_s=0.3)
    # A lower bound only: the wait may run long on a busy machine, never short.
    assert time.monotonic() - t0 >= 0.3
    holder.release()


def test_blocking_acquire_gets_the_lock_once_it_is_released(redis_url: str, client) -> None:
    holder = _lock(client, owner="holder")
    first = holder.acquire()
    outcome: dict[str, object] = {}
    # The waiter has its own named connection, so CLIENT LIST shows when it has been refused.
    with redis.Redis.from_url(redis_url, decode_responses=True, client_name="waiter") as own:
        waiter = _lock(own, owner="waiter", timeout_s=60)

        def wait() -> None:
            try:
                outcome["fence"] = waiter.acquire()
            except LockHeld as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=wait)
        thread.start()

        def refused_once() -> bool:
            return any(
                c["name"] == "waiter" and c["cmd"] == "evalsha" for c in client.client_list()
            )

        wait_until(refused_once)
        assert "fence" not in outcome and client.get(KEYS.update_lock) == holder.value
        holder.release()
        thread.join(60)
        assert outcome == {"fence": first + 1}
        events = [(f["to"], f["owner"]) for _, f in client.xrange(KEYS.events)]
        assert [(to, owner.split(":")[-1]) for to, owner in events] == [
            ("held", "holder"), ("free", "holder"), ("held", "waiter")]  # fmt: skip
        waiter.release()


def _extensions(client, n: int) -> None:
    """Until the lock's PTTL has gone up `n` times: only an extension raises it."""
    seen = {"count": 0, "last": client.pttl(KEYS.update_lock)}

    def extended() -> bool:
        now = client.pttl(KEYS.update_lock)
        assert now > 0, "the lock expired while held"
        if now > seen["last"]:
            seen["count"] += 1
        seen["last"] = now
        return seen["count"] >= n

    wait_until(extended, timeout_s=30, step_s=0.02)


def test_the_lock_is_extended_while_held(client) -> None:
    # A TTL of seconds: the keeper extends every third of it, so only a stall of two thirds
    # (2 s) of the keeper thread could lose it; the test counts extensions, not time.
    lock = _lock(client, ttl_s=3.0)
    lock.acquire()
    _extensions(client, 2)
    assert client.get(KEYS.update_lock) == lock.value
    assert lock.release()


def test_an_expired_holder_cannot_release_or_extend_the_next_holders_lock(client) -> None:
    stale = _lock(client, ttl_s=0.2)
    stale.acquire()
    stale._stop.set()  # a stalled holder: its keeper stops extending
    stale._keeper.join()
    wait_until(lambda: client.get(KEYS.update_lock) is None)  # its TTL ran out
    fresh = _lock(client)
    fence = fresh.acquire()
    assert fence > stale.fence
    with pytest.raises(LockHeld, match="no longer"):
        stale.extend()
    assert not stale.release()
    assert client.get(KEYS.update_lock) == fresh.value
    fresh.release()


def test_steal_takes_a_live_lock_with_a_higher_fence(client) -> None:
    old = _lock(client, owner="crashed-daemon", ttl_s=60)
    old_fence = old.acquire()
    new = _lock(client, owner="restarted-daemon")
    assert new.acquire(steal=True) > old_fence
    assert client.get(KEYS.update_lock) == new.value
    assert not old.release()
    stolen = [f for _, f in client.xrange(KEYS.events) if f.get("reason", "").startswith("taken")]
    assert stolen and "crashed-daemon" in stolen[0]["reason"]
    new.release()
