"""A receiving process for the ipc tests: open the handle given as JSON in argv[1], copy its
bytes into a tensor of our own, close the handle, print {"digest", "nbytes", "device"} as JSON.
On a refused handle, print {"error", "message"} and exit 3.

    python -m tests.orchestrator.data._receiver '{"kind": "shm", ...}'
"""

from __future__ import annotations

import json
import sys

import torch

from kernels.digest import digest
from orchestrator.data.ipc import open_handle
from orchestrator.errors import RefitError


def main() -> int:
    handle = json.loads(sys.argv[1])
    try:
        with open_handle(handle) as remote:
            mine = torch.empty_like(remote)
            mine.copy_(remote)
            device = str(remote.device)
        if mine.is_cuda:
            torch.cuda.synchronize()
    except RefitError as e:
        print(json.dumps({"error": type(e).__name__, "message": e.message}))
        return 3
    print(json.dumps({"digest": digest(mine), "nbytes": mine.numel(), "device": device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
