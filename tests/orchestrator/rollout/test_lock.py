"""The update lock and its fencing numbers, against a real Redis."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.errors import LockHeld
from orchestrator.rollout.lock import UpdateLock
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect

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
    t0 = time.monotonic()
    with pytest.raises(LockHeld, match="held by .*:holder"):
        _lock(client).acquire()
    with pytest.raises(LockHeld):
        _lock(client).acquire(timeout_s=0.3)
    assert time.monotonic() - t0 >= 0.3
    holder.release()


def test_blocking_acquire_gets_the_lock_once_it_is_released(client) -> None:
    holder = _lock(client)
    first = holder.acquire()
    threading.Timer(0.3, holder.release).start()
    waiter = _lock(client, timeout_s=5)
    t0 = time.monotonic()
    with waiter:
        assert 0.2 < time.monotonic() - t0 < 3
        assert waiter.fence == first + 1


def test_the_lock_is_extended_while_held(client) -> None:
    lock = _lock(client, ttl_s=0.6)
    lock.acquire()
    time.sleep(1.5)  # past two TTLs: only the keeper thread keeps it
    assert client.get(KEYS.update_lock) == lock.value
    assert not lock.lost
    assert lock.release()


def test_an_expired_holder_cannot_release_or_extend_the_next_holders_lock(client) -> None:
    stale = _lock(client, ttl_s=0.2)
    stale.acquire()
    stale._stop.set()  # simulate a stalled holder: its keeper stops extending
    stale._keeper.join()
    time.sleep(0.3)
    fresh = _lock(client)
    fence = fresh.acquire()
    assert fence > stale.fence
    with pytest.raises(LockHeld, match="no longer"):
        stale.extend()
    assert stale.lost
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
