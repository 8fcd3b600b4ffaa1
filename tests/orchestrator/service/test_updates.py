from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.errors import Conflict, IdempotencyMismatch, NotFound, UpdateOutcomeUnknown
from orchestrator.service.updates import Stage, UpdateQueue, UpdateStatus
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from orchestrator.state.versions import VersionStatus, VersionStore

SRC = {"type": "path", "path": "/x"}


@pytest.fixture
def queue(redis_url: str) -> UpdateQueue:
    client = connect(redis_url)
    return UpdateQueue(client, Keys("q"), VersionStore(client, Keys("q")), queue_depth=50)


class _KillsRedisInsideTheTransaction(VersionStore):
    """A version store whose add_received (queued inside submit's transaction, before EXEC is
    sent) kills the real redis-server: the transaction's reply can never come."""

    def __init__(self, client, keys: Keys, server) -> None:
        super().__init__(client, keys)
        self.server = server

    def add_received(self, pipe, version, **kw) -> None:
        super().add_received(pipe, version, **kw)
        self.server.kill()


def test_a_submission_whose_reply_is_lost_names_its_update_and_is_not_recorded_twice(
    start_redis,
) -> None:
    server = start_redis()
    keys = Keys("q")
    client = connect(server.url)
    queue = UpdateQueue(client, keys, _KillsRedisInsideTheTransaction(client, keys, server),
                        queue_depth=50)  # fmt: skip
    with pytest.raises(UpdateOutcomeUnknown) as caught:
        _submit(queue)
    update_id = caught.value.extra["update_id"]
    assert caught.value.extra["version"] == 1
    assert caught.value.status_code == 503
    assert f"GET /weights/updates/{update_id}: a 404 means it was not recorded" in (
        caught.value.message)  # fmt: skip

    server.start()  # the same directory: what the AOF kept
    client = connect(server.url)
    again = UpdateQueue(client, keys, VersionStore(client, keys), queue_depth=50)
    with pytest.raises(NotFound):
        again.get(update_id)
    assert again.waiting() == 0
    record, created = _submit(again)  # the trainer sends it again: one update, queued once
    assert created and record.version == 2
    assert again.queued() == [record.update_id]


def _submit(queue: UpdateQueue, key: str | None = None, digest: str = "d1"):
    return queue.submit(source=SRC, label="step-1", verify=True, idempotency_key=key,
                        body_digest=digest)  # fmt: skip


def test_submit_records_version_update_and_queue(queue: UpdateQueue, redis_url: str) -> None:
    record, created = _submit(queue)
    assert created
    assert record.version == 1
    assert record.status is UpdateStatus.QUEUED
    assert record.stage is Stage.QUEUED
    assert record.progress == 0.0
    version = VersionStore(connect(redis_url), Keys("q")).get(1)
    assert version.status is VersionStatus.RECEIVED
    assert version.update_id == record.update_id
    assert version.label == "step-1"
    assert queue.waiting() == 1


def test_idempotency_key_replays_and_mismatches(queue: UpdateQueue) -> None:
    first, created = _submit(queue, key="k1")
    assert created
    for _ in range(20):
        again, created_again = _submit(queue, key="k1")
        assert not created_again
        assert again.update_id == first.update_id
        assert again.version == first.version
    assert queue.waiting() == 1
    with pytest.raises(IdempotencyMismatch, match="another request body"):
        _submit(queue, key="k1", digest="d2")
    assert queue.waiting() == 1


def test_concurrent_submissions_get_gapless_unique_versions(queue: UpdateQueue) -> None:
    with ThreadPoolExecutor(10) as pool:
        records = list(pool.map(lambda i: _submit(queue, digest=f"d{i}")[0], range(30)))
    assert sorted(r.version for r in records) == list(range(1, 31))
    assert len({r.update_id for r in records}) == 30


def test_queue_depth_refuses_with_409_and_no_version(redis_url: str) -> None:
    client = connect(redis_url)
    queue = UpdateQueue(client, Keys("d"), VersionStore(client, Keys("d")), queue_depth=2)
    for i in range(3):  # one to run now and two waiting
        _submit(queue, digest=f"d{i}")
    with pytest.raises(Conflict, match="queue_depth=2"):
        _submit(queue, digest="d9")
    assert connect(redis_url).get(Keys("d").version_counter) == "3"


def test_take_done_and_requeue(queue: UpdateQueue) -> None:
    a, _ = _submit(queue, digest="a")
    b, _ = _submit(queue, digest="b")
    assert queue.take(0.1) == a.update_id
    assert queue.running() == [a.update_id]
    queue.set_stage(a.update_id, Stage.QUANTIZING)
    state = queue.get(a.update_id)
    assert state.status is UpdateStatus.RUNNING
    assert state.stage is Stage.QUANTIZING
    assert 0 < state.progress < 1
    queue.requeue_front(a.update_id)
    assert queue.running() == []
    again = queue.get(a.update_id)
    assert (again.status, again.stage, again.started_at) == (
        UpdateStatus.QUEUED,
        Stage.QUEUED,
        None,
    )
    assert queue.take(0.1) == a.update_id
    queue.finish(a.update_id, ok=True, stage=Stage.COMMITTED, error=None)
    queue.done(a.update_id)
    assert queue.get(a.update_id).final
    assert queue.take(0.1) == b.update_id
    assert queue.take(0.1) is None


def test_unknown_update(queue: UpdateQueue) -> None:
    with pytest.raises(NotFound):
        queue.get("nope")


def test_a_running_update_past_its_limit_is_stuck(queue: UpdateQueue) -> None:
    a, _ = _submit(queue, digest="a")
    assert queue.stuck(0.0) is None  # queued, not running
    assert queue.take(0.1) == a.update_id
    assert queue.stuck(0.0) is None  # taken, no stage begun yet
    queue.set_stage(a.update_id, Stage.VERIFYING)
    started = queue.get(a.update_id).started_at
    assert started is not None
    assert queue.stuck(60.0, now=started + 59) is None
    stuck = queue.stuck(60.0, now=started + 61)
    assert stuck is not None
    assert stuck.update_id == a.update_id
    assert stuck.stage is Stage.VERIFYING
    queue.finish(a.update_id, ok=False, stage=Stage.REJECTED, error="x")
    assert queue.stuck(60.0, now=started + 61) is None  # final: not stuck, only not yet removed
