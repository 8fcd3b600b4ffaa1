"""The embedded Redis: a private redis-server that refitd starts, owns and stops.

Its data lives in `<data_dir>/redis` (AOF, `appendfsync always`), so a second `refitd serve` on
the same data directory finds every key the first one wrote. It listens on a unix socket only
(`<data_dir>/redis/redis.sock`, mode 0700, TCP off): no port to race for, nothing on the network;
rank agents on this host reach it by its `unix://` URL. A password generated once and kept (mode
0600) beside the data guards it as well.

A server that dies (killed, or exiting by itself) is restarted by a watchdog thread on the same
socket with the same password, so every client (the daemon's, the rank agents') reconnects to the
same URL and finds the state its AOF kept. A server that keeps dying is given up on, and the
daemon exits non-zero for its supervisor to act.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import ConfigError, RedisUnavailable
from orchestrator.state import children
from orchestrator.state.redis_client import connect

log = logging.getLogger("refitd.redis")

# sun_path holds 108 bytes on Linux (104 on the BSDs), the terminating NUL included.
_MAX_SOCKET_PATH = 103
# Where a socket goes when its directory's path is too long. /tmp itself, not $TMPDIR: the point
# is a short path, and $TMPDIR may be as long as the data directory.
_SHORT_SOCKET_ROOT = Path("/tmp")
# How often the watchdog looks whether the server still runs: a dead Redis is noticed within
# this, well inside the clients' own retries of a dropped connection (redis_client.RETRIES).
_WATCH_INTERVAL_S = 0.1


def unix_socket_path(directory: Path, name: str = "redis.sock") -> Path:
    """Where a server whose files live in `directory` listens: `directory/name`, or, when that
    path is too long for a unix socket, a short private directory under /tmp (logged)."""
    preferred = directory.resolve() / name
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_PATH:
        return preferred
    tag = hashlib.sha256(os.fsencode(preferred)).hexdigest()[:16]
    short = _SHORT_SOCKET_ROOT / f"refitd-{os.getuid()}-{tag}"
    with contextlib.suppress(FileExistsError):
        short.mkdir(mode=0o700)
    info = short.lstat()
    # A directory someone else made (or a symlink) in /tmp must not receive our socket.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"{short} is not a private directory of this user; remove it")
    log.info("unix socket path %s is %d bytes, over the %d a socket path may have: using %s",
             preferred, len(os.fsencode(preferred)), _MAX_SOCKET_PATH, short / name)  # fmt: skip
    return short / name


def unix_url(path: Path, password: str | None = None, db: int = 0) -> str:
    """The redis-py URL of a server on unix socket `path`, e.g. unix://:PASSWORD@/dir/redis.sock?db=0"""
    auth = f":{urllib.parse.quote(password, safe='')}@" if password else ""
    return f"unix://{auth}{urllib.parse.quote(str(path))}?db={db}"


class EmbeddedRedis:
    """Start, wait for, and stop a redis-server under a data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        conf: Path,
        binary: str = "redis-server",
        start_timeout_s: float = 10.0,
    ) -> None:
        self.dir = data_dir / "redis"
        self.conf = conf
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.socket: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    @property
    def url(self) -> str:
        if self.socket is None:
            raise AssertionError("url is known once the server has started")
        return unix_url(self.socket, self._password())

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
        binary = shutil.which(self.binary)
        if binary is None:
            raise ConfigError(
                f"redis-server binary {self.binary!r} not found; install Debian's redis-server "
                "(apt-get install redis-server) or set redis.url to an existing server"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self.socket = unix_socket_path(self.dir)
        cmd = [
            binary,
            str(self.conf),
            "--unixsocket", str(self.socket),
            "--dir", str(self.dir),
            "--requirepass", self._password(),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
        ]  # fmt: skip
        # Started from the caller's thread, which must live as long as this server (the
        # daemon's main thread does): the death signal follows the thread that started it.
        self._proc = subprocess.Popen(
            children.command(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches refitd, which then stops Redis in order
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                tail = err.strip() or _tail(self.logfile)
                raise RedisUnavailable(
                    f"embedded redis-server exited with code {self._proc.returncode}: {tail}"
                )
            try:
                # No retries: this loop polls, and checks between polls that Redis still runs.
                connect(self.url, timeout_s=1.0, retries=0).close()
                break
            except RedisUnavailable:
                if time.monotonic() > deadline:
                    self._terminate()
                    raise RedisUnavailable(
                        f"embedded redis-server did not answer within {self.start_timeout_s}s "
                        f"(log: {self.logfile})"
                    ) from None
                time.sleep(0.05)
        log.info("embedded redis-server pid %d on unix socket %s, data in %s",
                 self._proc.pid, self.socket, self.dir)  # fmt: skip
        return self.url

    def watch(
        self, *, max_restarts: int, window_s: float, on_give_up: Callable[[str], None]
    ) -> None:
        """Restart the server whenever it dies, from a watchdog thread, up to `max_restarts`
        times in `window_s` seconds; past that, call `on_give_up(reason)` once and stop watching.

        A restarted server is started by the watchdog thread, and gets its death signal when that
        thread ends (children.py): `stop()` ends the thread and then stops the server."""
        self._watch_stop.clear()
        self._watcher = threading.Thread(
            target=self._watch,
            args=(max_restarts, window_s, on_give_up),
            name="redis-watchdog",
            daemon=True,
        )
        self._watcher.start()

    def _watch(self, max_restarts: int, window_s: float, on_give_up: Callable[[str], None]) -> None:
        deaths: deque[float] = deque()
        while not self._watch_stop.wait(_WATCH_INTERVAL_S):
            proc = self._proc
            if proc is not None and proc.poll() is None:
                continue
            now = time.monotonic()
            while deaths and now - deaths[0] > window_s:
                deaths.popleft()
            cause = _exit_cause(proc.returncode) if proc is not None else "did not start"
            if proc is not None and proc.stderr is not None:
                proc.stderr.close()
            if len(deaths) >= max_restarts:
                reason = (f"embedded redis-server {cause}, after {len(deaths)} restarts in "
                          f"{window_s:g}s; giving up (log: {self.logfile}: "
                          f"{_tail(self.logfile)})")  # fmt: skip
                log.error("%s", reason)
                on_give_up(reason)
                return
            deaths.append(now)
            pid = proc.pid if proc is not None else None
            log.warning("embedded redis-server (pid %s) %s; restarting it from its AOF",
                        pid, cause)  # fmt: skip
            try:
                self.start()
            except (RedisUnavailable, ConfigError, OSError) as exc:
                log.error("embedded redis-server did not restart: %s", exc)
                continue
            self.restarts += 1
            log.info("embedded redis-server is back after %.1fs (restart %d)",
                     time.monotonic() - now, self.restarts)  # fmt: skip

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the watchdog, then SIGTERM the server (Redis fsyncs the AOF and exits), and
        SIGKILL it if it does not exit."""
        self._watch_stop.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()
        self._terminate(timeout_s)

    def _terminate(self, timeout_s: float = 10.0) -> None:
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


def _exit_cause(returncode: int | None) -> str:
    if returncode is None:
        return "runs"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
