"""Rank agents as real processes: start-up, shard fetching (path and HTTP), digests, epochs."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request

from api.errors import install_error_handlers
from api.routers import artifacts as artifacts_router
from orchestrator.data.flat import pack
from orchestrator.errors import ConfigError, RolloutAborted
from orchestrator.rollout.adapters import InMemoryAdapter, resolve_device
from orchestrator.rollout.rank_agent import RankAgent
from orchestrator.rollout.receive import artifact_base_url
from orchestrator.rollout.slots import Held, ShardSlots
from orchestrator.service.daemon import Refitd
from orchestrator.settings import load_settings
from orchestrator.state.versions import VersionStatus
from tests.conftest import wait_until
from tests.orchestrator._cluster import Cluster, make_cluster, random_shards  # noqa: F401

TRAINER = "trainer-token-0123456789"
ADMIN = "admin-token-0123456789ab"


# --- A rank's memory and the built-in adapter ------------------------------------------------
def _held(version: int, seed: int) -> Held:
    shard = pack(random_shards(1, seed=seed)[0], device="cpu")
    return Held(version=version, shard=shard, digest=shard.digest())


def test_slots_keep_the_previous_version_resident_and_a_rollback_swaps_without_a_copy() -> None:
    slots = ShardSlots(keep_previous=True)
    v1, v2, v3 = _held(1, 1), _held(2, 2), _held(3, 3)
    slots.stage(v1)
    assert slots.commit() is v1 and slots.previous is None
    slots.stage(v2)
    assert slots.active is v1  # staging leaves the active shard alone
    slots.commit()
    assert (slots.active, slots.previous) == (v2, v1)
    # Rolling back to the resident previous version: the same objects swap places.
    assert slots.stage_previous(2) is None and slots.stage_previous(1) is v1
    slots.commit()
    assert (slots.active, slots.previous) == (v1, v2)
    # A new version pushes the oldest out; its buffer becomes the next staging buffer.
    slots.stage(v3)
    slots.commit()
    assert (slots.active, slots.previous) == (v3, v1)
    spare = slots.buffer_for(v2.shard.buffer.numel(), "cpu")
    assert spare is not None and spare.data_ptr() == v2.shard.buffer.data_ptr()
    assert slots.buffer_for(v2.shard.buffer.numel() + 1, "cpu") is None


def test_without_keep_previous_a_rank_holds_one_version_and_discard_keeps_the_active() -> None:
    slots = ShardSlots(keep_previous=False)
    v1, v2 = _held(1, 1), _held(2, 2)
    slots.stage(v1)
    slots.commit()
    slots.stage(v2)
    slots.discard()
    assert slots.staged is None and slots.active is v1
    slots.stage(v2)
    slots.commit()
    assert (slots.active, slots.previous) == (v2, None)
    assert slots.stage_previous(1) is None
    with pytest.raises(RuntimeError, match="nothing is staged"):
        slots.commit()


def test_the_in_memory_adapter_serves_the_agents_own_buffers() -> None:
    adapter = InMemoryAdapter()
    held = _held(4, 4)
    assert adapter.served_version is None and adapter.held() == {}
    adapter.apply(4, held.shard.views())
    assert adapter.served_version == 4
    for name, tensor in adapter.held().items():
        # Zero-copy: the served tensor is a view into the staged buffer.
        assert tensor.untyped_storage().data_ptr() == held.shard.buffer.untyped_storage().data_ptr()
        assert name in held.shard.views()


def test_devices_follow_the_setting() -> None:
    assert resolve_device("cpu", 3) == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto", 0).startswith("cuda:")
    else:
        assert resolve_device("auto", 3) == "cpu"
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda", 0)
    with pytest.raises(ConfigError):
        resolve_device("tpu", 0)


def test_an_agent_needs_the_daemons_redis_url(tmp_path, clean_env) -> None:
    config = tmp_path / "r.yaml"
    config.write_text("dev_mode: true\n")
    settings = load_settings(config)
    with pytest.raises(ConfigError, match="REFITD_REDIS__URL"):
        RankAgent(settings, 0)
    assert artifact_base_url(settings) == "http://127.0.0.1:8470"
    wide = load_settings(config, dev_mode=False, server={"host": "0.0.0.0", "port": 9000},
                         auth={"trainer_token": TRAINER, "admin_token": ADMIN})  # fmt: skip
    assert artifact_base_url(wide) == "http://127.0.0.1:9000"
    remote = load_settings(config, ranks={"artifact_url": "http://trainer-node:8470/"})
    assert artifact_base_url(remote) == "http://trainer-node:8470"


# --- Agents as processes --------------------------------------------------------------------
def test_a_restarted_rank_loads_the_active_version_before_it_is_ready(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2)
    v1 = c.make_version()
    c.rollout(v1)
    old_pid = c.pid(1)
    old_instance = c.rank_hash(1)["instance"]
    c.signal_rank(1, signal.SIGKILL)

    def restarted() -> dict[str, str] | None:
        h = c.rank_hash(1)
        return h if h["instance"] != old_instance and h["state"] == "READY" else None

    hash_ = wait_until(restarted, timeout_s=30)
    assert c.pid(1) != old_pid
    assert hash_["version"] == str(v1) and hash_["digest"] == c.digest(v1, 1)
    new_events = c.events(kind="rank", rank="1", instance=hash_["instance"])
    assert [e["to"] for e in new_events] == ["STARTING", "LOADED"]
    assert new_events[1]["version"] == str(v1)
    # The restart shows nowhere but in the rank's incarnation: the next rollout works.
    v2 = c.make_version()
    assert c.rollout(v2)["pending_ranks"] == []
    c.wait_ready(v2)
    assert c.restarted == [1]


def test_a_corrupt_shard_fails_prepare_and_the_abort_names_the_rank(make_cluster) -> None:  # noqa: F811
    c = make_cluster(4)
    v1 = c.make_version()
    c.rollout(v1)
    v2 = c.make_version()
    path = c.artifacts.path(v2, 2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte in the tensor data
    path.write_bytes(bytes(data))

    with pytest.raises(RolloutAborted, match=r"rank 2 failed to prepare: .*has digest"):
        c.rollout(v2)
    version = c.versions.get(v2)
    assert version.status == VersionStatus.ABORTED and "rank 2" in (version.reason or "")
    ranks = {r["rank"]: r for r in c.coordinator.ledger.version_ranks(v2)}
    assert ranks[2]["state"] == "FAILED" and "the version's" in ranks[2]["reason"]
    state = c.wait_ready(v1)  # every rank holds v1 and nothing staged
    assert all(h["staged_version"] is None for h in state["ranks"])
    assert state["active_version"] == v1
    # The aborted version's files go at the next commit's pruning.
    v3 = c.make_version()
    c.rollout(v3)
    assert not c.artifacts.exists(v2)


def test_a_stale_commit_is_refused_and_a_repeated_one_is_acked_again(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2)
    v1, v2 = c.make_version(), c.make_version()
    first = c.rollout(v1)
    second = c.rollout(v2)
    commands = c.keys.rank_commands

    def refusals() -> list[dict[str, str]]:
        return c.events(kind="rank", to="REFUSED")

    # A coordinator that slept through v2's decision re-sends v1's COMMIT.
    c.client.xadd(commands, {"type": "COMMIT", "txn": first["txn"], "version": v1,
                             "epoch": first["epoch"]})  # fmt: skip
    refused = wait_until(lambda: len(refusals()) == 2 and refusals())
    assert {e["rank"] for e in refused} == {"0", "1"}
    assert all(f"COMMIT carries epoch {first['epoch']}" in e["reason"] for e in refused)
    assert all(e["txn"] == first["txn"] for e in refused)
    # A stale PREPARE for a decided transaction is refused before any work.
    shards = json.dumps([{"path": "/nonexistent", "bytes": 1, "digest": "0"}] * 2)
    c.client.xadd(commands, {"type": "PREPARE", "txn": first["txn"], "version": v1, "epoch": 0,
                             "shards": shards})  # fmt: skip
    refused = wait_until(lambda: len(refusals()) == 4 and refusals())
    assert all("PREPARE carries epoch 0" in e["reason"] for e in refused[2:])
    # v2's own COMMIT again: idempotent, accepted, nothing refused. Each rank reads the command
    # stream in order, so once both have refused the stale PREPARE sent after it (a marker),
    # both have handled the repeated COMMIT: its absence of effects is then a fact, not a race.
    acks_before = c.client.xlen(c.keys.txn_acks(second["txn"]))
    c.client.xadd(commands, {"type": "COMMIT", "txn": second["txn"], "version": v2,
                             "epoch": second["epoch"]})  # fmt: skip
    c.client.xadd(commands, {"type": "PREPARE", "txn": "marker", "version": v2, "epoch": 0,
                             "shards": shards})  # fmt: skip
    refused = wait_until(lambda: len(refusals()) >= 6 and refusals())
    assert [(e["txn"], "PREPARE carries epoch 0" in e["reason"]) for e in refused[4:]] == [
        ("marker", True), ("marker", True)]  # fmt: skip
    assert c.client.xlen(c.keys.txn_acks(second["txn"])) == acks_before
    state = c.wait_ready(v2)
    assert [r["epoch"] for r in state["ranks"]] == [second["epoch"]] * 2


@pytest.fixture
def http_daemon(make_cluster) -> Iterator[tuple[Cluster, list[str]]]:  # noqa: F811
    """A TP 2 cluster whose ranks fetch shards over HTTP from a real uvicorn serving the
    artifacts router (tokens required), and the paths it was asked for."""
    # The listening socket is bound here and handed to uvicorn: no port to race for.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    c = make_cluster(2, start=False, dev_mode=False, server={"port": port},
                     auth={"trainer_token": TRAINER, "admin_token": ADMIN},
                     ranks={"fetch": "http"})  # fmt: skip
    app = FastAPI()
    app.state.core = Refitd(c.settings)
    install_error_handlers(app)
    app.include_router(artifacts_router.router)
    requested: list[str] = []

    @app.middleware("http")
    async def _record(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        requested.append(f"{request.url.path} {response.status_code}")
        return response

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        c.start_ranks()
        yield c, requested
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_ranks_fetch_their_shards_over_http_with_a_token(http_daemon) -> None:
    c, requested = http_daemon
    for _ in range(2):
        v = c.make_version()
        assert c.rollout(v)["pending_ranks"] == []
        state = c.wait_ready(v)
        assert [r["digest"] for r in state["ranks"]] == [c.digest(v, r) for r in (0, 1)]
    assert sorted(requested) == sorted(f"/artifacts/{v}/{r} 200" for v in (1, 2) for r in (0, 1))
