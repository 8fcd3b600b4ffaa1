"""Real `refitd serve` daemons for the API tests, one per module, and the helpers that talk to them.

A daemon costs seconds to start (it imports torch and transformers, starts an embedded Redis and,
with ranks.launch local, one rank agent per TP rank), so each module starts one and its tests
share it. Tests that must not see other tests' effects compare the state they find with the state
they leave, rather than assume a fresh daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from orchestrator.model.synthetic import base_state, honest_update
from orchestrator.settings import REPO_ROOT
from tests.conftest import DaemonProcess, refused_port, wait_until
from tests.orchestrator._tiny_models import CONFIGS

TRAINER = "trainer-token-for-api-tests-0001"
ADMIN = "admin-token-for-api-tests-00002"
GARBAGE = "neither-token-just-garbage-0003"
FINAL_STATUSES = ("succeeded", "failed")
STAGES = ("queued", "loading", "quantizing", "verifying", "writing", "rolling_out",
          "committed", "rejected", "aborted")  # fmt: skip
# Startup imports torch and transformers; on a busy 2-core machine that alone takes ~20 s.
START_TIMEOUT_S = 120.0
UPDATE_TIMEOUT_S = 120.0


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def write_checkpoint(directory: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """A one-file safetensors checkpoint directory, as a trainer would write it."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


