"""refitd's client, for trainers and for `refitctl push`: push a trainer's tensors (CUDA or CPU,
handed over by CUDA IPC or shared memory, on refitd's host) or a safetensors path, and follow the
update to its end.

    from refitd_client import Client

    with Client("http://127.0.0.1:8470", token) as refitd:
        record = refitd.push(model.state_dict(), label=f"step-{step}")

Needs httpx and torch only (not the daemon's server dependencies); torch is imported when
tensors are pushed, not before.
"""

from refitd_client.client import DEFAULT_URL, Client
from refitd_client.errors import (
    Aborted,
    Busy,
    RefitdError,
    Refused,
    Rejected,
    StillRunning,
    Unreachable,
    UpdateFailed,
)

__all__ = [
    "DEFAULT_URL",
    "Aborted",
    "Busy",
    "Client",
    "RefitdError",
    "Refused",
    "Rejected",
    "StillRunning",
    "Unreachable",
    "UpdateFailed",
]
