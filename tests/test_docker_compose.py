"""docker-compose.yml is wired to the settings that exist, and is safe by default."""

from __future__ import annotations

import re
from typing import Any

import yaml

from orchestrator.settings import REPO_ROOT, Settings

COMPOSE = REPO_ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        children = getattr(field.annotation, "model_fields", None)
        if children:
            names |= {f"REFITD_{name.upper()}__{child.upper()}" for child in children}
        else:
            names.add(f"REFITD_{name.upper()}")
    return names


def test_every_refitd_variable_names_a_real_setting() -> None:
    known = _settings_env_names()
    for service, spec in _compose()["services"].items():
        for var in spec.get("environment", {}):
            if var.startswith("REFITD_"):
                assert var in known, f"{service}: {var} is not a refitd setting"


def test_refitd_and_every_rank_share_redis_and_tp_size() -> None:
    services = _compose()["services"]
    refitd = services["refitd"]["environment"]
    ranks = {n: s for n, s in services.items() if n.startswith("rank")}
    tp_size = int(refitd["REFITD_RANKS__TP_SIZE"])
    assert refitd["REFITD_RANKS__LAUNCH"] == "external"
    assert len(ranks) == tp_size
    seen_ranks, seen_gpus = set(), set()
    for spec in ranks.values():
        env = spec["environment"]
        assert env["REFITD_REDIS__URL"] == refitd["REFITD_REDIS__URL"]
        assert env["REFITD_RANKS__TP_SIZE"] == refitd["REFITD_RANKS__TP_SIZE"]
        cmd = spec["command"]
        assert cmd[:2] == ["rank", "--rank"]
        seen_ranks.add(int(cmd[2]))
        (device,) = spec["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in device["capabilities"]
        seen_gpus.update(device["device_ids"])
    assert seen_ranks == set(range(tp_size))
    assert len(seen_gpus) == tp_size, "one GPU per rank"
    (device,) = services["refitd"]["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"], "the daemon quantizes and verifies on a GPU"


def test_redis_persists_every_write() -> None:
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    assert "--requirepass" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert re.search(
        r"@redis:6379", _compose()["services"]["refitd"]["environment"]["REFITD_REDIS__URL"]
    )


def test_never_dev_mode_and_tokens_are_required() -> None:
    text = COMPOSE.read_text()
    for service in _compose()["services"].values():
        assert "REFITD_DEV_MODE" not in service.get("environment", {})
    assert "${REFITD_TRAINER_TOKEN:?" in text
    assert "${REFITD_ADMIN_TOKEN:?" in text
