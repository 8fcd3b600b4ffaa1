"""The data path between the daemon and real rank agents on this host: buffers handed over by
shared memory (CUDA IPC on a GPU, by the same seam), rollback from resident memory with no disk,
and a heartbeat that outlives a rank's big copy."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from orchestrator.data.flat import FlatShard, pack
from orchestrator.state.artifacts import layout_record
from orchestrator.state.versions import VersionStatus
from tests.orchestrator._cluster import Cluster, make_cluster, random_shards  # noqa: F401


def _in_memory_version(c: Cluster, shards: list[dict[str, torch.Tensor]]) -> tuple[int, list]:
    """A VERIFIED version whose shards exist only in this process (as the pipeline holds them
    before its artifact is written)."""
    flats = [pack(shard, device="cpu") for shard in shards]
    version = c.versions.create(label=None)
    c.versions.set_fields(version, layout=layout_record(flats))
    c.versions.transition(version, VersionStatus.QUANTIZED)
    c.versions.transition(version, VersionStatus.VERIFIED)
    return version, flats


def _rollout(c: Cluster, version: int, flats: list[FlatShard] | None) -> dict:
    with c.lock() as lock:
        assert lock.fence is not None
        return c.coordinator.rollout(version, fence=lock.fence, shards=flats)


def _prepare_routes(c: Cluster, txn: str) -> list[str]:
    for _, fields in c.client.xrange(c.keys.rank_commands):
        if fields["type"] == "PREPARE" and fields["txn"] == txn:
            return [entry["via"] for entry in json.loads(fields["shards"])]
    raise AssertionError(f"no PREPARE for {txn}")


def test_ranks_on_this_host_receive_the_daemons_buffers_with_no_artifact(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2)
    version, flats = _in_memory_version(c, random_shards(2, seed=11, rows=300, cols=257))
    result = _rollout(c, version, flats)
    assert _prepare_routes(c, result["txn"]) == ["shm", "shm"]
    state = c.wait_ready(version)
    assert [r["digest"] for r in state["ranks"]] == [f.digest() for f in flats]
    assert not c.artifacts.exists(version)
    # The shared-memory files are gone once the transaction is decided.
    handles = [e["handle"]["path"] for e in _entries(c, result["txn"])]
    assert not any(os.path.exists(p) for p in handles)


def _entries(c: Cluster, txn: str) -> list[dict]:
    for _, fields in c.client.xrange(c.keys.rank_commands):
        if fields["type"] == "PREPARE" and fields["txn"] == txn:
            return json.loads(fields["shards"])  # type: ignore[no-any-return]
    raise AssertionError(f"no PREPARE for {txn}")


def test_a_rollback_to_the_previous_version_reads_no_disk(make_cluster) -> None:  # noqa: F811
    c = make_cluster(2)
    v1 = c.make_version()
    c.rollout(v1)
    v2, flats = _in_memory_version(c, random_shards(2, seed=12))
    _rollout(c, v2, flats)
    c.wait_ready(v2)
    # v1's bytes are on disk, but the ranks hold it resident: remove the files to prove it.
    shutil.rmtree(c.artifacts.version_dir(v1))
    result = c.rollback()
    assert result["version"] == v1
    assert _prepare_routes(c, result["txn"]) == ["resident", "resident"]
    state = c.wait_ready(v1)
    assert [r["digest"] for r in state["ranks"]] == [c.digest(v1, r) for r in (0, 1)]
    # And forward again: v2 is now the resident previous version.
    forward = c.rollback(v2)
    assert _prepare_routes(c, forward["txn"]) == ["resident", "resident"]
    c.wait_ready(v2)
    assert c.status(v1) == VersionStatus.ROLLED_BACK


@pytest.mark.slow
def test_a_rank_copying_a_one_gib_shard_keeps_its_heartbeat(make_cluster) -> None:  # noqa: F811
    # Tight liveness on purpose: the rank must look alive throughout a copy and digest that take
    # longer than the timeout on this machine.
    c = make_cluster(1, ranks={"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.0},
                     rollout={"prepare_deadline_s": 300})  # fmt: skip
    gen = torch.Generator().manual_seed(13)
    big = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, generator=gen)
    shard = {"model.layers.0.mlp.up_proj.weight": big.view(torch.float8_e4m3fn).view(32768, -1)}
    version, flats = _in_memory_version(c, [shard])
    del big, shard
    expired = int(c.client.info("stats")["expired_keys"])
    result = _rollout(c, version, flats)
    assert result["pending_ranks"] == []
    # The alive key never expired while the rank received, copied and digested 1 GiB.
    assert int(c.client.info("stats")["expired_keys"]) == expired
    state = c.wait_ready(version)
    assert state["ranks"][0]["digest"] == flats[0].digest()
