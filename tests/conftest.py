"""Fixtures that start real processes (redis-server, the daemon) on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import torch

# Triton reads TRITON_INTERPRET when a kernel is first launched; set it before any test module
# imports kernels, so the CPU runs the kernels in the interpreter whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from orchestrator.settings import REPO_ROOT
from orchestrator.state.redis_client import connect
from orchestrator.state.redis_server import free_port

REDIS_BINARY = shutil.which("redis-server")
REDIS_CONF = REPO_ROOT / "configs" / "redis.conf"


@dataclass
class RedisProcess:
    """A real redis-server for one test (or session), with AOF as the daemon runs it."""

    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        if REDIS_BINARY is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_BINARY, str(REDIS_CONF), "--port", str(self.port), "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        connect(self.url, wait_s=10).close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync beyond what appendfsync always did."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> redis.Redis:
        return connect(self.url)


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis-session")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_session: RedisProcess) -> str:
    """A real Redis shared by the session, emptied before each test."""
    with redis_session.client() as client:
        client.flushall()
    return redis_session.url


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Start private redis-servers a test may kill and restart; all are stopped afterwards."""
    started: list[RedisProcess] = []

    def _start(name: str = "redis", port: int | None = None) -> RedisProcess:
        server = RedisProcess(tmp_path / name, **({"port": port} if port else {})).start()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, step_s: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(step_s)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No REFITD_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("REFITD_"):
            monkeypatch.delenv(name)
    return monkeypatch


@dataclass
class DaemonProcess:
    """A real `refitd serve` process on a free port."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *args: str, wait: bool = True) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
        env.update(
            {
                "REFITD_DATA_DIR": str(self.data_dir),
                "REFITD_SERVER__PORT": str(self.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "daemon.log"
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
        )
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        def _up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"refitd serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(_up, timeout_s=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real `refitd serve` processes; every one is stopped after the test."""
    started: list[DaemonProcess] = []

    def _start(
        env: dict[str, str] | None = None,
        *args: str,
        data_dir: Path | None = None,
        wait: bool = True,
    ) -> DaemonProcess:
        daemon = DaemonProcess(data_dir or tmp_path / "data", dict(env or {}))
        started.append(daemon)
        return daemon.start(*args, wait=wait)

    yield _start
    for daemon in started:
        daemon.stop()
