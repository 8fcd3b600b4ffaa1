"""Named points where a test can make the daemon die or wait, to prove what happens at each step
of a protocol (as FoundationDB's and TiKV's failpoints do). Off unless REFITD_FAILPOINTS is set;
then a point costs one dict lookup.

    REFITD_FAILPOINTS="artifact.background=exit"                 die there (exit code 137)
    REFITD_FAILPOINTS="artifact.background=wait-file:/tmp/go"    wait there until /tmp/go exists
                                                                 (having created /tmp/go.waiting)
    REFITD_FAILPOINTS="rank1.dist.bucket=shutdown-sockets-if:/tmp/armed"
                                  if /tmp/armed exists: remove it, and shut down every TCP
                                  connection of this process (a partition, seen from here)

Points: `artifact.background` (a committed version's artifact is about to be written after its
commit, service/artifact_writer.py); `pipeline.loading` (an update's first stage begins,
service/stages.py); `ipc.copied` (the door has copied a trainer's tensors, still holds their
mappings, and has not yet checked that the trainer still runs, service/tensor_source.py);
`rank<R>.dist.rendezvous` (rank R's agent reached the daemon's store, its group is not formed
yet), `rank<R>.dist.header` (the group is formed and the transfer's header checked) and
`rank<R>.dist.bucket` (the first bucket arrived, not the rest), rollout/dist_recv.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("refitd.failpoints")

_ENV = "REFITD_FAILPOINTS"


def _parse(raw: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, action = item.partition("=")
        points[name.strip()] = action.strip()
    return points


_POINTS = _parse(os.environ.get(_ENV, ""))


def hit(name: str) -> None:
    """Act as REFITD_FAILPOINTS says for `name`; nothing when it names no action for it."""
    action = _POINTS.get(name)
    if not action:
        return
    log.warning("failpoint %s: %s", name, action)
    if action == "exit":
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(137)
    if action.startswith("shutdown-sockets-if:"):
        armed = Path(action.removeprefix("shutdown-sockets-if:"))
        with contextlib.suppress(FileNotFoundError):
            armed.unlink()  # one shot: the test arms it again for the next time
            _shutdown_tcp_sockets()
        return
    if action.startswith("wait-file:"):
        path = Path(action.removeprefix("wait-file:"))
        # Tells a test that this process is now waiting here.
        path.with_name(path.name + ".waiting").touch()
        while not path.exists():
            time.sleep(0.01)
        return
    raise ValueError(f"{_ENV}: unknown action {action!r} for {name}")


def _shutdown_tcp_sockets() -> None:
    """Shut down (both directions) every connected TCP socket this process holds: its peers see
    the connection close, as in a network partition, while the process itself lives on."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            # A socket object on a duplicate of the descriptor: shutdown() acts on the
            # connection they share, close() only on the duplicate.
            sock = socket.socket(fileno=os.dup(int(fd)))
            with sock:
                if sock.type == socket.SOCK_STREAM and sock.family in (
                    socket.AF_INET, socket.AF_INET6,
                ):  # fmt: skip
                    sock.getpeername()  # raises if it is not connected (a listening socket)
                    sock.shutdown(socket.SHUT_RDWR)
