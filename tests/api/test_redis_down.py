"""With Redis down, reads answer 503 with the reason (never a 500), and readiness and liveness
say so."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.service.daemon import Refitd
from orchestrator.settings import load_settings

TOKEN = "reader-token-0123456789"


def test_reads_answer_503_while_redis_is_down(start_redis, tmp_path: Path, clean_env) -> None:
    server = start_redis()
    settings = load_settings(
        redis={"url": server.url},
        data_dir=tmp_path / "data",
        ranks={"launch": "external", "tp_size": 1},
        auth={"trainer_token": TOKEN, "admin_token": "admin-token-0123456789"},
    )
    core = Refitd(settings)
    core.start()
    try:
        client = TestClient(create_app(core))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/weights/versions", headers=auth).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}
        server.kill()
        for path in ("/weights/versions", "/weights/versions/1", "/weights/updates/x",
                     "/weights/active", "/metrics"):  # fmt: skip
            response = client.get(path, headers=auth)
            assert response.status_code == 503, (path, response.text)
            assert "Redis" in response.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "does not answer" in ready.json()["reason"]
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert "does not answer" in health.json()["reason"]
    finally:
        core.stop()
