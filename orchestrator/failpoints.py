"""Named points where a test can make the daemon die or wait, to prove what happens at each step
of a protocol (as FoundationDB's and TiKV's failpoints do). Off unless REFITD_FAILPOINTS is set;
then a point costs one dict lookup.

    REFITD_FAILPOINTS="artifact.background=exit"                 die there (exit code 137)
    REFITD_FAILPOINTS="artifact.background=wait-file:/tmp/go"    wait there until /tmp/go exists

Points: `artifact.background` (a committed version's artifact is about to be written after its
commit, service/artifact_writer.py); `pipeline.loading` (an update's first stage begins,
service/stages.py); `ipc.copied` (the door has copied a trainer's tensors, still holds their
mappings, and has not yet checked that the trainer still runs, service/tensor_source.py).
"""

from __future__ import annotations

import logging
import os
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
    if action.startswith("wait-file:"):
        path = Path(action.removeprefix("wait-file:"))
        while not path.exists():
            time.sleep(0.01)
        return
    raise ValueError(f"{_ENV}: unknown action {action!r} for {name}")
