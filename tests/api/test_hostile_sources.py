"""Hostile sources and a hostile data directory against a real `refitd serve`: a FIFO in a
checkpoint, a file rewritten between submission and the pipeline's read, a full disk under an
upload, a header that names a tensor twice. Each gets a clear JSON answer (or a REJECTED version
with the reason), leaves nothing behind, and the daemon keeps answering.

One daemon for the module: a tiny Qwen2 at TP 2 whose rank agents are external and never
started, so an accepted update that passes every check ends ABORTED, never committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator.rollout.lock import UpdateLock
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from orchestrator.state.redis_server import unix_socket_path, unix_url
from tests.api.conftest import TRAINER, Api, refitctl
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(launch_api) -> Api:
    return launch_api("qwen2", tp_size=2, launch="external")


def _answering(api: Api) -> None:
    assert httpx.get(f"{api.url}/healthz", timeout=30).status_code == 200
    api.versions()


def _redis_url(api: Api) -> str:
    redis_dir = api.data_dir / "redis"
    return unix_url(unix_socket_path(redis_dir), (redis_dir / "password").read_text().strip())


def test_a_fifo_in_a_checkpoint_is_refused_at_the_door_without_blocking(api: Api) -> None:
    ckpt = api.root / "fifo-ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "model.safetensors")  # nothing ever opens it for writing
    before = api.snapshot()
    response = api.push(ckpt)
    assert response.status_code == 422, response.text
    assert f"{ckpt / 'model.safetensors'} is not a regular file" in response.json()["detail"]
    assert api.snapshot() == before
    _answering(api)


def test_a_source_truncated_before_the_pipeline_reads_it_rejects_the_version(api: Api) -> None:
    """The test holds the update lock, so the accepted update waits (taken off the queue) until
    the test has cut its file in half: the pipeline then reads the changed file."""
    before = api.snapshot()
    ckpt = api.checkpoint()
    file = ckpt / "model.safetensors"
    keys = Keys()
    with connect(_redis_url(api)) as client:
        held = UpdateLock(client, keys, ttl_s=60, owner="test-holds-the-pipeline")
        held.acquire()
        try:
            response = api.push(ckpt)
            assert response.status_code == 202, response.text
            wait_until(lambda: client.llen(keys.update_queue) == 0)  # taken: waits for the lock
            os.truncate(file, file.stat().st_size // 2)
        finally:
            held.release()
    accepted = response.json()
    final = api.follow(accepted["update_id"])[-1]
    assert (final["status"], final["stage"]) == ("failed", "rejected"), final
    # Its header is checked again before the read: the cut shows there, naming the file.
    assert "model.safetensors is not a valid safetensors file" in final["error"], final
    assert "not fully covered" in final["error"], final
    version = api.versions()[accepted["version"]]
    assert version["status"] == "REJECTED"
    after = api.snapshot()
    for key in ("active", "epoch", "ranks"):
        assert after[key] == before[key], key
    _answering(api)


def _duplicated_header(data: bytes) -> bytes:
    """The same safetensors bytes, with the header's first tensor entry written twice (the JSON
    text repeats the key; a parser into a map keeps one of them)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    entries = [json.dumps(k) + ":" + json.dumps(v) for k, v in header.items()]
    entries.insert(0, json.dumps(name) + ":" + json.dumps(header[name]))
    text = ("{" + ",".join(entries) + "}").encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


@pytest.mark.parametrize("via", ["path", "upload"])
def test_a_header_that_names_a_tensor_twice_is_refused_at_the_door(api: Api, via: str) -> None:
    data = _duplicated_header(api.bytes_of())
    before = api.snapshot()
    if via == "path":
        ckpt = api.root / f"twice-{api.next_seed()}"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(data)
        response = api.push(ckpt)
    else:
        response = api.upload(data)
    assert response.status_code == 422, response.text
    assert "twice" in response.json()["detail"], response.text
    assert api.snapshot() == before


