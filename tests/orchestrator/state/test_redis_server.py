from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError, RedisUnavailable
from orchestrator.settings import REPO_ROOT
from orchestrator.state.redis_client import connect, redact
from orchestrator.state.redis_server import EmbeddedRedis, unix_socket_path, unix_url
from tests.conftest import wait_until

CONF = REPO_ROOT / "configs" / "redis.conf"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_start_stop_restart_keeps_data(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, conf=CONF)
    url = server.start()
    pid = int(server.pidfile.read_text())
    with connect(url) as client:
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        # A unix socket only this user can reach, and no TCP at all.
        assert client.config_get("port")["port"] == "0"
        assert client.config_get("unixsocket")["unixsocket"] == str(server.socket)
        assert client.config_get("unixsocketperm")["unixsocketperm"] == "700"
        assert server.socket.stat().st_mode & 0o077 == 0
        client.set("refitd:test", "kept")
    server.stop()
    assert not _alive(pid)

    again = EmbeddedRedis(tmp_path, conf=CONF)
    url2 = again.start()
    try:
        with connect(url2) as client:
            assert client.get("refitd:test") == "kept"
    finally:
        again.stop()


def test_password_is_required_and_private(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, conf=CONF)
    server.start()
    try:
        assert (tmp_path / "redis" / "password").stat().st_mode & 0o077 == 0
        with pytest.raises(RedisUnavailable, match="refused the password"):
            connect(unix_url(server.socket), timeout_s=1)
    finally:
        server.stop()


def test_sigkill_of_the_owner_takes_redis_down(tmp_path: Path) -> None:
    """A refitd killed with SIGKILL leaves no redis-server behind (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from orchestrator.state.redis_server import EmbeddedRedis, unix_socket_path, unix_url
        s = EmbeddedRedis(Path({str(tmp_path)!r}), conf=Path({str(CONF)!r}))
        s.start()
        print(s.pidfile.read_text().strip(), flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    redis_pid = int(owner.stdout.readline())
    assert _alive(redis_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    wait_until(lambda: not _alive(redis_pid), timeout_s=10)


def test_leftover_server_on_the_data_dir_is_stopped(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path, conf=CONF)
    first.start()
    leftover = int(first.pidfile.read_text())
    second = EmbeddedRedis(tmp_path, conf=CONF)
    second.start()
    try:
        wait_until(lambda: not _alive(leftover) or first._proc.poll() is not None)  # type: ignore[union-attr]
        with connect(second.url) as client:
            assert client.ping()
    finally:
        second.stop()
        first.stop()


def test_missing_binary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        EmbeddedRedis(tmp_path, conf=CONF, binary="/nonexistent/redis-server").start()


def test_bad_conf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("no-such-directive yes\n")
    with pytest.raises(RedisUnavailable, match="exited with code"):
        EmbeddedRedis(tmp_path, conf=bad).start()


def test_redact_hides_the_password() -> None:
    assert redact("redis://:secret@127.0.0.1:1/0") == "redis://:***@127.0.0.1:1/0"
    assert redact("redis://user:secret@h:1") == "redis://user:***@h:1"
    assert redact("redis://h:1") == "redis://h:1"


def test_a_data_dir_too_long_for_a_socket_path_gets_a_short_private_one(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert unix_socket_path(deep / "redis") != deep / "redis" / "redis.sock"
    server = EmbeddedRedis(deep, conf=CONF)
    url = server.start()
    try:
        assert server.socket is not None and len(str(server.socket)) <= 103
        assert server.socket.parent.stat().st_mode & 0o077 == 0
        assert server.socket == unix_socket_path(deep / "redis")  # stable: a restart finds it
        with connect(url) as client:
            assert client.ping()
    finally:
        server.stop()


def test_the_url_carries_the_password_and_survives_odd_characters_in_the_path(
    tmp_path: Path,
) -> None:
    odd = tmp_path / "a dir?#%"
    server = EmbeddedRedis(odd, conf=CONF)
    url = server.start()
    try:
        assert url.startswith("unix://:") and url.endswith("?db=0")
        with connect(url) as client:
            assert client.ping()
        assert "***" in redact(url) and server._password() not in redact(url)
    finally:
        server.stop()
