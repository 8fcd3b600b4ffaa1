"""The OpenAPI document says what the API does: a bearer scheme that /docs can authorize with,
the 401/403/503 answers of every endpoint that gives them, and error bodies of the shape they
have. Built in-process from the app; nothing here needs Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.service.daemon import Refitd
from orchestrator.settings import load_settings

TRAINER = "trainer-token-0123456789"
OPEN = {"/healthz", "/readyz"}


@pytest.fixture
def client(tmp_path: Path, clean_env) -> TestClient:
    settings = load_settings(
        data_dir=tmp_path / "data",
        ranks={"launch": "external", "tp_size": 1},
        auth={"trainer_token": TRAINER, "admin_token": "admin-token-0123456789"},
    )
    return TestClient(create_app(Refitd(settings)))  # never started: no Redis behind it


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items()
            for method, op in item.items()]  # fmt: skip


def _schema_name(response: dict[str, Any]) -> str | None:
    ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def test_a_bearer_scheme_is_declared_and_every_guarded_operation_uses_it(client) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert [s for s in schemes.values() if s == {**s, "type": "http", "scheme": "bearer"}]
    [name] = schemes
    for path, method, op in _operations(doc):
        if path in OPEN:
            assert "security" not in op, (path, method)
            continue
        assert op.get("security") == [{name: []}], (path, method)
        for code in ("401", "403", "503"):
            assert code in op["responses"], (path, method, code)


def test_every_error_response_is_documented_with_the_shape_it_has(client) -> None:
    doc = client.get("/openapi.json").json()
    for path, method, op in _operations(doc):
        for code, response in op["responses"].items():
            if code.startswith(("4", "5")):
                expected = {"/healthz": "Health", "/readyz": "Ready"}.get(path, "ErrorBody")
                assert _schema_name(response) == expected, (path, method, code)
    assert doc["components"]["schemas"]["ErrorBody"]["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in doc["components"]["schemas"]


@pytest.mark.parametrize("path", ["/artifacts/abc/0", "/artifacts/1/x", "/weights/versions/x"])
def test_a_bad_path_parameter_answers_the_documented_422(client, path: str) -> None:
    response = client.get(path, headers={"Authorization": f"Bearer {TRAINER}"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.startswith("invalid request: "), detail
    assert "Input should be a valid integer" in detail, detail
