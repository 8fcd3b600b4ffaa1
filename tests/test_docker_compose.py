"""docker-compose.yml is wired to the settings that exist, is safe by default, and builds the
torch that pyproject.toml pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from orchestrator.settings import REPO_ROOT, Settings

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"


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


def test_ranks_in_their_own_containers_can_take_the_distributed_route() -> None:
    services = _compose()["services"]
    assert services["refitd"]["environment"]["REFITD_RANKS__DIST_HOST"] == "refitd"
    ranks = {n: s for n, s in services.items() if n.startswith("rank")}
    for name, spec in ranks.items():
        # Each advertises an address the daemon's NCCL/gloo can reach on the compose network.
        assert spec["environment"]["REFITD_RANKS__DIST_HOST"] == name
    remote = [n for n, s in ranks.items() if not s.get("volumes")]
    assert remote, "one rank is set up as on another host (no shared artifact volume)"
    for name in remote:
        assert ranks[name]["environment"]["REFITD_RANKS__ARTIFACT_URL"] == "http://refitd:8470"


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


def _torch_pin() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch==([\w.]+)", pin)
    assert match, f"torch is pinned to one version in pyproject.toml, not {pin!r}"
    return match.group(1)


def test_the_image_installs_the_torch_pyproject_pins() -> None:
    pin = _torch_pin()
    text = DOCKERFILE.read_text()
    install = [line for line in text.splitlines() if "pip install" in line]
    assert install, "the Dockerfile installs the project with pip"
    # The project brings torch with its dependencies: none may be skipped, and no other torch
    # (a versioned base image, a second pin) may come in beside it.
    assert all("--no-deps" not in line for line in install), install
    named = re.findall(r"(?:torch|pytorch)[=:@-]+v?(\d+\.\d+(?:\.\d+)?)", text)
    assert all(version == pin for version in named), (named, pin)
    assert not re.search(r"^FROM\s+\S*pytorch", text, re.MULTILINE), (
        "a base image brings its own torch"
    )


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_accepts_the_file_and_requires_the_secrets() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("docker compose is not installed here (neither the plugin nor docker-compose)")
    names = ("REDIS_PASSWORD", "REFITD_TRAINER_TOKEN", "REFITD_ADMIN_TOKEN")
    base = {k: v for k, v in os.environ.items() if k not in names}
    secrets = {name: name.lower() * 2 for name in names}
    command = [*compose, "-f", str(COMPOSE), "config", "--quiet"]
    ok = subprocess.run(
        command, env={**base, **secrets}, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        command, env=base, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr, missing.stderr
