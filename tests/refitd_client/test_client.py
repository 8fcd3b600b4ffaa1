"""refitd_client without a daemon: it imports with httpx and torch alone, packs tensors into
flat buckets whose tables and bytes are the tensors', and frees its buffers on every path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.data.flat import FlatShard
from orchestrator.data.ipc import open_handle
from orchestrator.settings import REPO_ROOT
from refitd_client import Client, Unreachable
from refitd_client.tensors import export_tensors
from tests.conftest import refused_port

# The daemon's server dependencies: a trainer's environment need not have them.
SERVER_ONLY = ("fastapi", "uvicorn", "redis", "pydantic_settings", "pydantic", "typer", "starlette")

_BLOCKED_IMPORT = f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError(f"{{name}} is blocked: the client must not need it")
        return None

sys.meta_path.insert(0, Block())
import torch
import refitd_client
from refitd_client.tensors import export_tensors

with export_tensors({{"w": torch.ones(3, 5)}}) as export:
    assert export.source()["buckets"][0]["handle"]["kind"] == "shm"
try:
    refitd_client.Client("http://127.0.0.1:{{port}}").push({{"w": torch.ones(2)}})
except refitd_client.Unreachable as exc:
    print("unreachable:", exc.detail)
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r}))
"""


def _shm_files() -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"refitd-{os.getpid()}-*.buf"))


def test_the_client_imports_and_exports_without_the_daemons_server_dependencies() -> None:
    code = _BLOCKED_IMPORT.replace("{port}", str(refused_port()))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("unreachable: cannot reach refitd at http://127.0.0.1:")
    assert lines[1] == "loaded: []"


def test_buckets_hold_every_tensor_bit_for_bit_within_the_bucket_size() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(64, 48, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(300, generator=gen),
        "c.bias": torch.randn(7, generator=gen).to(torch.float16),
        # Strided: packed as its values, not its storage.
        "d.weight": torch.randn(40, 30, generator=gen).to(torch.bfloat16).t(),
    }
    with export_tensors(iter(tensors.items()), bucket_bytes=7000) as export:
        buckets = export.source()["buckets"]
        # Taken in order, a bucket closing when the next tensor would pass 7000 bytes (a's 6144
        # and b's 1200 would); within a bucket, flat.py's order (itemsize, then name).
        assert [[e["name"] for e in b["tensors"]] for b in buckets] == [
            ["a.weight"], ["b.weight", "c.bias", "d.weight"]]  # fmt: skip
        assert export.tensors == 4
        for bucket in buckets:
            table = FlatShard.layout_from_json(bucket["tensors"])
            nbytes = sum(e.nbytes for e in table)
            with open_handle(bucket["handle"]) as mapped:
                shard = FlatShard(mapped.clone(), table, nbytes)
            assert shard.digest() == bucket["digest"]
            for name, view in shard.views().items():
                assert torch.equal(view, tensors[name]), name
        assert len(_shm_files()) == 2
    assert _shm_files() == []


@pytest.mark.parametrize(
    ("named", "error"),
    [
        ([("w", torch.ones(2)), ("w", torch.ones(2))], "tensor 'w' is given twice"),
        ([("w", [1.0])], "w: a torch.Tensor, got list"),
        ([("", torch.ones(2))], "a tensor name is a non-empty string"),
        ([], "no tensors to push"),
        ([("a", torch.ones(2)), ("w", torch.ones(2, device="meta"))], "tensors on meta"),
    ],
    ids=["twice", "not-a-tensor", "no-name", "empty", "meta"],
)
def test_what_cannot_be_pushed_is_refused_before_anything_is_sent_and_nothing_leaks(
    named: list[tuple[str, object]], error: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        export_tensors(iter(named))  # type: ignore[arg-type]
    assert _shm_files() == []


def test_an_unreachable_daemon_is_a_clear_error_and_the_buckets_are_freed() -> None:
    url = f"http://127.0.0.1:{refused_port()}"
    with Client(url, "token") as client, pytest.raises(Unreachable) as unreachable:
        client.push({"w": torch.ones(4, 4)})
    assert unreachable.value.detail.startswith(f"cannot reach refitd at {url}: ")
    assert _shm_files() == []
