from __future__ import annotations

import pytest

from orchestrator.errors import NotFound, StaleTransition
from orchestrator.state.keys import Keys
from orchestrator.state.lua import ScriptRegistry
from orchestrator.state.redis_client import connect
from orchestrator.state.versions import TRANSITION, VersionStatus, VersionStore

S = VersionStatus


@pytest.fixture
def store(redis_url: str) -> VersionStore:
    return VersionStore(connect(redis_url), Keys("t"))


def test_versions_are_strictly_increasing(store: VersionStore) -> None:
    numbers = [store.create(label=f"step-{i}") for i in range(5)]
    assert numbers == [1, 2, 3, 4, 5]
    assert [r.version for r in store.list()] == [5, 4, 3, 2, 1]
    assert store.get(3).label == "step-2"
    assert store.get(3).status is S.RECEIVED


def test_lifecycle_transitions_and_audit(store: VersionStore, redis_url: str) -> None:
    v = store.create(label=None)
    for to in (S.QUANTIZED, S.VERIFIED, S.PREPARED, S.COMMITTED, S.SUPERSEDED, S.COMMITTED):
        store.transition(v, to)
    record = store.get(v)
    assert record.status is S.COMMITTED
    assert {"received", "quantized", "verified", "prepared", "committed", "superseded"} <= set(
        record.times
    )
    events = connect(redis_url).xrange(Keys("t").events)
    assert [e[1]["to"] for e in events] == [
        "RECEIVED", "QUANTIZED", "VERIFIED", "PREPARED", "COMMITTED", "SUPERSEDED", "COMMITTED",
    ]  # fmt: skip


def test_stale_transition_changes_nothing(store: VersionStore) -> None:
    v = store.create(label=None)
    with pytest.raises(StaleTransition, match="is RECEIVED"):
        store.transition(v, S.COMMITTED)
    assert store.get(v).status is S.RECEIVED
    store.transition(v, S.REJECTED, reason="NaN in a.weight")
    assert store.get(v).reason == "NaN in a.weight"
    with pytest.raises(StaleTransition):
        store.transition(v, S.QUANTIZED)


def test_unknown_version(store: VersionStore) -> None:
    with pytest.raises(NotFound):
        store.transition(42, S.QUANTIZED)
    with pytest.raises(NotFound):
        store.get(42)
    with pytest.raises(NotFound):
        store.set_fields(42, verification={})


def test_transition_script_reports_codes_directly(redis_url: str) -> None:
    """The script itself, called raw: only the keys it is given are touched."""
    client = connect(redis_url)
    keys = Keys("raw")
    script = ScriptRegistry(client)[TRANSITION]
    with pytest.raises(NotFound):
        script([keys.version(1), keys.events], [1, "RECEIVED", "QUANTIZED", "1.0", "", 100])
    client.hset(keys.version(1), mapping={"status": "RECEIVED", "created_at": "1"})
    assert script([keys.version(1), keys.events], [1, "RECEIVED", "QUANTIZED", "2.0", "", 100]) == [
        "RECEIVED"
    ]
    assert sorted(client.keys("*")) == sorted([keys.version(1), keys.events])


def test_details_round_trip(store: VersionStore) -> None:
    v = store.create(label="x")
    store.set_fields(v, quantization=[{"name": "a", "scheme": "blockwise"}], verification={"kl": 1})
    record = store.get(v)
    assert record.quantization == [{"name": "a", "scheme": "blockwise"}]
    assert record.verification == {"kl": 1}
    assert record.to_dict()["status"] == "RECEIVED"
