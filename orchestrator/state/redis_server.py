"""The embedded Redis: a private redis-server that refitd starts, owns and stops.

Its data lives in `<data_dir>/redis` (AOF, `appendfsync always`), so a second `refitd serve` on
the same data directory finds every key the first one wrote. It listens on loopback only, on a
free port, behind a password generated once and kept (mode 0600) beside the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

from orchestrator.errors import ConfigError, RedisUnavailable
from orchestrator.state.redis_client import connect

log = logging.getLogger("refitd.redis")

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """preexec_fn for a child refitd owns: the kernel sends it SIGTERM when refitd dies.

    If refitd is killed with SIGKILL, its redis-server then shuts down cleanly (with appendfsync
    always nothing acknowledged is lost) instead of lingering on the data dir; rank agents too."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """Start, wait for, and stop a redis-server under a data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        conf: Path,
        binary: str = "redis-server",
        start_timeout_s: float = 10.0,
        port: int | None = None,
    ) -> None:
        self.dir = data_dir / "redis"
        self.conf = conf
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise AssertionError("url is known once the server has started")
        return f"redis://:{self._password()}@127.0.0.1:{self.port}/0"

    def _password(self) -> str:
        path = self.dir / "password"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def start(self) -> str:
        """Start redis-server and wait for PING; returns its URL."""
        if not self.conf.exists():
            raise ConfigError(f"redis.conf not found at {self.conf}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        if self.port is None:
            self.port = free_port()
        cmd = [
            self.binary,
            str(self.conf),
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--requirepass", self._password(),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
        ]  # fmt: skip
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=die_with_parent,
                start_new_session=True,  # Ctrl-C reaches refitd, which then stops Redis in order
            )
        except FileNotFoundError:
            raise ConfigError(
                f"redis-server binary {self.binary!r} not found; install Debian's redis-server "
                "(apt-get install redis-server) or set redis.url to an existing server"
            ) from None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                tail = err.strip() or _tail(self.logfile)
                raise RedisUnavailable(
                    f"embedded redis-server exited with code {self._proc.returncode}: {tail}"
                )
            try:
                connect(self.url, timeout_s=1.0).close()
                break
            except RedisUnavailable:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisUnavailable(
                        f"embedded redis-server did not answer within {self.start_timeout_s}s "
                        f"(log: {self.logfile})"
                    ) from None
                time.sleep(0.05)
        log.info("embedded redis-server pid %d on 127.0.0.1:%d, data in %s",
                 self._proc.pid, self.port, self.dir)  # fmt: skip
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis fsyncs the AOF and exits), then SIGKILL if it does not."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM; killing", proc.pid)
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        log.info("embedded redis-server stopped")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def _stop_leftover(self) -> None:
        """A redis-server left from a crashed refitd still holds the AOF: stop it first."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if not _is_redis(pid):
            self.pidfile.unlink(missing_ok=True)
            return
        log.warning("stopping leftover redis-server pid %d on %s", pid, self.dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _is_redis(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_redis(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _is_redis(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