@dataclass
class Api:
    """One running daemon plus what the tests need to drive it."""

    daemon: DaemonProcess
    root: Path  # the one allowed root for path sources
    model: str
    config: dict[str, Any]
    base: dict[str, torch.Tensor]
    readyz_at_start: dict[str, Any] = field(default_factory=dict)
    _seed: int = 100

    @property
    def url(self) -> str:
        return self.daemon.url

    @property
    def data_dir(self) -> Path:
        return self.daemon.data_dir

    def client(self, token: str | None = ADMIN, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth(token), timeout=timeout)

    def request(
        self, method: str, path: str, *, token: str | None = ADMIN, **kw: Any
    ) -> httpx.Response:
        kw.setdefault("timeout", 60.0)
        headers = {**auth(token), **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, **kw)

    def get(self, path: str, *, token: str | None = ADMIN, **kw: Any) -> Any:
        response = self.request("GET", path, token=token, **kw)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    # Weights --------------------------------------------------------------------------------
    def next_seed(self) -> int:
        self._seed += 1
        return self._seed

    def checkpoint(self, state: Mapping[str, torch.Tensor] | None = None, name: str = "") -> Path:
        """Write an honest update (or `state`) under the allowed root; returns its directory."""
        seed = self.next_seed()
        state = state if state is not None else honest_update(self.base, seed=seed)
        return write_checkpoint(self.root / (name or f"ckpt-{seed}"), state)

    def bytes_of(self, state: Mapping[str, torch.Tensor] | None = None) -> bytes:
        return (self.checkpoint(state) / "model.safetensors").read_bytes()

    # Updates --------------------------------------------------------------------------------
    def push(
        self,
        directory: Path | str,
        *,
        wait: bool = False,
        label: str | None = None,
        verify: bool | None = None,
        token: str = TRAINER,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {"source": {"type": "path", "path": str(directory)}}
        if label is not None:
            body["label"] = label
        if verify is not None:
            body["verify"] = verify
        return self.request(
            "POST", "/weights/update", token=token, json=body, headers=headers or {},
            params={"wait": "true"} if wait else {}, timeout=UPDATE_TIMEOUT_S,
        )  # fmt: skip

    def upload(
        self,
        data: bytes,
        *,
        params: dict[str, str] | None = None,
        token: str = TRAINER,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return self.request(
            "POST", "/weights/update", token=token, content=data, params=params or {},
            headers={"Content-Type": content_type, **(headers or {})}, timeout=UPDATE_TIMEOUT_S,
        )  # fmt: skip

    def follow(self, update_id: str, timeout_s: float = UPDATE_TIMEOUT_S) -> list[dict[str, Any]]:
        """Poll GET /weights/updates/{id} until it is final; every answer seen, in order."""
        seen: list[dict[str, Any]] = []

        def _final() -> bool:
            state = self.get(f"/weights/updates/{update_id}", token=TRAINER)
            seen.append(state)
            return state["status"] in FINAL_STATUSES

        wait_until(_final, timeout_s=timeout_s, step_s=0.02)
        return seen

    def commit(self, directory: Path | None = None, **kw: Any) -> int:
        """Push (an honest update by default) with ?wait=true; returns the committed version."""
        response = self.push(directory or self.checkpoint(), wait=True, **kw)
        assert response.status_code == 200, response.text
        assert response.json()["stage"] == "committed"
        return int(response.json()["version"])

    # State ----------------------------------------------------------------------------------
    def versions(self) -> dict[int, dict[str, Any]]:
        data = self.get("/weights/versions", params={"limit": 1000})
        return {v["version"]: v for v in data["versions"]}

    def active(self) -> dict[str, Any]:
        return self.get("/weights/active")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v"}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def snapshot(self) -> dict[str, Any]:
        """What a refused request must leave as it was: every version (number, status,
        label), the last version number handed out, the queue, the active version and what each
        rank holds, and the uploads directory."""
        versions = self.versions()
        active = self.active()
        uploads = self.data_dir / "uploads"
        return {
            "versions": {v: (d["status"], d["label"]) for v, d in versions.items()},
            "queued": self.metrics()["refitd_updates_queued"],
            "active": active["active_version"],
            "epoch": active["epoch"],
            "ranks": [(r["rank"], r["version"], r.get("digest")) for r in active["ranks"]],
            "uploads": sorted(p.name for p in uploads.iterdir()) if uploads.exists() else [],
        }

    def wait_idle(self, timeout_s: float = UPDATE_TIMEOUT_S) -> None:
        """Until no update is queued or running."""

        def _idle() -> bool:
            return all(v["status"] in ("COMMITTED", "SUPERSEDED", "ROLLED_BACK", "REJECTED",
                                       "ABORTED") for v in self.versions().values())  # fmt: skip

        wait_until(_idle, timeout_s=timeout_s, step_s=0.1)

    def ranks_ready(self) -> bool:
        return all(r["alive"] and r["state"] == "READY" for r in self.active()["ranks"])


def daemon_env(
    *,
    config_path: Path,
    root: Path,
    tp_size: int = 2,
    launch: str = "local",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    return {
        "REFITD_AUTH__TRAINER_TOKEN": TRAINER,
        "REFITD_AUTH__ADMIN_TOKEN": ADMIN,
        "REFITD_RANKS__TP_SIZE": str(tp_size),
        "REFITD_RANKS__LAUNCH": launch,
        "REFITD_RANKS__DEVICE": "cpu",
        "REFITD_RANKS__HEARTBEAT_INTERVAL_S": "0.1",
        # A bound for a dead rank, not a trigger: on two busy cores a healthy agent importing
        # torch can stall its heartbeat for seconds.
        "REFITD_RANKS__HEARTBEAT_TIMEOUT_S": "5",
        "REFITD_RANKS__RESTART_BACKOFF_S": "0.1",
        "REFITD_ROLLOUT__PREPARE_DEADLINE_S": "10",
        "REFITD_ROLLOUT__COMMIT_DEADLINE_S": "10",
        "REFITD_MODEL__CONFIG": str(config_path),
        "REFITD_SOURCES__ALLOWED_ROOTS": json.dumps([str(root)]),
        **(extra or {}),
    }


_BASES: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture(scope="module")
def launch_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Api]]:
    """Start a daemon for this module: `launch_api(model="qwen2", tp_size=2, launch="local",
    env={...})`. With local ranks it waits until every rank is alive and records /readyz as
    the daemon first answered it (before any update). Every daemon is stopped afterwards."""
    started: list[DaemonProcess] = []

    def _launch(
        model: str = "qwen2",
        *,
        tp_size: int = 2,
        launch: str = "local",
        env: Mapping[str, str] | None = None,
    ) -> Api:
        home = tmp_path_factory.mktemp(f"api-{model}")
        root = home / "checkpoints"
        root.mkdir()
        config = CONFIGS[model]
        config_path = home / "config.json"
        config_path.write_text(json.dumps(config))
        daemon = DaemonProcess(
            home / "data",
            daemon_env(config_path=config_path, root=root, tp_size=tp_size, launch=launch,
                       extra=env),
        )  # fmt: skip
        started.append(daemon)
        daemon.start(wait=False)
        if model not in _BASES:  # while the daemon starts
            _BASES[model] = base_state(config, seed=0)
        daemon.wait_healthy(timeout_s=START_TIMEOUT_S)
        api = Api(daemon=daemon, root=root, model=model, config=config, base=_BASES[model])
        if launch == "local":
            wait_until(api.ranks_ready, timeout_s=START_TIMEOUT_S, step_s=0.1)
        ready = httpx.get(f"{api.url}/readyz", timeout=30)
        api.readyz_at_start = {"code": ready.status_code, **ready.json()}
        return api

    yield _launch
    for daemon in started:
        daemon.stop()


# refitctl ---------------------------------------------------------------------------------
@dataclass
class CtlResult:
    code: int
    stdout: str
    stderr: str


def refitctl(*args: str, url: str, token: str | None, timeout_s: float = 180.0) -> CtlResult:
    """Run the `refitctl` console script as a subprocess."""
    # The console script `make test` installs (refitctl = orchestrator.ctl:app).
    command = [str(Path(sys.executable).parent / "refitctl")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFITCTL_")}
    options = ["--url", url, *(["--token", token] if token else [])]
    proc = subprocess.run(
        [*command, *options, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=timeout_s,
    )  # fmt: skip
    return CtlResult(proc.returncode, proc.stdout, proc.stderr)


def unused_url() -> str:
    """A URL where no refitd answers: connections to it are refused."""
    return f"http://127.0.0.1:{refused_port()}"
