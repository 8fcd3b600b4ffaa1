"""The durability rule under kills: the artifact of a committed version is written after its
commit, and whatever dies when, every rank ends on a version whose bytes are durable, and an
acknowledged update is never lost silently (README "Durability")."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Api
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
