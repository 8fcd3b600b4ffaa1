"""Hand-off of a flat buffer to another process on this host: real receiving processes
(tests/orchestrator/data/_receiver.py) get the exporter's bytes bit for bit, or a clear error."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing import reductions

from kernels.digest import digest
from orchestrator.data.flat import pack
from orchestrator.data.ipc import (
    REBUILD_PARAMS,
    SHM_PREFIX,
    Exported,
    HandleUnavailable,
    SharedBuffer,
    export,
    open_handle,
    remove_stale_shared_buffers,
)
from tests.kernels.shapes import seed_for

REPO = Path(__file__).resolve().parents[3]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = {"capture_output": True, "text": True, "check": True, "timeout": 60}


def receive(handle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Run a receiving process on the handle; its exit code and its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.orchestrator.data._receiver", json.dumps(handle)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def random_bytes(n: int, *tag: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for("ipc", n, *tag))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    # The product default is /dev/shm; tests keep their files in their own directory.
    return tmp_path


def test_a_shard_in_shared_memory_arrives_bit_for_bit_in_another_process(shm_dir):
    g = torch.Generator().manual_seed(seed_for("ipc-shard"))
    tensors = {
        "w": torch.randn(33, 70, generator=g).to(torch.float8_e4m3fn),
        "s": torch.randn(1, 3, generator=g),
        "b": torch.randn(77, generator=g).to(torch.bfloat16),
    }
    with Exported() as exported:
        shared = SharedBuffer.create(8192, dir=shm_dir)
        shard = pack(tensors, device="cpu", out=shared.tensor)
        handle = exported.export(shard.buffer)
        assert json.loads(json.dumps(handle)) == handle
        assert handle["kind"] == "shm" and handle["nbytes"] == shard.buffer.numel()
        code, answer = receive(handle)
    assert code == 0, answer
    want = {"digest": digest(shard.buffer), "nbytes": shard.buffer.numel(), "device": "cpu"}
    assert answer == want


def test_a_slice_of_a_shared_buffer_arrives_from_its_offset(shm_dir):
    with SharedBuffer.create(4096, dir=shm_dir) as shared:
        shared.tensor.copy_(random_bytes(4096, "slice"))
        part = shared.tensor[1024:3072]
        handle = export(part)
        assert handle["offset"] == 1024
        code, answer = receive(handle)
    assert code == 0, answer
    assert answer["digest"] == digest(part)


def test_a_released_handle_gives_a_clear_error_in_the_receiver(shm_dir):
    exported = Exported()
    shared = SharedBuffer.create(1024, dir=shm_dir)
    handle = exported.export(shared)
    exported.release()
    assert not shared.path.exists()
    code, answer = receive(handle)
    assert code == 3
    assert answer["error"] == "HandleUnavailable"
    assert "released or never created" in answer["message"]


def test_a_receiver_that_opened_before_the_release_keeps_its_bytes(shm_dir):
    shared = SharedBuffer.create(256, dir=shm_dir)
    shared.tensor.copy_(random_bytes(256, "early"))
    with open_handle(export(shared.tensor)) as remote:
        shared.release()
        assert torch.equal(remote, shared.tensor)


def test_a_shared_buffer_is_private_unique_and_released_once(shm_dir):
    a = SharedBuffer.create(64, dir=shm_dir)
    b = SharedBuffer.create(64, dir=shm_dir)
    assert a.path != b.path and a.path.name.startswith(SHM_PREFIX)
    assert stat.S_IMODE(a.path.stat().st_mode) == 0o600
    assert a.path.stat().st_size == 64 and not a.tensor.any()
    a.release()
    a.release()
    assert not a.path.exists() and b.path.exists()
    b.release()


def test_the_shared_buffers_of_a_dead_process_are_swept_and_live_ones_kept(shm_dir):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **TEXT)
    dead_pid = int(child.stdout)
    stale = shm_dir / f"{SHM_PREFIX}{dead_pid}-abc.buf"
    stale.write_bytes(b"x" * 16)
    live = SharedBuffer.create(16, dir=shm_dir)
    assert live.path.name.startswith(f"{SHM_PREFIX}{os.getpid()}-")
    # A dead pid's name, but a process holds the file's lock: its creator, in another pid
    # namespace that shares /dev/shm. The lock says it is in use.
    held = shm_dir / f"{SHM_PREFIX}{dead_pid}-held.buf"
    held.write_bytes(b"x" * 16)
    holder = os.open(held, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    # Names a hostile user can write there: none may stop a daemon's start, and none goes.
    odd = [shm_dir / f"{SHM_PREFIX}{n}-x.buf" for n in ("99999999999", "2147483648", "²", "")]
    for path in odd:
        path.write_bytes(b"")
    fifo = shm_dir / f"{SHM_PREFIX}{dead_pid}-fifo.buf"
    os.mkfifo(fifo)
    try:
        assert remove_stale_shared_buffers(shm_dir) == [stale]
        assert not stale.exists() and live.path.exists() and held.exists() and fifo.exists()
        assert all(path.exists() for path in odd)
    finally:
        os.close(holder)
    # Its holder gone, the dead pid's file goes too.
    assert remove_stale_shared_buffers(shm_dir) == [held]
    live.release()


def test_a_cpu_tensor_outside_shared_memory_is_refused():
    with pytest.raises(ValueError, match="SharedBuffer"):
        export(torch.zeros(64, dtype=torch.uint8))


def test_an_export_that_was_released_refuses_more(shm_dir):
    exported = Exported()
    exported.release()
    with pytest.raises(HandleUnavailable, match="released"):
        exported.export(SharedBuffer.create(16, dir=shm_dir))
    released = SharedBuffer.create(16, dir=shm_dir)
    released.release()
    with pytest.raises(HandleUnavailable, match="released"):
        export(released.tensor)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nbytes": 8192}, "holds 1024 bytes"),
        ({"offset": 1000}, "holds 1024 bytes"),
        ({"nbytes": -1}, "malformed"),
        ({"path": 7}, "malformed"),
        ({"path": "/etc/passwd"}, "not a refitd shared buffer"),
        ({"kind": "pickle"}, "unknown handle kind"),
    ],
)
def test_a_wrong_handle_is_refused_with_what_is_wrong(shm_dir, change, message):
    with SharedBuffer.create(1024, dir=shm_dir) as shared:
        handle = {**export(shared.tensor), **change}
        with pytest.raises(HandleUnavailable, match=message), open_handle(handle):
            pass


def test_a_fifo_at_a_handle_path_is_refused_without_blocking(shm_dir):
    fifo = shm_dir / f"{SHM_PREFIX}fifo.buf"
    os.mkfifo(fifo)
    handle = {"kind": "shm", "path": str(fifo), "nbytes": 16, "offset": 0}
    with pytest.raises(HandleUnavailable, match="not a regular file"), open_handle(handle):
        pass


def test_the_cuda_handle_fields_match_this_torch():
    # The JSON handle maps onto rebuild_cuda_tensor's parameters by name and position.
    assert tuple(inspect.signature(reductions.rebuild_cuda_tensor).parameters) == REBUILD_PARAMS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_cuda_handle_without_a_gpu_is_refused_clearly():
    handle = {"kind": "cuda", "device": 0, "nbytes": 16}
    with pytest.raises(HandleUnavailable, match="no CUDA device"), open_handle(handle):
        pass


# ---- CUDA IPC ------------------------------------------------------------------------------


@pytest.mark.gpu
@GPU
def test_gpu_a_cuda_buffer_arrives_bit_for_bit_in_another_process():
    buf = random_bytes(64 * 1024 * 1024 + 48, "cuda").cuda()
    with Exported() as exported:
        handle = exported.export(buf)
        assert handle["kind"] == "cuda" and json.loads(json.dumps(handle)) == handle
        code, answer = receive(handle)
    assert code == 0, answer
    assert answer["digest"] == digest(buf) == digest(buf.cpu())
    assert answer["device"].startswith("cuda")


@pytest.mark.gpu
@GPU
def test_gpu_a_slice_of_a_larger_allocation_arrives_from_its_offset():
    whole = random_bytes(1 << 22, "cuda-slice").cuda()
    part = whole[4096 : 4096 + (1 << 20)]
    with Exported() as exported:
        code, answer = receive(exported.export(part))
    assert code == 0, answer
    assert answer["digest"] == digest(part)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("receivers", [0, 1], ids=["never-opened", "opened"])
def test_gpu_release_frees_the_memory_whether_or_not_a_receiver_opened_it(receivers):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    buf = torch.ones(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    exported = Exported()
    handle = exported.export(buf)
    for _ in range(receivers):
        assert receive(handle)[0] == 0
    exported.release()
    del buf
    torch.cuda.ipc_collect()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
@GPU
def test_gpu_a_handle_of_an_invisible_gpu_is_refused_clearly():
    buf = torch.zeros(64, dtype=torch.uint8, device="cuda")
    with Exported() as exported:
        handle = {**exported.export(buf), "device_uuid": "GPU-00000000-not-here"}
        code, answer = receive(handle)
    assert code == 3 and "not visible" in answer["message"]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this host")
def test_shared_buffers_live_in_dev_shm_by_default():
    with SharedBuffer.create(32) as shared:
        assert shared.path.parent == Path("/dev/shm") and shared.path.exists()
    assert not shared.path.exists()
