"""`refitd serve` as a real process: up, ready-or-why, clean stop, restart keeps state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from orchestrator.settings import REPO_ROOT
from orchestrator.state.redis_client import connect
from orchestrator.state.redis_server import unix_socket_path, unix_url
from tests.conftest import DaemonProcess

DEV = {"REFITD_DEV_MODE": "true", "REFITD_RANKS__LAUNCH": "external"}


def _redis_children(pid: int) -> set[int]:
    """redis-server processes whose parent is `pid`."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-x", "redis-server"], capture_output=True,
                         text=True).stdout  # fmt: skip
    return {int(p) for p in out.split()}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


def test_serve_answers_health_and_stops_its_redis(start_daemon, tmp_path: Path) -> None:
    daemon: DaemonProcess = start_daemon(DEV)
    assert daemon.proc is not None
    assert httpx.get(f"{daemon.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{daemon.url}/readyz")
    assert ready.status_code == 503
    assert "no version" in ready.json()["reason"]
    ours = _redis_children(daemon.proc.pid)
    assert len(ours) == 1, "serve starts exactly one embedded redis-server"
    (redis_pid,) = ours
    pidfile = daemon.data_dir / "redis" / "redis.pid"
    assert int(pidfile.read_text()) == redis_pid
    assert "embedded redis-server pid" in daemon.log()

    assert daemon.stop() == 0
    assert not _alive(redis_pid), "stopping the daemon leaves no redis-server running"
    assert "embedded redis-server stopped" in daemon.log()


def test_restart_on_the_same_data_dir_finds_its_keys(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(DEV)
    url = _embedded_url(daemon)
    with connect(url) as client:
        client.set("refitd:probe", "still-here")
    daemon.stop()
    again = start_daemon(DEV, data_dir=daemon.data_dir)
    with connect(_embedded_url(again)) as client:
        assert client.get("refitd:probe") == "still-here"


def test_a_second_daemon_on_the_same_data_dir_is_refused(start_daemon) -> None:
    first = start_daemon(DEV)
    second = start_daemon(DEV, data_dir=first.data_dir, wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 2
    assert "another refitd serve already runs" in second.log()


def _embedded_url(daemon: DaemonProcess) -> str:
    redis_dir = daemon.data_dir / "redis"
    password = (redis_dir / "password").read_text().strip()
    return unix_url(unix_socket_path(redis_dir), password)


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, (), "auth.trainer_token is not set"),
        ({"REFITD_DEV_MODE": "true", "REFITD_REDIS__URL": "redis://127.0.0.1:1/0"}, (),
         "does not answer"),
        ({"REFITD_DEV_MODE": "true", "REFITD_REDIS__SERVER_BINARY": "no-such-redis"}, (),
         "not on PATH"),
        ({"REFITD_DEV_MODE": "true"}, ("--config", "/nonexistent.yaml"), "does not exist"),
        ({"REFITD_DEV_MODE": "true", "REFITD_RANKS__TP_SIZE": "zero"}, (), "ranks.tp_size"),
    ],
)  # fmt: skip
def test_bad_settings_stop_serve_with_one_line(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
    full_env.update(env, REFITD_DATA_DIR=str(tmp_path / "d"))
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("refitd: error:")]
    assert len(errors) == 1


def test_a_model_the_tp_size_cannot_split_stops_serve(tmp_path: Path) -> None:
    config = {
        "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 128,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
    env.update(
        REFITD_DEV_MODE="true",
        REFITD_DATA_DIR=str(tmp_path / "d"),
        REFITD_RANKS__LAUNCH="external",
        REFITD_RANKS__TP_SIZE="8",
        REFITD_MODEL__CONFIG=str(tmp_path / "config.json"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve"],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("refitd: error:")]
    assert len(errors) == 1
    assert "tp_size" in errors[0] or "divis" in errors[0], errors[0]
    assert "Traceback" not in done.stderr


def test_a_port_in_use_stops_serve_with_one_line_before_anything_starts(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
    env.update(DEV, REFITD_DATA_DIR=str(tmp_path / "d"), REFITD_SERVER__PORT=str(port))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"refitd: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    assert not (tmp_path / "d" / "redis").exists(), "no Redis is started for a daemon that cannot"
