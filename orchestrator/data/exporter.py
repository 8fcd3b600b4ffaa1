"""Who exported a buffer: the host (hostname and boot id), the user, and the process (pid and
its start time, so that a reused pid is never taken for the exporter).

A trainer names itself with `identity()` when it hands refitd its tensors; the daemon compares
that with its own host and user before it opens anything, and asks `running()` after its copy
(the exporter keeps its buffers alive while it runs and waits for the answer, so an exporter
still running after the copy means the copy read live memory).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of this machine (two containers of one host share it; two hosts never do)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text.rsplit(")", 1)[-1].split()


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if no such
    process is visible here."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def identity() -> dict[str, Any]:
    """This process as an exporter: {host, boot_id, uid, pid, start_time}."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "uid": os.getuid(),
        "pid": pid,
        "start_time": start_time(pid) or 0,
    }


def owner(pid: int) -> int | None:
    """The uid that owns process `pid`; None if it is not visible here."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def running(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` still runs (not exited, not a zombie
    whose memory is already gone, not another process that got its pid)."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= 19:
        return False
    return fields[0] != "Z" and int(fields[19]) == started
