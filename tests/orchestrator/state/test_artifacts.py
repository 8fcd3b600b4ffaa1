"""The artifact store on a real disk, and the shard download endpoint through the real app."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file

from api.errors import install_error_handlers
from api.routers import artifacts as artifacts_router
from orchestrator.data.flat import FlatShard, pack
from orchestrator.errors import Conflict, NotFound
from orchestrator.service.daemon import Refitd
from orchestrator.settings import load_settings
from orchestrator.state.artifacts import ArtifactStore, layout_record
from tests.orchestrator._cluster import random_shards

TRAINER = "trainer-token-0123456789"
ADMIN = "admin-token-0123456789ab"


def _flats(tp_size: int, seed: int, **kw: int) -> list[FlatShard]:
    return [pack(shard, device="cpu") for shard in random_shards(tp_size, seed=seed, **kw)]


def test_write_version_is_durable_and_the_file_holds_the_shard_bytes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    shards = random_shards(3, seed=1)
    flats = [pack(shard, device="cpu") for shard in shards]
    info = store.write_version(7, flats, metadata={"label": "step-70"})

    assert info["tp_size"] == 3
    assert [e["rank"] for e in info["ranks"]] == [0, 1, 2]
    for entry, shard, flat in zip(info["ranks"], shards, flats, strict=True):
        path = Path(entry["path"])
        assert path == store.path(7, entry["rank"]) == tmp_path / "artifacts" / "v7" / path.name
        data = path.read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        # The data section is the flat buffer, byte for byte: what ranks receive by IPC.
        assert data.endswith(bytes(flat.buffer[: flat.nbytes].numpy()))
        loaded = load_file(path)
        assert set(loaded) == set(shard)
        for name, tensor in shard.items():
            assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8))
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"refitd.version": "7", "refitd.rank": str(entry["rank"]),
                                    "refitd.tp_size": "3", "refitd.label": "step-70"}  # fmt: skip
    manifest = json.loads((tmp_path / "artifacts" / "v7" / "manifest.json").read_text())
    assert manifest["metadata"] == {"label": "step-70"}
    assert manifest["ranks"] == info["ranks"]
    assert store.exists(7) and not store.exists(8)
    assert store.shard_info(7, 2) == info["ranks"][2]
    # Nothing is left under a temporary name.
    assert not [p for p in (tmp_path / "artifacts").rglob(".*")]


def test_the_layout_record_names_each_ranks_digest_size_and_table() -> None:
    flats = _flats(2, seed=4)
    record = layout_record(flats)
    assert record["tp_size"] == 2
    for r, (entry, flat) in enumerate(zip(record["ranks"], flats, strict=True)):
        assert entry == {"rank": r, "digest": flat.digest(), "nbytes": flat.nbytes,
                         "table": flat.table_json()}  # fmt: skip
    assert record["ranks"][0]["digest"] != record["ranks"][1]["digest"]


def test_a_version_is_written_once_and_a_torn_write_is_redone(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.write_version(1, _flats(2, seed=1), metadata={})
    with pytest.raises(Conflict, match="already exist"):
        store.write_version(1, _flats(2, seed=2), metadata={})

    # A crash before the manifest: files without it are not a version, and are replaced.
    torn = store.version_dir(2)
    torn.mkdir(parents=True)
    (torn / "rank0.safetensors").write_bytes(b"half a file")
    assert not store.exists(2)
    info = store.write_version(2, _flats(2, seed=3), metadata={})
    assert store.exists(2)
    assert hashlib.sha256(store.path(2, 0).read_bytes()).hexdigest() == info["ranks"][0]["sha256"]


def test_exists_is_false_when_a_shard_is_missing_or_truncated(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.write_version(1, _flats(2, seed=1), metadata={})
    store.write_version(2, _flats(2, seed=2), metadata={})
    with open(store.path(1, 1), "r+b") as f:
        f.truncate(10)
    os.unlink(store.path(2, 0))
    assert not store.exists(1)
    assert not store.exists(2)


def test_prune_keeps_the_newest_and_the_pinned(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for v in range(1, 8):
        store.write_version(v, _flats(1, seed=v, rows=4, cols=4), metadata={})
    # Pinned versions count towards the retention, and stay even beyond it.
    assert store.prune(keep={2}, retention=3) == [5, 4, 3, 1]
    assert store.stored_versions() == [2, 6, 7]
    assert all(store.exists(v) for v in (2, 6, 7))
    assert not store.exists(1)
    assert store.prune(keep={2}, retention=3) == []
    assert store.prune(keep={2, 6, 7}, retention=2) == []
    assert store.remove(6) and not store.remove(6)
    assert store.stored_versions() == [2, 7]
    with pytest.raises(NotFound):
        store.manifest(6)
    # Leftovers of a deletion interrupted after its rename are swept away.
    leftover = store.root / ".deleting-v9-1-1"
    leftover.mkdir()
    store.prune(keep=set(), retention=10)
    assert not leftover.exists()


def _client(tmp_path: Path, **overrides: object) -> tuple[TestClient, ArtifactStore]:
    config = tmp_path / "refitd.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nredis: {{url: redis://127.0.0.1:1/0}}\n")
    settings = load_settings(config, **overrides)
    core = Refitd(settings)  # not started: the endpoint needs only settings and the store
    app = FastAPI()
    app.state.core = core
    install_error_handlers(app)
    app.include_router(artifacts_router.router)
    return TestClient(app), core.artifacts


@pytest.fixture
def served(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> tuple[TestClient, ArtifactStore]:
    client, store = _client(tmp_path, auth={"trainer_token": TRAINER, "admin_token": ADMIN})
    store.write_version(3, _flats(2, seed=3, rows=256, cols=512), metadata={})
    return client, store


def test_shard_download_streams_the_file_with_its_sha256(served) -> None:
    client, store = served
    for token in (TRAINER, ADMIN):
        response = client.get("/artifacts/3/1", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert response.content == store.path(3, 1).read_bytes()
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["x-refitd-sha256"] == store.shard_info(3, 1)["sha256"]


def test_shard_download_needs_a_valid_token(served) -> None:
    client, _ = served
    assert client.get("/artifacts/3/0").status_code == 401
    wrong = client.get("/artifacts/3/0", headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401
    assert client.get("/artifacts/3/0", headers={"Authorization": TRAINER}).status_code == 401


def test_shard_download_of_an_unknown_version_or_rank_is_404(served) -> None:
    client, store = served
    auth = {"Authorization": f"Bearer {TRAINER}"}
    for url in ("/artifacts/4/0", "/artifacts/3/2"):
        response = client.get(url, headers=auth)
        assert response.status_code == 404
        assert "version" in response.json()["detail"]
    store.remove(3)
    assert client.get("/artifacts/3/0", headers=auth).status_code == 404


def test_shard_download_in_dev_mode_needs_no_token(tmp_path: Path, clean_env) -> None:
    client, store = _client(tmp_path, dev_mode=True)
    store.write_version(1, _flats(1, seed=1), metadata={})
    response = client.get("/artifacts/1/0")
    assert response.status_code == 200
    assert response.content == store.path(1, 0).read_bytes()
