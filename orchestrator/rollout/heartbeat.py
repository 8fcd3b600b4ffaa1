"""A rank agent's heartbeat, in a process of its own.

The agent's main thread stages multi-GiB shards; anything in it that holds the GIL for seconds
(parsing, hashing, a slow import) would starve a heartbeat thread, and the coordinator would call
a busy rank dead and abort the update (seen on an H200 with an 8B shard). A separate process
shares no GIL with that work. It beats while its parent lives and is not stopped, and exits when
the parent does: the parent holds the write end of its stdin, which the kernel closes on any
death of the parent, SIGKILL included. A parent stopped with SIGSTOP (or frozen by a debugger)
stops the beats too, so a paused rank looks dead, as it should.

Each beat is one `SET alive <instance> PX <timeout>`: the key's TTL is all that liveness needs,
and with `appendfsync always` every extra write per beat would be one more fsync on the disk that
holds the commit decisions.

Run by `Heartbeat.start()`; the Redis URL (which may hold a password) travels on stdin, never on
the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("refitd.heartbeat")

_STOPPED_STATES = {"T", "t"}


class Heartbeat:
    """The parent's handle on a heartbeat process."""

    def __init__(self, *, url: str, key: str, value: str, interval_s: float, ttl_s: float) -> None:
        self._spec = {
            "url": url,
            "key": key,
            "value": value,
            "interval_s": interval_s,
            "ttl_ms": max(1, int(ttl_s * 1000)),
            "parent": os.getpid(),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start beating (the first beat is written before this returns)."""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.rollout.heartbeat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(self._spec).encode() + b"\n")
        self._proc.stdin.flush()
        # The child answers once its first beat is in Redis (or says why it could not start).
        line = self._proc.stdout.readline().decode().strip()
        if line != "beating":
            self.stop()
            raise RuntimeError(f"the heartbeat process did not start: {line or 'no answer'}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop beating (the alive key then expires on its own, or the caller deletes it)."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _parent_stopped(pid: int) -> bool:
    """Whether `pid` is stopped (SIGSTOP, or traced); False where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[-1].split()[0] in _STOPPED_STATES


def _beat(spec: dict[str, Any]) -> None:
    import redis

    client = redis.Redis.from_url(spec["url"], socket_timeout=2.0, socket_connect_timeout=2.0)
    client.set(spec["key"], spec["value"], px=spec["ttl_ms"])
    sys.stdout.write("beating\n")
    sys.stdout.flush()
    interval = float(spec["interval_s"])
    down_since: float | None = None
    while True:
        # stdin turns readable at EOF: the parent closed it, or died.
        readable, _, _ = select.select([sys.stdin], [], [], interval)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return
        if os.getppid() != spec["parent"]:
            return
        if _parent_stopped(spec["parent"]):
            continue
        try:
            client.set(spec["key"], spec["value"], px=spec["ttl_ms"])
        except (redis.RedisError, OSError) as exc:
            # Logged once per outage, and its end once: not every beat.
            if down_since is None:
                down_since = time.monotonic()
                log.warning("heartbeat of %s: Redis does not answer (%s)", spec["key"], exc)
            continue
        if down_since is not None:
            log.info("heartbeat of %s: Redis answers again after %.1fs", spec["key"],
                     time.monotonic() - down_since)  # fmt: skip
            down_since = None


def main() -> None:
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        spec = json.loads(sys.stdin.buffer.readline())
        _beat(spec)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        with contextlib.suppress(OSError):
            sys.stdout.write(f"error: {exc!r}\n")
            sys.stdout.flush()
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
