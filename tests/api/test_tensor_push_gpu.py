"""The cuda_ipc source on a GPU: a trainer process pushes CUDA tensors by CUDA IPC to a real
`refitd serve` whose daemon and rank agent run on the GPU (skipped without CUDA)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from orchestrator.data.ipc import open_handle
from tests.api.conftest import Api, write_checkpoint
from tests.api.test_tensor_push import (
    _digests,
    _held_at_failpoint,
    _on_every_rank,
    _post,
    _run_trainer,
    _trainer,
)
from tests.conftest import wait_until
from tests.refitd_client._trainer import state_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("failpoint") / "go"
    path.touch()
    return path


@pytest.fixture(scope="module")
def api(launch_api, go: Path) -> Api:
    return launch_api("qwen2", tp_size=1, env={
        "REFITD_RANKS__DEVICE": "cuda",
        "REFITD_FAILPOINTS": f"ipc.copied=wait-file:{go}",
    })  # fmt: skip


def _exporting_trainer(api: Api) -> tuple[Any, dict[str, Any]]:
    trainer = _trainer(api, api.next_seed(), "--export-only", "--device", "cuda")
    assert trainer.stdout is not None
    source = json.loads(trainer.stdout.readline())["source"]
    assert {b["handle"]["kind"] for b in source["buckets"]} == {"cuda"}
    return trainer, source


def test_a_trainer_pushes_cuda_tensors_by_cuda_ipc_bit_exact_with_a_path_push(api: Api) -> None:
    seed = api.next_seed()
    pushed = _run_trainer(api, seed, "--device", "cuda", "--label", "gpu")
    record = pushed["record"]
    assert (record["status"], record["stage"]) == ("succeeded", "committed"), pushed
    _on_every_rank(api, record["version"])
    same = write_checkpoint(api.root / f"same-{seed}", state_for(api.config, seed, "cpu"))
    assert _digests(api, api.commit(same)) == _digests(api, record["version"])


def test_a_cuda_bucket_changed_after_its_digest_is_refused_with_422(api: Api) -> None:
    before = api.snapshot()
    trainer, source = _exporting_trainer(api)
    try:
        with open_handle(source["buckets"][0]["handle"]) as mapped:
            mapped[5] ^= 0x7F
            torch.cuda.synchronize()
        response = _post(api, source)
    finally:
        trainer.kill()
        trainer.wait()
    assert response.status_code == 422, response.text
    assert "bucket 0 changed while it was copied" in response.json()["detail"]
    assert api.snapshot() == before


def test_a_cuda_trainer_that_exits_before_the_copy_ends_gets_400_and_the_daemon_goes_on(
    api: Api, go: Path
) -> None:
    before = api.snapshot()
    trainer, source = _exporting_trainer(api)
    answers: list[httpx.Response] = []
    held = api.daemon.log().count("failpoint ipc.copied")
    go.unlink()
    try:
        post = threading.Thread(target=lambda: answers.append(_post(api, source)))
        post.start()
        wait_until(lambda: _held_at_failpoint(api, held + 1), timeout_s=60)
        trainer.kill()
        trainer.wait()
    finally:
        go.touch()
    post.join(60)
    [response] = answers
    assert response.status_code == 400, response.text
    assert "exited before the copy ended" in response.json()["detail"]
    assert api.snapshot() == before
    # The daemon's CUDA context survived the exporter's death: the next push commits.
    record = _run_trainer(api, api.next_seed(), "--device", "cuda")["record"]
    assert record["stage"] == "committed"
