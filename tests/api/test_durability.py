"""The durability rule under kills: the artifact of a committed version is written after its
commit, and whatever dies when, every rank ends on a version whose bytes are durable, and an
acknowledged update is never lost silently (README "Durability")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.service.recovery import NOT_DURABLE_SOURCE_LOST_REASON, SOURCE_LOST_REASON
from orchestrator.settings import REPO_ROOT
from tests.api.conftest import TRAINER, Api
from tests.conftest import DaemonProcess, wait_until

pytestmark = pytest.mark.slow


def _restart(api: Api, **drop: str) -> Api:
    """The same daemon (data dir, settings) started again, without the failpoints."""
    env = {k: v for k, v in api.daemon.env.items() if k != "REFITD_FAILPOINTS"}
    daemon = DaemonProcess(api.daemon.data_dir, env, port=api.daemon.port)
    daemon.start()
    again = Api(daemon=daemon, root=api.root, model=api.model, config=api.config, base=api.base)
    wait_until(again.ranks_ready, timeout_s=120, step_s=0.1)
    return again


def _digests(api: Api, version: int) -> list[str]:
    layout = api.get(f"/weights/versions/{version}")["layout"]
    return [r["digest"] for r in layout["ranks"]]


def test_killed_after_a_commit_before_the_artifact_every_rank_returns_to_a_durable_version(
    launch_api,
) -> None:
    api = launch_api("qwen3", env={"REFITD_FAILPOINTS": "artifact.background=exit"})
    # The first version has no durable version to fall back on: its artifact is written
    # before its rollout, so it never reaches the failpoint.
    first = api.push(api.checkpoint(), wait=True).json()
    v1 = first["version"]
    assert api.get(f"/weights/versions/{v1}")["artifact"] is not None
    # The second commits, then the daemon dies before writing its artifact.
    second = api.push(api.checkpoint())
    assert second.status_code == 202
    v2 = second.json()["version"]
    assert api.daemon.proc is not None
    assert api.daemon.proc.wait(120) == 137
    assert not (api.data_dir / "artifacts" / f"v{v2}" / "manifest.json").exists()

    again = _restart(api)
    try:
        record = again.get(f"/weights/versions/{v2}")
        assert record["status"] == "ROLLED_BACK"
        assert "before its artifact was durable" in record["reason"]
        update = again.get(f"/weights/updates/{second.json()['update_id']}")
        assert "before its artifact was durable" in update["error"]
        assert again.get("/weights/active")["active_version"] == v1
        # Every rank ends on v1 (a rank that outlived the daemon swaps to its resident copy; a
        # new one loads v1's artifact), with v1's bytes.
        want = [(v1, d) for d in _digests(again, v1)]
        wait_until(
            lambda: (
                [(r["version"], r["digest"]) for r in again.get("/weights/active")["ranks"]] == want
            ),
            timeout_s=60,
        )
        assert httpx.get(f"{again.url}/readyz", timeout=30).status_code == 200
        # And the next update goes through as usual.
        third = again.push(again.checkpoint(), wait=True)
        assert third.status_code == 200, third.text
        wait_until(lambda: again.get(f"/weights/versions/{third.json()['version']}")["artifact"])
    finally:
        again.daemon.stop()


def test_a_rank_restarted_before_the_artifact_is_durable_waits_for_it_then_loads_it(
    launch_api, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    api = launch_api("qwen3", env={"REFITD_FAILPOINTS": f"artifact.background=wait-file:{go}"})
    v1 = api.push(api.checkpoint(), wait=True).json()["version"]
    response = api.push(api.checkpoint(), wait=True)
    assert response.status_code == 200, response.text
    v2 = response.json()["version"]
    assert api.get(f"/weights/versions/{v2}")["artifact"] is None  # held at the failpoint

    pid = api.get("/weights/active")["ranks"][1]["pid"]
    import os
    import signal

    os.kill(pid, signal.SIGKILL)

    def waiting() -> bool:
        rank = api.get("/weights/active")["ranks"][1]
        return (
            rank["pid"] != pid
            and rank["state"] == "FAILED"
            and "not durable" in (rank.get("reason") or "")
        )

    wait_until(waiting, timeout_s=120, step_s=0.1)
    go.touch()
    wait_until(lambda: api.get(f"/weights/versions/{v2}")["artifact"], timeout_s=60)
    wait_until(api.ranks_ready, timeout_s=60, step_s=0.1)
    active = api.get("/weights/active")
    assert active["active_version"] == v2
    assert [r["version"] for r in active["ranks"]] == [v2, v2]
    assert [r["digest"] for r in active["ranks"]] == _digests(api, v2)
    assert v1 < v2


# Updates from trainer tensors (cuda_ipc): their source lives only in the daemon's memory ------
def _trainer_push(api: Api, seed: int) -> dict[str, Any]:
    """A trainer process pushes an honest update through refitd_client, without waiting."""
    command = [
        *(sys.executable, "-m", "tests.refitd_client._trainer", "--url", api.url),
        *("--token", TRAINER, "--config", api.daemon.env["REFITD_MODEL__CONFIG"]),
        *("--seed", str(seed), "--no-wait"),
    ]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    pushed = json.loads(out.stdout.strip().splitlines()[-1])
    assert "record" in pushed, pushed
    return pushed["record"]  # type: ignore[no-any-return]


def test_killed_after_tensor_pushes_were_acknowledged_and_before_they_ran_they_are_aborted(
    launch_api, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    go.touch()
    api = launch_api("qwen3", env={
        "REFITD_FAILPOINTS": f"pipeline.loading=wait-file:{go}",
        "REFITD_LIMITS__TENSOR_UPDATES_WAITING": "2",
    })  # fmt: skip
    v1 = api.commit()
    go.unlink()
    running = _trainer_push(api, api.next_seed())
    wait_until(lambda: api.daemon.log().count("failpoint pipeline.loading") == 2, timeout_s=60)
    queued = _trainer_push(api, api.next_seed())
    assert api.get(f"/weights/updates/{queued['update_id']}")["stage"] == "queued"
    api.daemon.kill()  # SIGKILL: the copies of both pushes die with it

    again = _restart(api)
    try:
        for accepted in (running, queued):
            update = again.get(f"/weights/updates/{accepted['update_id']}")
            assert (update["status"], update["stage"]) == ("failed", "aborted"), update
            assert update["error"] == SOURCE_LOST_REASON
            version = again.get(f"/weights/versions/{accepted['version']}")
            assert (version["status"], version["reason"]) == ("ABORTED", SOURCE_LOST_REASON)
        assert again.get("/weights/active")["active_version"] == v1
        wait_until(lambda: httpx.get(f"{again.url}/readyz", timeout=30).status_code == 200)
        assert again.metrics()["refitd_updates_queued"] == 0
        # The trainer pushes again, and it goes through.
        accepted = _trainer_push(again, again.next_seed())
        assert again.follow(accepted["update_id"])[-1]["stage"] == "committed"
    finally:
        again.daemon.stop()


def test_killed_after_a_tensor_push_committed_before_its_artifact_it_is_aborted_and_undone(
    launch_api,
) -> None:
    api = launch_api("qwen3", env={"REFITD_FAILPOINTS": "artifact.background=exit"})
    v1 = api.commit()  # the first version's artifact is written before its rollout
    accepted = _trainer_push(api, api.next_seed())
    v2 = accepted["version"]
    assert api.daemon.proc is not None
    assert api.daemon.proc.wait(120) == 137

    again = _restart(api)
    try:
        version = again.get(f"/weights/versions/{v2}")
        reason = NOT_DURABLE_SOURCE_LOST_REASON.format(version=v2, target=v1)
        assert (version["status"], version["reason"]) == ("ROLLED_BACK", reason)
        update = again.get(f"/weights/updates/{accepted['update_id']}")
        assert (update["status"], update["stage"], update["error"]) == ("failed", "aborted",
                                                                         reason)  # fmt: skip
        want = [(v1, d) for d in _digests(again, v1)]
        wait_until(
            lambda: (
                [(r["version"], r["digest"]) for r in again.get("/weights/active")["ranks"]] == want
            ),
            timeout_s=60,
        )
    finally:
        again.daemon.stop()
