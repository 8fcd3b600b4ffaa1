"""A trainer on the daemon's host pushes tensors, not files (source type `cuda_ipc`; on the CPU
its buckets travel through shared memory): real trainer processes, a real `refitd serve` with
two CPU rank agents, refitd_client in between.

The daemon holds its `ipc.copied` failpoint on a file that exists except while a test removes
it: that is how a test holds a push between the daemon's copy and its answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from orchestrator.settings import REPO_ROOT
from refitd_client import Client, Refused
from refitd_client.tensors import export_tensors
from tests.api.conftest import STAGES, TRAINER, Api, write_checkpoint
from tests.conftest import wait_until
from tests.refitd_client._trainer import state_for

pytestmark = pytest.mark.slow

PIPELINE = [s for s in STAGES if s not in ("rejected", "aborted")]


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("failpoint") / "go"
    path.touch()
    return path


@pytest.fixture(scope="module")
def api(launch_api, go: Path) -> Api:
    return launch_api("qwen2", tp_size=2, env={"REFITD_FAILPOINTS": f"ipc.copied=wait-file:{go}"})


def _config(api: Api) -> Path:
    return Path(api.daemon.env["REFITD_MODEL__CONFIG"])


def _trainer(api: Api, seed: int, *extra: str) -> subprocess.Popen[str]:
    command = [
        *(sys.executable, "-m", "tests.refitd_client._trainer", "--url", api.url),
        *("--token", TRAINER, "--config", str(_config(api)), "--seed", str(seed), *extra),
    ]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _run_trainer(api: Api, seed: int, *extra: str) -> dict[str, Any]:
    proc = _trainer(api, seed, *extra)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _shm_files(pid: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"refitd-{pid}-*.buf"))


def _digests(api: Api, version: int) -> list[str]:
    return [r["digest"] for r in api.get(f"/weights/versions/{version}")["layout"]["ranks"]]


def _on_every_rank(api: Api, version: int) -> None:
    active = api.active()
    assert active["active_version"] == version
    assert [(r["version"], r["state"], r["digest"]) for r in active["ranks"]] == [
        (version, "READY", d) for d in _digests(api, version)
    ]


def _post(api: Api, source: dict[str, Any], **kw: Any) -> httpx.Response:
    return api.request("POST", "/weights/update", token=TRAINER, json={"source": source}, **kw)


@pytest.fixture
def exported(api: Api) -> Iterator[dict[str, Any]]:
    """The `source` of an honest update exported by this test process (alive for the test)."""
    with export_tensors(state_for(api.config, api.next_seed(), "cpu")) as export:
        yield export.source()


def test_a_trainer_process_pushes_tensors_to_committed_with_the_bytes_a_path_push_gives(
    api: Api,
) -> None:
    seed = api.next_seed()
    pushed = _run_trainer(api, seed, "--label", "step-ipc")
    record = pushed["record"]
    assert (record["status"], record["stage"], record["label"]) == ("succeeded", "committed",
                                                                     "step-ipc")  # fmt: skip
    version = record["version"]
    _on_every_rank(api, version)
    # The trainer's buckets are gone once it has its answer.
    assert _shm_files(pushed["pid"]) == []
    # The same tensors through a safetensors path: the very same shards, bit for bit.
    path_version = api.commit(write_checkpoint(api.root / f"same-{seed}",
                                               state_for(api.config, seed, "cpu")))  # fmt: skip
    assert _digests(api, path_version) == _digests(api, version)
    detail = api.get(f"/weights/versions/{version}")
    assert detail["status"] == "SUPERSEDED"
    assert detail["verification"]["passed"] is True


def test_push_without_wait_answers_202_and_the_update_goes_through_every_stage(api: Api) -> None:
    pushed = _run_trainer(api, api.next_seed(), "--no-wait")
    accepted = pushed["record"]
    assert set(accepted) == {"update_id", "version", "status_url"}
    seen = api.follow(accepted["update_id"])
    stages = [s["stage"] for s in seen]
    assert stages[-1] == "committed", stages
    assert [PIPELINE.index(s) for s in stages] == sorted(PIPELINE.index(s) for s in stages)
    _on_every_rank(api, accepted["version"])


def test_nan_in_pushed_tensors_rejects_the_version_naming_the_tensor(api: Api) -> None:
    before = api.snapshot()
    name = "model.layers.1.mlp.down_proj.weight"
    pushed = _run_trainer(api, api.next_seed(), "--nan", name)
    assert pushed["type"] == "Rejected", pushed
    assert f"NaN or Inf in {name}" in pushed["error"]
    version = pushed["update"]["version"]
    assert api.get(f"/weights/versions/{version}")["status"] == "REJECTED"
    after = api.snapshot()
    assert (after["active"], after["epoch"], after["ranks"]) == (
        before["active"], before["epoch"], before["ranks"])  # fmt: skip


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda s: s.pop("model.norm.weight"), "model.norm.weight"),
        (lambda s: s.update(extra=torch.zeros(4)), "extra"),
        (lambda s: s.update({"model.norm.weight": torch.zeros(3)}), "model.norm.weight"),
        (lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int32)}),
         "model.norm.weight"),
    ],
    ids=["missing", "unknown", "shape", "dtype"],
)  # fmt: skip
def test_tensors_that_do_not_match_the_model_are_refused_with_422_and_change_nothing(
    api: Api, change: Any, detail: str
) -> None:
    before = api.snapshot()
    state = state_for(api.config, api.next_seed(), "cpu")
    change(state)
    with Client(api.url, TRAINER) as client, pytest.raises(Refused) as refused:
        client.push(state)
    assert refused.value.status_code == 422, refused.value.detail
    assert detail in refused.value.detail
    assert api.snapshot() == before
    assert _shm_files(os.getpid()) == []


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("exporter", "detail"),
    [
        ({"boot_id": "00000000-0000-0000-0000-000000000000"}, "not on this daemon's host"),
        ({"host": "elsewhere.example"}, "not on this daemon's host"),
        ({"uid": os.getuid() + 1}, "refitd maps the buffers of its own user only"),
        ({"start_time": 1}, "does not run on this host"),
        ({"pid": "dead"}, "does not run on this host"),
        ({"pid": "daemon"}, "the daemon's own"),
    ],
    ids=["boot-id", "hostname", "uid", "reused-pid", "exited", "daemon-pid"],
)
def test_a_handle_from_another_host_user_or_process_is_refused_with_400(
    api: Api, exported: dict[str, Any], exporter: dict[str, Any], detail: str
) -> None:
    before = api.snapshot()
    stand_ins = {"dead": _dead_pid, "daemon": lambda: api.daemon.proc.pid}
    changed = {k: stand_ins[v]() if v in stand_ins else v for k, v in exporter.items()}
    response = _post(api, {**exported, "exporter": {**exported["exporter"], **changed}})
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]
    assert api.snapshot() == before


def _first_handle(source: dict[str, Any], **change: Any) -> dict[str, Any]:
    buckets = [dict(b) for b in source["buckets"]]
    buckets[0]["handle"] = {**buckets[0]["handle"], **change}
    return {**source, "buckets": buckets}


def test_a_handle_that_cannot_be_opened_is_refused_with_400(
    api: Api, exported: dict[str, Any], tmp_path: Path
) -> None:
    before = api.snapshot()
    handle = exported["buckets"][0]["handle"]
    assert handle["kind"] == "shm"
    gone = _first_handle(exported, path=handle["path"] + ".gone")
    response = _post(api, gone)
    assert response.status_code == 400, response.text
    assert "bucket 0: its shm handle cannot be opened" in response.json()["detail"]

    response = _post(api, _first_handle(exported, path=handle["path"] + "\x00"))
    assert response.status_code == 400, response.text
    assert "bucket 0: its shm handle cannot be opened" in response.json()["detail"]

    elsewhere = tmp_path / Path(handle["path"]).name
    elsewhere.write_bytes(Path(handle["path"]).read_bytes())
    response = _post(api, _first_handle(exported, path=str(elsewhere)))
    assert response.status_code == 400, response.text
    assert "names a file in /dev/shm" in response.json()["detail"]

    # A shared-memory file of another user's (the daemon runs as root here, so it could read it).
    theirs = Path(handle["path"] + "-theirs.buf")
    theirs.write_bytes(Path(handle["path"]).read_bytes())
    try:
        os.chown(theirs, os.getuid() + 1, -1)
        response = _post(api, _first_handle(exported, path=str(theirs)))
    finally:
        theirs.unlink()
    assert response.status_code == 400, response.text
    assert f"not to the exporter's uid {os.getuid()}" in response.json()["detail"]

    # A CUDA IPC handle where the daemon has no GPU (or of memory that is not there).
    cuda = {"kind": "cuda", "device": 0, "nbytes": handle["nbytes"], "tensor_offset": 0,
            "storage_handle": "AAAA", "storage_size_bytes": handle["nbytes"],
            "storage_offset_bytes": 0, "ref_counter_handle": "AAAA", "ref_counter_offset": 0,
            "event_handle": None, "event_sync_required": False, "device_uuid": None,
            "pid": os.getpid()}  # fmt: skip
    buckets = [{**exported["buckets"][0], "handle": cuda}, *exported["buckets"][1:]]
    response = _post(api, {**exported, "buckets": buckets})
    assert response.status_code == 400, response.text
    assert "bucket 0: its cuda handle cannot be opened" in response.json()["detail"]
    assert api.snapshot() == before


def test_a_table_that_lies_or_bytes_that_changed_are_refused_and_change_nothing(
    api: Api, exported: dict[str, Any]
) -> None:
    before = api.snapshot()
    bucket = exported["buckets"][0]
    short = _first_handle(exported, nbytes=bucket["handle"]["nbytes"] - 16)
    response = _post(api, short)
    assert response.status_code == 422, response.text
    assert "bucket 0: its handle covers" in response.json()["detail"]

    twice = {**exported, "buckets": [bucket, bucket]}
    response = _post(api, twice)
    assert response.status_code == 422, response.text
    assert "appears in more than one bucket" in response.json()["detail"]

    # The exporter's bytes changed after it computed the digest (a buffer freed and reused).
    data = Path(bucket["handle"]["path"])
    with data.open("r+b") as f:
        f.seek(5)
        f.write(b"\x7f")
    response = _post(api, exported)
    assert response.status_code == 422, response.text
    assert "bucket 0 changed while it was copied" in response.json()["detail"]
    assert api.snapshot() == before


def _held_at_failpoint(api: Api, count: int) -> bool:
    return api.daemon.log().count("failpoint ipc.copied") >= count


def test_a_trainer_that_exits_before_the_copy_ends_gets_400_and_nothing_is_kept(
    api: Api, go: Path
) -> None:
    before = api.snapshot()
    trainer = _trainer(api, api.next_seed(), "--export-only")
    assert trainer.stdout is not None
    source = json.loads(trainer.stdout.readline())["source"]
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
    for leftover in _shm_files(trainer.pid):  # SIGKILL left them (a daemon start removes such)
        leftover.unlink(missing_ok=True)
    [response] = answers
    assert response.status_code == 400, response.text
    assert "exited before the copy ended" in response.json()["detail"]
    assert api.snapshot() == before


def test_past_the_in_memory_limit_a_push_gets_429_with_retry_after_and_nothing_changes(
    api: Api, go: Path, exported: dict[str, Any]
) -> None:
    held = api.daemon.log().count("failpoint ipc.copied")
    first: list[httpx.Response] = []
    go.unlink()
    try:
        post = threading.Thread(target=lambda: first.append(_post(api, exported)))
        post.start()
        wait_until(lambda: _held_at_failpoint(api, held + 1), timeout_s=60)
        before = api.snapshot()
        with export_tensors(state_for(api.config, api.next_seed(), "cpu")) as second:
            response = _post(api, second.source())
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        assert "limits.tensor_updates_waiting=1" in response.json()["detail"]
        assert api.snapshot() == before
    finally:
        go.touch()
    post.join(60)
    [accepted] = first
    assert accepted.status_code == 202, accepted.text
    assert api.follow(accepted.json()["update_id"])[-1]["stage"] == "committed"


def test_a_retried_push_under_the_same_idempotency_key_replays_the_first_answer(api: Api) -> None:
    # A trainer that lost the answer exports the same tensors again: new handles, another
    # buffer, the same content. It gets its first update back, not a second version or a 422.
    state = state_for(api.config, api.next_seed(), "cpu")
    key = {"Idempotency-Key": f"retry-{os.getpid()}-{api.next_seed()}"}
    with export_tensors(state) as first:
        answered = _post(api, first.source(), headers=key)
    assert answered.status_code == 202, answered.text
    with export_tensors(state) as again:
        replayed = _post(api, again.source(), headers=key)
    assert replayed.status_code in (200, 202), replayed.text
    assert replayed.json()["update_id"] == answered.json()["update_id"]
    assert replayed.json()["version"] == answered.json()["version"]
    api.follow(answered.json()["update_id"])
    # Other content under that key is another request: refused, as for any source.
    with export_tensors(state_for(api.config, api.next_seed(), "cpu")) as other:
        assert _post(api, other.source(), headers=key).status_code == 422
