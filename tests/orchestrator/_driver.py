"""A daemon stand-in for crash tests: `python -m tests.orchestrator._driver --config FILE`.

Starts a real Refitd core (Redis connection, recovery; ranks.launch must be external, the test
runs the agents), prints {"started": true, "recovery": ...}, then for each stdin line
`rollout V` | `rollback` | `rollback V` takes the update lock, runs it, and prints one JSON line:
{"ok": true, "result": ...} or {"ok": false, "error": class name, "message": ...}.
A test SIGKILLs it to crash "the daemon" at a chosen point (or SIGSTOPs it to hold it there).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from orchestrator.errors import RefitError
from orchestrator.service.daemon import Refitd
from orchestrator.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    settings = load_settings(args.config)
    assert settings.ranks.launch == "external"
    # No daemon claim: tests run an observing Refitd beside this stand-in on the same prefix,
    # and a claim would refuse whichever starts second.
    core = Refitd(settings, claim=False)
    core.start()
    assert core.recovery is not None
    print(json.dumps({"started": True, "recovery": core.recovery.to_dict()}), flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            try:
                with core.update_lock(timeout_s=30) as lock:
                    assert lock.fence is not None
                    if words[0] == "rollout":
                        result = core.coordinator.rollout(int(words[1]), fence=lock.fence)
                    elif words[0] == "rollback":
                        target = int(words[1]) if len(words) > 1 else None
                        result = core.coordinator.rollback(target, fence=lock.fence)
                    else:
                        raise SystemExit(f"unknown command {line!r}")
                reply = {"ok": True, "result": result}
            except RefitError as exc:
                reply = {"ok": False, "error": type(exc).__name__, "message": exc.message}
            print(json.dumps(reply), flush=True)
    finally:
        core.stop()


if __name__ == "__main__":
    main()