@contextlib.contextmanager
def _tmpfs_over(directory: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted over `directory` (root only: skips otherwise), unmounted afterwards."""
    directory.mkdir(exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture
def full_uploads(api: Api) -> Iterator[Path]:
    """The daemon's uploads directory on an 8 MiB tmpfs, which the test fills."""
    with _tmpfs_over(api.data_dir / "uploads", "size=8m") as uploads:
        yield uploads


def test_an_unwritable_data_directory_answers_503_and_keeps_nothing(api: Api) -> None:
    before = api.snapshot()
    with _tmpfs_over(api.data_dir / "uploads", "size=8m,ro"):
        response = api.upload(api.bytes_of())
    assert response.status_code == 503, response.text
    assert response.json()["detail"] == (
        "the data directory cannot be written (Read-only file system) while storing an upload "
        f"in {api.data_dir / 'uploads'}; nothing was kept: send it again once the data directory "
        "is writable"
    )
    assert api.snapshot() == before
    _answering(api)


def test_a_full_disk_under_an_upload_answers_507_and_keeps_nothing(
    api: Api, full_uploads: Path
) -> None:
    data = api.bytes_of()
    free = os.statvfs(full_uploads).f_bavail * os.statvfs(full_uploads).f_frsize
    assert free > len(data), "the checkpoint must be too big only once the filler is there"
    filler = full_uploads / "filler"
    filler.write_bytes(b"\0" * (free - len(data) // 2))
    before = api.snapshot()
    response = api.upload(data)
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert "the data directory's filesystem is full (No space left on device)" in detail, detail
    assert "free space there, or send a path source instead" in detail, detail
    assert sorted(p.name for p in full_uploads.iterdir()) == ["filler"]  # nothing left behind
    assert api.snapshot() == before
    _answering(api)

    # With room again, the same bytes are accepted.
    filler.unlink()
    response = api.upload(data)
    assert response.status_code == 202, response.text
    api.follow(response.json()["update_id"])


def test_refitctl_shows_control_characters_of_a_label_escaped(api: Api) -> None:
    """A trainer's label reaches the operator's terminal through refitctl: ESC (a colour or a
    screen clear), CR (overwrite the line), a bidi override must be shown, never obeyed."""
    label = "step-7\x1b[2J\x1b[31m\r\u202eevil\x07"
    response = api.push(api.checkpoint(), label=label)
    assert response.status_code == 202, response.text
    version = response.json()["version"]
    api.follow(response.json()["update_id"])
    assert api.versions()[version]["label"] == label  # stored as sent; escaped when shown
    escaped = "step-7\\x1b[2J\\x1b[31m\\r\\u202eevil\\x07"
    listed = refitctl("versions", url=api.url, token=TRAINER)
    shown = refitctl("show", str(version), url=api.url, token=TRAINER)
    for result in (listed, shown):
        assert result.code == 0, result.stderr
        assert escaped in result.stdout, result.stdout
        hidden = [c for c in result.stdout if unicodedata.category(c) in ("Cc", "Cf") and c != "\n"]
        assert hidden == [], hidden


def test_a_client_that_disconnects_mid_upload_is_one_warning_and_leaves_nothing(api: Api) -> None:
    before = api.snapshot()
    mark = len(api.daemon.log().splitlines())
    declared = 10 * 2**20
    with socket.create_connection(("127.0.0.1", api.daemon.port or 0)) as conn:
        conn.sendall(
            b"POST /weights/update HTTP/1.1\r\nHost: refitd\r\n"
            + f"Authorization: Bearer {TRAINER}\r\n".encode()
            + b"Content-Type: application/octet-stream\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + b"\0" * 2**20
        )
    # Closed with 9 MiB still owed: the daemon says so once, as a warning.
    wait_until(lambda: any("disconnected" in line for line in api.daemon.log().splitlines()[mark:]),
               timeout_s=60)  # fmt: skip
    after = api.daemon.log().splitlines()[mark:]
    said = [line for line in after if "disconnected" in line]
    assert len(said) == 1 and "WARNING" in said[0], said
    assert "nothing was kept" in said[0] and f"of {declared} declared" in said[0], said
    assert not any("Traceback" in line or "ERROR" in line for line in after), after
    assert not [p.name for p in (api.data_dir / "uploads").iterdir() if p.name.endswith(".partial")]
    assert api.snapshot() == before
    _answering(api)
