"""Many requests at once against one real daemon (a tiny Llama at TP 2, two local rank agents,
limits.queue_depth 16): Idempotency-Key replays, and ten trainers posting at the same moment."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import httpx
import pytest

from tests.api.conftest import TRAINER, Api
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

TRAINERS = 10


@pytest.fixture(scope="module")
def api(launch_api) -> Api:
    # Ten updates may wait behind a running one; the default depth (4) would refuse some.
    return launch_api("llama", tp_size=2, env={"REFITD_LIMITS__QUEUE_DEPTH": "16"})


def _at_once(calls: list[Any]) -> list[httpx.Response]:
    """Run every call on its own thread, released together by a barrier."""
    barrier = threading.Barrier(len(calls))

    def _run(call: Any) -> httpx.Response:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(_run, calls))


def test_an_idempotency_key_replayed_20_times_gives_one_version(api: Api) -> None:
    before = api.versions()
    directory = api.checkpoint()
    key = {"Idempotency-Key": f"step-{uuid.uuid4().hex}"}
    answers = _at_once([lambda: api.push(directory, label="replayed", headers=key)] * 20)
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    firsts = {(a.json()["update_id"], a.json()["version"]) for a in answers}
    assert len(firsts) == 1, firsts
    ((update_id, version),) = firsts
    assert set(api.versions()) - set(before) == {version}

    final = api.follow(update_id)[-1]
    assert (final["status"], final["stage"]) == ("succeeded", "committed")
    # Replayed after the update ended: still the first answer, nothing new.
    again = api.push(directory, label="replayed", headers=key)
    assert (again.status_code, again.json()["update_id"]) == (202, update_id)

    # The same key with another body: 422, and no version is allocated.
    snapshot = api.snapshot()
    for other in ({"label": "another-label"}, {"label": "replayed", "verify": False}):
        response = api.push(directory, headers=key, **other)
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == (
            f"Idempotency-Key {key['Idempotency-Key']!r} was already used with another request "
            "body; use a new key for a new update")  # fmt: skip
    response = api.push(api.checkpoint(), label="replayed", headers=key)
    assert response.status_code == 422, response.text
    assert api.snapshot() == snapshot


def test_an_idempotent_upload_replayed_gives_one_version(api: Api) -> None:
    before = api.versions()
    data = api.bytes_of()
    key = {"Idempotency-Key": f"upload-{uuid.uuid4().hex}"}
    answers = _at_once([lambda: api.upload(data, params={"label": "up"}, headers=key)] * 5)
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["update_id"] for a in answers}) == 1
    accepted = answers[0].json()
    assert set(api.versions()) - set(before) == {accepted["version"]}
    final = api.follow(accepted["update_id"])[-1]
    assert (final["status"], final["stage"]) == ("succeeded", "committed")
    # The committed upload's bytes go once its artifact is durable (written after the commit).
    wait_until(lambda: api.snapshot()["uploads"] == [], 60)

    snapshot = api.snapshot()
    other = api.upload(api.bytes_of(), params={"label": "up"}, headers=key)
    assert other.status_code == 422, other.text
    assert "was already used with another request body" in other.json()["detail"]
    # Neither the replays' bytes nor the refused upload's were kept.
    assert snapshot["uploads"] == [] and api.snapshot() == snapshot


def test_ten_trainers_at_once_get_gapless_versions_run_one_at_a_time(api: Api) -> None:
    latest = max(api.versions(), default=0)
    directories = [api.checkpoint() for _ in range(TRAINERS)]
    calls = [
        (lambda d=d, i=i: api.push(d, label=f"trainer-{i}", token=TRAINER))
        for i, d in enumerate(directories)
    ]
    answers = _at_once(calls)
    assert [a.status_code for a in answers] == [202] * TRAINERS, [a.text for a in answers]
    accepted = [a.json() for a in answers]
    versions = sorted(a["version"] for a in accepted)
    assert versions == list(range(latest + 1, latest + 1 + TRAINERS)), versions

    finals = [api.follow(a["update_id"])[-1] for a in accepted]
    # Nothing lost or mixed up: every update ended committed, under its own label and version.
    for i, (a, final) in enumerate(zip(accepted, finals, strict=True)):
        assert (final["status"], final["stage"], final["error"]) == ("succeeded", "committed", None)
        assert (final["version"], final["label"]) == (a["version"], f"trainer-{i}")
    listed = api.versions()
    assert {listed[a["version"]]["label"] for a in accepted} == {
        f"trainer-{i}" for i in range(TRAINERS)}  # fmt: skip

    # One pipeline at a time, in the order the versions were handed out.
    runs = sorted(finals, key=lambda f: f["started_at"])
    assert [f["version"] for f in runs] == versions
    for earlier, later in pairwise(runs):
        assert earlier["started_at"] < earlier["finished_at"] <= later["started_at"], (
            earlier, later)  # fmt: skip
    # Versions committed in that order too; the last one is active on every rank.
    committed_at = [api.get(f"/weights/versions/{v}")["times"]["committed"] for v in versions]
    assert committed_at == sorted(committed_at)
    assert [listed[v]["status"] for v in versions] == ["SUPERSEDED"] * (TRAINERS - 1) + [
        "COMMITTED"]  # fmt: skip
    active = api.active()
    assert active["active_version"] == versions[-1]
    assert [(r["version"], r["alive"]) for r in active["ranks"]] == [(versions[-1], True)] * 2
    assert api.metrics()["refitd_updates_queued"] == 0
