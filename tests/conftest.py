"""Fixtures that start real processes (redis-server, the daemon) and always stop them.

No port is picked in advance (a port found free and handed out later can be taken meanwhile):
redis-servers listen on unix sockets under the test's tmp_path, and a daemon's HTTP API binds
port 0 and the test reads the port it got from the process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from orchestrator.state.redis_server import unix_socket_path, unix_url

REDIS_BINARY = shutil.which("redis-server")
REDIS_CONF = REPO_ROOT / "configs" / "redis.conf"


@dataclass
class RedisProcess:
    """A real redis-server for one test (or session), with AOF as the daemon runs it, on a unix
    socket in its directory."""

    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return unix_socket_path(self.dir)

    @property
    def url(self) -> str:
        return unix_url(self.socket)

    def start(self) -> RedisProcess:
        if REDIS_BINARY is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_BINARY, str(REDIS_CONF), "--unixsocket", str(self.socket),
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
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

    def _start(name: str = "redis") -> RedisProcess:
        server = RedisProcess(tmp_path / name).start()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, step_s: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail the test on timeout. The timeout
    only bounds how long a broken test hangs: on two loaded cores, a process that handles a
    signal (a heartbeat to stop, Redis to write) has been seen to need more than 10 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(step_s)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not yet reaped) does not, nor one reaped between the
    two looks."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No REFITD_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("REFITD_"):
            monkeypatch.delenv(name)
    return monkeypatch


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on (its only one), read from /proc; None if none yet."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                # st 0A is LISTEN; local_address is HEXIP:HEXPORT.
                if fields[3] == "0A" and fields[9] in inodes:
                    return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def refused_port() -> int:
    """A loopback port where connections are refused for the rest of the session: bound (so
    nothing else can take it) and never listened on. For "the daemon is unreachable" tests."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


_HELD: list[socket.socket] = []


@dataclass
class DaemonProcess:
    """A real `refitd serve` process; its API binds port 0 and `port` is read from it."""

    data_dir: Path
    env: dict[str, str]
    port: int | None = None
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "the daemon has not started listening"
        return f"http://127.0.0.1:{self.port}"

    def start(self, *args: str, wait: bool = True) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
        env.update(
            {
                "REFITD_DATA_DIR": str(self.data_dir),
                "REFITD_SERVER__PORT": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        self.port = None
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
            if self.port is None:
                assert self.proc is not None
                self.port = listening_port(self.proc.pid)
                if self.port is None:
                    return False
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
