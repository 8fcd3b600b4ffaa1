"""Which way each rank's shard travels, decided from what real rank hashes in a real Redis say."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from orchestrator.data.flat import pack
from orchestrator.data.ipc import open_handle
from orchestrator.errors import Conflict
from orchestrator.rollout.routes import Routes
from orchestrator.settings import load_settings
from orchestrator.state.artifacts import ArtifactStore, layout_record
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from orchestrator.state.versions import VersionStatus, VersionStore
from tests.orchestrator._cluster import random_shards

HERE = socket.gethostname()


@pytest.fixture
def world(tmp_path: Path, redis_url: str, clean_env: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def make(tp: int = 2, **ranks: object):  # type: ignore[no-untyped-def]
        config = tmp_path / "refitd.yaml"
        config.write_text("dev_mode: true\n")
        settings = load_settings(
            config, data_dir=tmp_path / "data", redis={"url": redis_url},
            ranks={"tp_size": tp, "launch": "external", **ranks},
        )  # fmt: skip
        client = connect(redis_url)
        keys = Keys(settings.redis.key_prefix)
        versions = VersionStore(client, keys)
        store = ArtifactStore(settings.resolved_data_dir())
        return settings, client, keys, versions, store, Routes(client, keys, settings, store)

    return make


def _version(versions: VersionStore, tp: int, seed: int):  # type: ignore[no-untyped-def]
    flats = [pack(s, device="cpu") for s in random_shards(tp, seed=seed)]
    v = versions.create(label=None)
    versions.set_fields(v, layout=layout_record(flats))
    versions.transition(v, VersionStatus.QUANTIZED)
    return v, flats


def _rank(client, keys: Keys, r: int, **fields: str) -> None:  # type: ignore[no-untyped-def]
    client.hset(keys.rank(r), mapping={"host": HERE, "device": "cpu", "previous_version": "",
                                       "previous_digest": "", **fields})  # fmt: skip


def test_ranks_on_this_host_get_the_daemons_buffer_through_shared_memory(world) -> None:
    _, client, keys, versions, _, routes = world()
    v, flats = _version(versions, 2, seed=1)
    for r in range(2):
        _rank(client, keys, r)
    with routes.plan(v, versions.get(v), flats) as plan:
        assert plan.routes == ["shm", "shm"]
        for entry, flat in zip(plan.entries, flats, strict=True):
            assert entry["digest"] == flat.digest()
            with open_handle(entry["handle"]) as mapped:
                assert torch.equal(mapped[: flat.buffer.numel()], flat.buffer)
        paths = [Path(e["handle"]["path"]) for e in plan.entries]
        assert all(p.exists() for p in paths)
    # Closing the plan (after the decision) unlinks the shared files.
    assert not any(p.exists() for p in paths)


def test_a_rank_holding_the_version_as_its_previous_one_gets_it_resident(world) -> None:
    _, client, keys, versions, _, routes = world()
    v, flats = _version(versions, 2, seed=2)
    _rank(client, keys, 0, previous_version=str(v), previous_digest=flats[0].digest())
    # Rank 1 claims the version under another digest: not trusted, it gets the bytes.
    _rank(client, keys, 1, previous_version=str(v), previous_digest="0" * 32)
    with routes.plan(v, versions.get(v), flats) as plan:
        assert plan.routes == ["resident", "shm"]


def test_other_hosts_read_the_artifact_which_must_then_be_durable(world) -> None:
    _, client, keys, versions, store, routes = world()
    v, flats = _version(versions, 2, seed=3)
    _rank(client, keys, 0)
    _rank(client, keys, 1, host="elsewhere")
    assert routes.needs_artifact() == [1]
    with pytest.raises(Conflict, match=r"rank 1 \(it runs on another host and cannot take the "
                       r"distributed route\) needs the artifact"):  # fmt: skip
        routes.plan(v, versions.get(v), flats)
    versions.set_fields(v, artifact=store.write_version(v, flats, metadata={}))
    with routes.plan(v, versions.get(v), flats) as plan:
        assert plan.routes == ["shm", "artifact"]
        assert plan.entries[1]["path"] == str(store.path(v, 1))


def test_other_hosts_that_advertise_a_distributed_address_get_their_shard_sent(world) -> None:
    _, client, keys, versions, _, routes = world(dist_host="127.0.0.1")
    v, flats = _version(versions, 2, seed=7)
    _rank(client, keys, 0)
    _rank(client, keys, 1, host="elsewhere", dist_host="127.0.0.1", instance="a1")
    # No artifact needed first: nobody reads it.
    assert routes.needs_artifact() == []
    with routes.plan(v, versions.get(v), flats) as plan:
        assert plan.routes == ["shm", "distributed"]
        entry = plan.entries[1]
        assert entry["backend"] == "gloo"  # CPU buffers
        assert entry["store"].startswith("127.0.0.1:")
        assert entry["bucket_bytes"] == 256 << 20
        assert [s.rank for s in plan.sends] == [1]
    # Never started, so never finished: the next plan forms a new group.
    with routes.plan(v, versions.get(v), flats) as again:
        assert again.entries[1]["group"] != entry["group"]


def test_transport_http_sends_everyone_to_the_artifact_and_ipc_refuses_other_hosts(world) -> None:
    _, client, keys, versions, store, routes = world(transport="http")
    v, flats = _version(versions, 2, seed=4)
    for r in range(2):
        _rank(client, keys, r)
    assert routes.needs_artifact() == [0, 1]
    versions.set_fields(v, artifact=store.write_version(v, flats, metadata={}))
    with routes.plan(v, versions.get(v), flats) as plan:
        assert plan.routes == ["artifact", "artifact"]

    _, client, keys, versions, _, routes = world(transport="ipc")
    v, flats = _version(versions, 2, seed=5)
    _rank(client, keys, 0)
    _rank(client, keys, 1, host="elsewhere")
    with pytest.raises(Conflict, match="ranks.transport is ipc, but rank 1 runs on elsewhere"):
        routes.plan(v, versions.get(v), flats)


def test_a_version_without_a_layout_for_this_tp_size_is_refused(world) -> None:
    *_, versions, _, routes = world(tp=4)
    v, _ = _version(versions, 2, seed=6)
    with pytest.raises(Conflict, match="2 ranks in its layout record, but ranks.tp_size is 4"):
        routes.plan(v, versions.get(v), None)
