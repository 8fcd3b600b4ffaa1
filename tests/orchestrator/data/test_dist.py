"""The torch.distributed link on real gloo groups over loopback (sender and receiver in two
threads of this process, each with its own group object and sockets): bytes arrive exactly,
a mismatched or absent peer is an error and never a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from orchestrator.data.dist import (
    RECEIVER,
    SENDER,
    Bounded,
    Link,
    TransferFailed,
    connect_store,
    open_store,
)

BUCKET = 4096
# Awkward sizes around the bucket: smaller than one, one short, exact, several and a tail.
SIZES = (1, BUCKET - 1, BUCKET, 3 * BUCKET + 5, 1 << 20)
# Bounds for "it never happened", not the way the tests make things happen.
NEVER_S = 30.0


def _pair(group: str) -> tuple[Link, Link]:
    store = open_store("127.0.0.1", NEVER_S)
    deadline = time.monotonic() + NEVER_S
    out: dict[str, Any] = {}

    def receiver() -> None:
        client = connect_store(f"127.0.0.1:{store.port}", deadline)
        out["link"] = Link.join(client, group=group, role=RECEIVER, backend="gloo",
                                device="cpu", bind_host="127.0.0.1", deadline=deadline)  # fmt: skip

    thread = threading.Thread(target=receiver)
    thread.start()
    sender = Link.join(store, group=group, role=SENDER, backend="gloo", device="cpu",
                       bind_host="127.0.0.1", deadline=deadline)  # fmt: skip
    thread.join(NEVER_S)
    return sender, out["link"]


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Link, Link]]:
    sender, receiver = _pair("test-pair")
    yield sender, receiver
    sender.close()
    receiver.close()


def _transfer(
    pair: tuple[Link, Link], data: torch.Tensor, **recv: Any
) -> tuple[torch.Tensor, list[str]]:
    sender, receiver = pair
    deadline = time.monotonic() + NEVER_S
    out = torch.zeros_like(data)
    phases: list[str] = []
    task = Bounded(
        lambda: receiver.recv_into(
            out, bucket_bytes=BUCKET, deadline=deadline, phase=phases.append, **recv
        ),
        name="recv",
    )
    error = None
    try:
        sender.send(data, version=7, bucket_bytes=BUCKET, deadline=deadline,
                    stage=recv.get("stage"))  # fmt: skip
    except TransferFailed as exc:
        error = exc
    task.wait(deadline)
    assert error is None, error
    return out, phases


@pytest.mark.parametrize("stage", [False, True], ids=["in-place", "staged"])
@pytest.mark.parametrize("size", SIZES)
def test_a_buffer_arrives_bit_for_bit_in_buckets(pair, size: int, stage: bool) -> None:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    out, phases = _transfer(pair, data, version=7, stage=stage)
    assert torch.equal(out, data)
    assert phases == ["header", "bucket"]


def test_a_receiver_expecting_another_version_refuses_the_transfer() -> None:
    sender, receiver = _pair("test-mismatch")
    try:
        deadline = time.monotonic() + NEVER_S
        data = torch.randint(0, 256, (BUCKET,), dtype=torch.uint8)
        # The header goes out; the receiver reads it and refuses before any bucket moves.
        task = Bounded(lambda: sender.send(data, version=8, bucket_bytes=BUCKET,
                                           deadline=deadline), name="send")  # fmt: skip
        with pytest.raises(TransferFailed, match=r"announced .*\(\d+, 8, 4096, 4096\)"):
            receiver.recv_into(torch.empty_like(data), version=9, bucket_bytes=BUCKET,
                               deadline=deadline)  # fmt: skip
        assert task.error is None or isinstance(task.error, TransferFailed)
    finally:
        sender.close()
        receiver.close()


def test_a_group_whose_peer_never_joins_fails_by_its_deadline() -> None:
    store = open_store("127.0.0.1", NEVER_S)
    with pytest.raises(TransferFailed, match="could not be formed"):
        Link.join(store, group="alone", role=SENDER, backend="gloo", device="cpu",
                  bind_host="127.0.0.1", deadline=time.monotonic() + 0.5)  # fmt: skip


def test_a_store_address_without_a_port_is_refused() -> None:
    with pytest.raises(TransferFailed, match="bad store address"):
        connect_store("localhost", time.monotonic() + NEVER_S)


def test_a_bounded_wait_walks_away_when_cancelled() -> None:
    release = threading.Event()
    task = Bounded(lambda: release.wait(NEVER_S), name="stuck")
    try:
        with pytest.raises(TransferFailed, match="abandoned: decided"):
            task.wait(time.monotonic() + NEVER_S, cancelled=lambda: "decided")
        assert not task.done
    finally:
        release.set()


def test_a_bounded_wait_hands_back_the_threads_error() -> None:
    def fail() -> None:
        raise TransferFailed("peer went away")

    task = Bounded(fail, name="failing")
    with pytest.raises(TransferFailed, match="peer went away"):
        task.wait(time.monotonic() + NEVER_S)
