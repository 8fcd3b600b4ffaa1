"""Requests refitd must refuse, each with a precise 4xx, a sentence that says what was wrong, and
no change of state; and a property-based run over the OpenAPI document that finds no 5xx.

One daemon for the module: a tiny Qwen2 at TP 2 whose rank agents are external and never
started (so no version is ever committed), a 4 MB upload limit, a queue depth of 1, and a larger
probe batch so that an accepted update takes seconds to verify.
"""

from __future__ import annotations

import io
import json
import struct
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.rollout.lock import UpdateLock
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from orchestrator.state.redis_server import unix_socket_path, unix_url
from tests.api.conftest import ADMIN, GARBAGE, TRAINER, Api, refitctl, write_checkpoint
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

UPLOAD_LIMIT = 4_000_000


@pytest.fixture(scope="module")
def api(launch_api) -> Api:
    return launch_api(
        "qwen2",
        tp_size=2,
        launch="external",
        env={
            "REFITD_LIMITS__MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            "REFITD_LIMITS__QUEUE_DEPTH": "1",
            "REFITD_VERIFICATION__PROBE__COUNT": "32",
            "REFITD_VERIFICATION__PROBE__LENGTH": "256",
        },
    )


def test_not_ready_until_a_version_is_committed(api: Api) -> None:
    reason = "no version has been committed yet"
    assert api.readyz_at_start == {"code": 503, "ready": False, "reason": reason}
    ready = httpx.get(f"{api.url}/readyz")
    assert (ready.status_code, ready.json()) == (503, {"ready": False, "reason": reason})
    health = refitctl("health", url=api.url, token=TRAINER)
    assert (health.code, health.stdout, health.stderr) == (1, f"live: yes\nready: no ({reason})\n",
                                                           "")  # fmt: skip
    status = refitctl("status", url=api.url, token=ADMIN)
    assert status.code == 1
    assert status.stdout.splitlines()[:2] == [
        "active version: none",
        f"ready:          no ({reason})",
    ]


# Auth ---------------------------------------------------------------------------------------
# (method, path, roles that may call it); {} for no token needed.
ENDPOINTS = [
    ("POST", "/weights/update", {"trainer"}),
    ("GET", "/weights/updates/0123456789abcdef", {"trainer", "admin"}),
    ("GET", "/weights/versions", {"trainer", "admin"}),
    ("GET", "/weights/versions/1", {"trainer", "admin"}),
    ("GET", "/weights/active", {"trainer", "admin"}),
    ("POST", "/weights/rollback", {"admin"}),
    ("GET", "/metrics", {"trainer", "admin"}),
    ("GET", "/artifacts/1/0", {"trainer", "admin"}),
]
TOKENS = {"trainer": TRAINER, "admin": ADMIN}


def _call(api: Api, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    # A body the endpoint refuses when it gets that far (outside the allowed roots; no version
    # is active to roll back from), so that no call changes anything.
    body = {"source": {"type": "path", "path": "/etc"}} if path == "/weights/update" else {}
    return httpx.request(method, api.url + path, headers=headers, timeout=30,
                         **({"json": body} if method == "POST" else {}))  # fmt: skip


def test_auth_matrix_over_every_endpoint(api: Api) -> None:
    before = api.snapshot()
    not_bearer = "the Authorization header must be 'Bearer <token>'"
    for method, path, roles in ENDPOINTS:
        where = f"{method} {path}"
        for headers, detail in (
            ({}, "missing bearer token (Authorization: Bearer <token>)"),
            ({"Authorization": f"Bearer {GARBAGE}"}, "the bearer token is not valid"),
            ({"Authorization": f"Bearer {TRAINER}x"}, "the bearer token is not valid"),
            ({"Authorization": f"Basic {ADMIN}"}, not_bearer),
            ({"Authorization": "Bearer"}, not_bearer),
        ):
            response = _call(api, method, path, headers)
            assert response.status_code == 401, (where, headers, response.text)
            assert response.json() == {"detail": detail}, where
            assert response.headers["www-authenticate"] == "Bearer", where
        for role, token in TOKENS.items():
            response = _call(api, method, path, {"Authorization": f"Bearer {token}"})
            if role in roles:
                assert response.status_code not in (401, 403), (where, role, response.text)
                assert response.status_code < 500, (where, role, response.text)
            else:
                wanted = " or ".join(sorted(roles, key=["trainer", "admin"].index))
                assert response.status_code == 403, (where, role, response.text)
                assert response.json() == {"detail": f"this needs the {wanted} token"}
    # Auth is checked before the body: no token and a malformed body is still 401.
    for path in ("/weights/update", "/weights/rollback"):
        response = httpx.post(api.url + path, content=b"{not json",
                              headers={"Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 401, (path, response.text)
    # Health needs no token, and ignores a bad one.
    for path in ("/healthz", "/readyz"):
        for headers in ({}, {"Authorization": f"Bearer {GARBAGE}"}):
            response = httpx.get(api.url + path, headers=headers)
            assert response.status_code == (200 if path == "/healthz" else 503), path
    assert api.snapshot() == before


# Bad input ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def elsewhere(api: Api) -> Path:
    """A valid checkpoint outside the allowed root (a sibling of it)."""
    return write_checkpoint(api.root.parent / "elsewhere" / "ckpt", api.base)


def _safetensors_parts(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _safetensors_bytes(header: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _valid_bytes(api: Api) -> bytes:
    return api.bytes_of(api.base)


def _header_lies_past_the_end(api: Api) -> bytes:
    header, payload = _safetensors_parts(_valid_bytes(api))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    header[last]["data_offsets"][1] += 4096  # claims bytes the file does not have
    return _safetensors_bytes(header, payload)


def _header_offsets_overlap(api: Api) -> bytes:
    header, payload = _safetensors_parts(_valid_bytes(api))
    names = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"])  # fmt: skip
    # Two tensors of the same byte size claim the same bytes.
    size = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}
    a, b = next((a, b) for a in names for b in names if a < b and size[a] == size[b])
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    return _safetensors_bytes(header, payload)


def _pickle_bytes(api: Api) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(api.base), buffer)
    return buffer.getvalue()


def _state(api: Api, **changes: Any) -> dict[str, torch.Tensor]:
    state = dict(api.base)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del state[name]
        else:
            state[name] = value
    return state


def _with(api: Api, name: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    state = dict(api.base)
    state[name] = edit(state[name].clone())
    return state


def _set(index: tuple[int, ...], value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return edit


Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def _file(api: Api, name: str, data: bytes) -> Path:
    path = api.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ckpt(api: Api, state: dict[str, torch.Tensor]) -> Path:
    return api.checkpoint(state)


def _json(api: Api, body: Any, **kw: Any) -> httpx.Response:
    return api.request("POST", "/weights/update", token=TRAINER, json=body, **kw)


def _raw(api: Api, content: bytes, content_type: str | None) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return api.request("POST", "/weights/update", token=TRAINER, content=content,
                       headers=headers)  # fmt: skip


def _streamed(api: Api, total: int) -> httpx.Response:
    def chunks() -> Iterator[bytes]:
        for _ in range(total // 2**20 + 1):
            yield b"\0" * 2**20

    # No Content-Length: the limit is enforced while the bytes arrive.
    return api.request("POST", "/weights/update", token=TRAINER, content=chunks(),
                       headers={"Content-Type": "application/octet-stream"})  # fmt: skip


def _symlinked_file(api: Api, elsewhere: Path) -> Path:
    directory = api.root / "linked-file"
    directory.mkdir(exist_ok=True)
    link = directory / "model.safetensors"
    if not link.is_symlink():
        link.symlink_to(elsewhere / "model.safetensors")
    return directory


def _symlinked_dir(api: Api, elsewhere: Path) -> Path:
    link = api.root / "linked-dir"
    if not link.is_symlink():
        link.symlink_to(elsewhere, target_is_directory=True)
    return link


def _empty_dir(api: Api) -> Path:
    (api.root / "empty").mkdir(exist_ok=True)
    return api.root / "empty"


def _pickle_dir(api: Api, name: str) -> Path:
    directory = api.root / f"pickled-{name.replace('.', '-')}"
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(_pickle_bytes(api))
    return directory


def _valid_path(api: Api) -> str:
    return str(api.checkpoint(api.base))


# name: (send(api, elsewhere) -> response, status, words the detail must hold)
CASES: dict[str, tuple[Callable[[Api, Path], httpx.Response], int, str]] = {
    "not safetensors (path)": (
        lambda a, e: a.push(_file(a, "junk.safetensors", b"these are not tensors " * 50)),
        422, "junk.safetensors is not a valid safetensors file"),
    "not safetensors (upload)": (
        lambda a, e: a.upload(b"these are not tensors " * 50),
        422, "is not a valid safetensors file"),
    "not a .safetensors name": (
        lambda a, e: a.push(_file(a, "weights.txt", _valid_bytes(a))),
        400, "weights.txt is not a .safetensors file"),
    "truncated file (path)": (
        lambda a, e: a.push(_file(a, "cut.safetensors", _valid_bytes(a)[:1_500_000])),
        422, "cut.safetensors is not a valid safetensors file: Error while deserializing header: "
             "incomplete metadata, file not fully covered"),
    "truncated file (upload)": (
        lambda a, e: a.upload(_valid_bytes(a)[:1_500_000]),
        422, "incomplete metadata, file not fully covered"),
    "header lies: offsets past the end": (
        lambda a, e: a.upload(_header_lies_past_the_end(a)),
        422, "invalid shape, data type, or offset for tensor"),
    "header lies: offsets overlap": (
        lambda a, e: a.push(_file(a, "overlap.safetensors", _header_offsets_overlap(a))),
        422, "overlap.safetensors is not a valid safetensors file: Error while deserializing "
             "header: invalid offset for tensor"),
    "oversized upload (Content-Length)": (
        lambda a, e: a.upload(b"\0" * (UPLOAD_LIMIT + 1)),
        413, f"the upload is {UPLOAD_LIMIT + 1} bytes, over limits.max_upload_bytes="
             f"{UPLOAD_LIMIT}; put the files under an allowed root"),
    "oversized upload (streamed)": (
        lambda a, e: _streamed(a, UPLOAD_LIMIT + 1),
        413, f"the upload exceeds limits.max_upload_bytes={UPLOAD_LIMIT} bytes"),
    "oversized JSON body (Content-Length)": (
        lambda a, e: a.request("POST", "/weights/update", token=TRAINER,
                               content=b"{" + b" " * 2**20 + b"}",
                               headers={"Content-Type": "application/json"}),
        413, "a JSON body is at most 1048576 bytes"),
    "oversized JSON body (streamed)": (
        lambda a, e: a.request("POST", "/weights/update", token=TRAINER,
                               content=iter([b"{", b" " * 2**20, b"}"]),
                               headers={"Content-Type": "application/json"}),
        413, "a JSON body is at most 1048576 bytes"),
    "empty upload": (
        lambda a, e: a.upload(b""),
        422, "the upload is empty; send the bytes of a .safetensors file"),
    "missing tensor": (
        lambda a, e: a.push(_ckpt(a, _state(a, **{"model.layers.1.mlp.down_proj.weight": None}))),
        422, "missing tensors: model.layers.1.mlp.down_proj.weight"),
    "extra tensor": (
        # The tiny Qwen2 ties its lm_head to the embedding: an update must not carry one.
        lambda a, e: a.push(_ckpt(a, _state(a, **{"lm_head.weight": a.base[
            "model.embed_tokens.weight"].clone()}))),
        422, "unexpected tensors: lm_head.weight"),
    "missing and extra tensors (upload)": (
        lambda a, e: a.upload(a.bytes_of(_state(a, **{Q: None, "model.extra.weight":
                                                       torch.ones(4)}))),
        422, f"missing tensors: {Q}; unexpected tensors: model.extra.weight"),
    "wrong shape": (
        lambda a, e: a.push(_ckpt(a, _with(a, Q, lambda t: t[:, :255]))),
        422, f"wrong shape: {Q} has shape [256, 255], expected [256, 256]"),
    "wrong dtype (int32)": (
        lambda a, e: a.push(_ckpt(a, _with(a, Q, lambda t: t.to(torch.int32)))),
        422, f"wrong dtype: {Q} is I32, expected bfloat16, float16 or float32"),
    "wrong dtype (float64)": (
        lambda a, e: a.upload(a.bytes_of(_with(a, NORM, lambda t: t.to(torch.float64)))),
        422, f"wrong dtype: {NORM} is F64, expected bfloat16, float16 or float32"),
    "path outside the roots via ..": (
        lambda a, e: a.push(f"{a.root}/../elsewhere/ckpt"),
        400, "resolves to {e}, outside every allowed root ({a.root})"),
    "absolute path elsewhere": (
        lambda a, e: a.push(e),
        400, "resolves to {e}, outside every allowed root ({a.root})"),
    "symlink escaping (directory)": (
        lambda a, e: a.push(_symlinked_dir(a, e)),
        400, "resolves to {e}, outside every allowed root ({a.root})"),
    "symlink escaping (file in a directory)": (
        lambda a, e: a.push(_symlinked_file(a, e)),
        400, "model.safetensors in {a.root}/linked-file links outside every allowed root"),
    "pickle file (.bin)": (
        lambda a, e: a.push(_file(a, "pytorch_model.bin", _pickle_bytes(a))),
        400, "pytorch_model.bin is a pickle checkpoint, which refitd never loads (it can run "
             "code); convert it to safetensors first"),
    "pickle file (.pt in a directory)": (
        lambda a, e: a.push(_pickle_dir(a, "model.pt")),
        400, "model.pt is a pickle checkpoint, which refitd never loads (it can run code); "
             "convert it to safetensors first"),
    "pickle file (uploaded)": (
        lambda a, e: a.upload(_pickle_bytes(a)),
        422, "holds a pickle checkpoint (torch.save), which refitd never loads (it can run "
             "code); convert it to safetensors first"),
    "relative path": (
        lambda a, e: a.push("checkpoints/ckpt"),
        400, "source.path must be absolute, got 'checkpoints/ckpt'"),
    "no such path": (
        lambda a, e: a.push(a.root / "nowhere"),
        400, "source.path '{a.root}/nowhere' does not exist"),
    "a name too long for the filesystem": (
        lambda a, e: a.push(a.root / ("a" * 300)),
        400, "cannot be read: File name too long"),
    "empty directory": (
        lambda a, e: a.push(_empty_dir(a)),
        422, "{a.root}/empty holds no .safetensors file"),
    "wrong Content-Type": (
        lambda a, e: _raw(a, json.dumps({"source": {"type": "path", "path": _valid_path(a)}})
                          .encode(), "text/plain"),
        400, "with Content-Type application/json, or the bytes of a .safetensors file with "
             "Content-Type application/octet-stream (got 'text/plain')"),
    "no Content-Type": (
        lambda a, e: _raw(a, _valid_bytes(a), None),
        400, "(got 'no Content-Type')"),
    "malformed JSON": (
        lambda a, e: _raw(a, b'{"source": {"type": "path", "path": ', "application/json"),
        422, "invalid request: body: Invalid JSON"),
    "JSON that is not an object": (
        lambda a, e: _json(a, ["source"]),
        422, "invalid request: body: Input should be an object"),
    "unknown field": (
        lambda a, e: _json(a, {"source": {"type": "path", "path": _valid_path(a)}, "force": True}),
        422, "invalid request: force: Extra inputs are not permitted"),
    "unknown field in the source": (
        lambda a, e: _json(a, {"source": {"type": "path", "path": _valid_path(a), "mode": 1}}),
        422, "invalid request: source.mode: Extra inputs are not permitted"),
    "unknown source type": (
        lambda a, e: _json(a, {"source": {"type": "s3", "path": "bucket/ckpt"}}),
        422, "invalid request: source.type: Input should be 'path'"),
    "no source": (
        lambda a, e: _json(a, {"label": "x"}),
        422, "invalid request: source: Field required"),
    "label too long": (
        lambda a, e: a.push(_valid_path(a), label="x" * 201),
        422, "label: String should have at most 200 characters"),
    "verify not a boolean": (
        lambda a, e: _json(a, {"source": {"type": "path", "path": _valid_path(a)},
                               "verify": "perhaps"}),
        422, "invalid request: verify: Input should be a valid boolean"),
    "verify as the string 'true' (no coercion)": (
        lambda a, e: _json(a, {"source": {"type": "path", "path": _valid_path(a)},
                               "verify": "true"}),
        422, "invalid request: verify: Input should be a valid boolean"),
    "label as a number (no coercion)": (
        lambda a, e: _json(a, {"source": {"type": "path", "path": _valid_path(a)}, "label": 7}),
        422, "invalid request: label: Input should be a valid string"),
    "Idempotency-Key too long": (
        lambda a, e: a.push(_valid_path(a), headers={"Idempotency-Key": "k" * 201}),
        422, "idempotency-key: String should have at most 200 characters"),
    "Idempotency-Key empty": (
        lambda a, e: a.push(_valid_path(a), headers={"Idempotency-Key": ""}),
        400, "Idempotency-Key must be 1 to 200 characters"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(
    api: Api, elsewhere: Path, case: str
) -> None:
    send, code, words = CASES[case]
    assert len(_valid_bytes(api)) < UPLOAD_LIMIT, "a whole checkpoint fits the upload limit"
    before = api.snapshot()
    response = send(api, elsewhere)
    assert response.status_code == code, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert words.format(a=api, e=elsewhere) in detail, detail
    assert api.snapshot() == before


# NaN and Inf: found by the pipeline's one pass over the data on the device ---------------------
@pytest.mark.parametrize("via", ["path", "upload"])
def test_nan_or_inf_rejects_the_version_with_the_reason_and_no_rank_changes(
    api: Api, via: str
) -> None:
    """The door checks every header; the data is read once, by the pipeline, which finds the NaN
    on the device: the version is REJECTED with the tensor's name and no rank changes."""
    before = api.snapshot()
    if via == "path":
        bad = _with(api, UP, _set((3, 5), float("nan")))
        response = api.push(_ckpt(api, bad), wait=True)
        name = UP
    else:
        bad = _with(api, NORM, _set((7,), float("-inf")))
        response = api.upload(api.bytes_of(bad), params={"wait": "true"})
        name = NORM
    assert response.status_code == 422, response.text
    assert f"NaN or Inf in {name}; nothing was applied" in response.json()["detail"]
    after = api.snapshot()
    version = max(after["versions"])
    assert after["versions"][version][0] == "REJECTED" and version not in before["versions"]
    for key in ("active", "epoch", "ranks", "uploads"):
        assert after[key] == before[key], key


# The queue ----------------------------------------------------------------------------------
def test_past_the_queue_depth_a_post_gets_409_and_no_version(api: Api) -> None:
    """limits.queue_depth=1: one update runs, one waits, the next is refused. No rank ever
    registers, so the accepted ones end ABORTED."""
    before = api.snapshot()
    latest = max(before["versions"], default=0)
    keys = Keys()
    redis_dir = api.data_dir / "redis"
    url = unix_url(unix_socket_path(redis_dir), (redis_dir / "password").read_text().strip())
    with connect(url) as client:
        # The test holds the update lock, so the first update, once taken off the queue, waits
        # for it (running) for as long as the test says: no race with how fast it would run.
        held = UpdateLock(client, keys, ttl_s=60, owner="test-holds-the-queue")
        held.acquire()
        try:
            first = api.push(api.checkpoint(), label="first")
            wait_until(lambda: client.llen(keys.update_queue) == 0)  # taken: running
            second = api.push(api.checkpoint(), label="second")
            third = api.push(api.checkpoint(), label="third")
        finally:
            held.release()
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    assert third.status_code == 409, third.text
    assert third.json()["detail"] == (
        "1 updates are already waiting behind the running one (limits.queue_depth=1); retry once "
        "one has finished")  # fmt: skip
    assert [first.json()["version"], second.json()["version"]] == [latest + 1, latest + 2]
    assert set(api.versions()) - set(before["versions"]) == {latest + 1, latest + 2}
    for accepted in (first.json(), second.json()):
        final = api.follow(accepted["update_id"])[-1]
        assert (final["status"], final["stage"]) == ("failed", "aborted"), final
        assert "rank 0 has never registered (is its agent running?)" in final["error"], final

    # ?wait=true on an update that aborts: 409 with the reason. The refused post burned no
    # version number: this one gets the next.
    response = api.push(api.checkpoint(), wait=True, label="fourth")
    assert response.status_code == 409, response.text
    body = response.json()
    assert (body["version"], body["status"], body["stage"]) == (latest + 3, "failed", "aborted")
    assert body["detail"] == body["error"] and "never registered" in body["detail"]
    versions = api.versions()
    assert [versions[v]["status"] for v in (latest + 1, latest + 2, latest + 3)] == [
        "ABORTED"] * 3  # fmt: skip
    after = api.snapshot()
    assert (after["active"], after["ranks"], after["queued"]) == (None, before["ranks"], 0)


# Property-based: no request the OpenAPI document allows (or nearly allows) gets a 5xx ----------
def _resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    """A local $ref, resolved against the whole OpenAPI document (as JSON Schema and OpenAPI
    tools do); it must resolve."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"$ref {ref} does not resolve"
        node = node[part]
    return node  # type: ignore[no-any-return]


JUNK_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


def _from_schema(doc: dict[str, Any], schema: dict[str, Any], paths: list[str]) -> Any:
    """A hypothesis strategy of values valid for a JSON schema (the subset FastAPI emits)."""
    if "$ref" in schema:
        return _from_schema(doc, _resolve(doc, schema["$ref"]), paths)
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema["oneOf"]
        return st.one_of(*(_from_schema(doc, s, paths) for s in options))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: _from_schema(doc, v, paths) for k, v in props.items() if k in required},
            optional={k: _from_schema(doc, v, paths) for k, v in props.items()
                      if k not in required},
        )  # fmt: skip
    if kind == "string":
        if schema.get("format") == "binary":
            return st.binary(max_size=2048)
        text = st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 64), 300))  # fmt: skip
        if schema.get("title") == "Path":
            # Paths worth trying next to random text: the filesystem's odd corners.
            return text | st.sampled_from(paths)
        return text
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        wide = st.integers(int(low) if low is not None else -(2**70),
                           int(high) if high is not None else 2**70)  # fmt: skip
        # Small numbers name versions and ranks that exist.
        return st.integers(-1, 8) | wide if low is None and high is None else wide
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(_from_schema(doc, schema.get("items", {}), paths), max_size=4)
    return JUNK_JSON


# Requests per operation (176 in all): more where there is more to get wrong.
EXAMPLES = {"POST /weights/update": 50, "POST /weights/rollback": 30}
# Header values a client can send: printable ASCII (httpx encodes headers as ASCII) with no
# leading or trailing whitespace (RFC 9110 5.5: h11 refuses to send ' ' or 'x ', and a server
# strips that whitespace anyway, so stripping loses no request the daemon could ever see).
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=250).map(
    str.strip
)
BAD_AUTH = st.sampled_from([None, GARBAGE, "", "Basic x"])


@settings(max_examples=500, deadline=None, database=None)
@given(value=HEADER_TEXT)
def test_every_header_value_drawn_is_one_the_http_client_sends(value: str) -> None:
    # The fuzz run below must spend its examples on the daemon, not die in the client
    # (httpx.LocalProtocolError: Illegal header value) on a value no client can send.
    request = httpx.Request("GET", "http://refitd.test/", headers={"Idempotency-Key": value})
    h11.Request(method="GET", target="/", headers=list(request.headers.raw))


def _param(doc: dict[str, Any], param: dict[str, Any], paths: list[str]) -> Any:
    """A value for one parameter: from its schema, or junk of the right kind for its place."""
    if param["in"] == "header":  # HTTP header values are ASCII
        return HEADER_TEXT
    junk = st.text(max_size=30)
    if param["in"] == "path":
        junk = junk.filter(lambda s: s.strip() not in ("", ".", ".."))
    return _from_schema(doc, param["schema"], paths) | junk


def _fuzz(
    client: httpx.Client,
    doc: dict[str, Any],
    method: str,
    template: str,
    op: dict[str, Any],
    paths: list[str],
) -> set[int]:
    """Send one operation requests drawn by hypothesis; every answer must be below 500, and a
    4xx must carry a detail sentence. Returns the status codes seen."""
    params = op.get("parameters", [])
    content = op.get("requestBody", {}).get("content", {})
    roles = {"POST /weights/update": [TRAINER], "POST /weights/rollback": [ADMIN]}
    tokens = st.sampled_from(roles.get(f"{method} {template}", [TRAINER, ADMIN]))
    seen: set[int] = set()

    @settings(max_examples=EXAMPLES.get(f"{method} {template}", 12), deadline=None,
              database=None, suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        path = template
        query: dict[str, Any] = {}
        headers: dict[str, str] = {}
        for p in params:
            if p["in"] != "path" and not data.draw(st.booleans(), label=f"send {p['name']}"):
                continue
            value = data.draw(_param(doc, p, paths), label=p["name"])
            if isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = value if isinstance(value, str) else json.dumps(value)
            if p["in"] == "path":
                path = path.replace("{" + p["name"] + "}", urllib.parse.quote(text, safe=""))
            elif p["in"] == "query":
                query[p["name"]] = text
            else:
                headers[p["name"]] = text
        # Half the requests carry a token of the right role, so most get past auth.
        token = data.draw(tokens | BAD_AUTH, label="token")
        if token is not None:
            scheme = "" if token.startswith("Basic") else "Bearer "
            headers["Authorization"] = f"{scheme}{token}".strip()
        kw: dict[str, Any] = {}
        if content:
            kind = data.draw(st.sampled_from([*content, "text/plain", None]), label="type")
            if kind == "application/json":
                schema = content[kind]["schema"]
                body = data.draw(_from_schema(doc, schema, paths) | JUNK_JSON, label="body")
                kw["content"] = json.dumps(body).encode()
            else:
                kw["content"] = data.draw(st.binary(max_size=2048), label="bytes")
            if kind is not None:
                headers["Content-Type"] = kind
        response = client.request(method, path, params=query, headers=headers, **kw)
        seen.add(response.status_code)
        if template == "/readyz" and response.status_code == 503:  # not ready: by design
            assert response.json()["ready"] is False
            return
        assert response.status_code < 500, (method, path, query, headers, response.text)
        if response.status_code >= 400:
            detail = response.json()["detail"]
            assert isinstance(detail, str) and detail, response.text

    check()
    return seen


def test_no_request_over_the_openapi_document_gets_a_5xx(api: Api) -> None:
    doc = httpx.get(f"{api.url}/openapi.json").json()
    operations = [(m.upper(), path, op) for path, ops in doc["paths"].items()
                  for m, op in ops.items()]  # fmt: skip
    assert {f"{m} {p}" for m, p, _ in operations} == {
        "GET /healthz", "GET /readyz", "POST /weights/update", "GET /weights/updates/{update_id}",
        "GET /weights/versions", "GET /weights/versions/{version}", "GET /weights/active",
        "POST /weights/rollback", "GET /metrics", "GET /artifacts/{version}/{rank}",
    }  # fmt: skip
    paths = [str(api.root), f"{api.root}/..", f"{api.root}/{'x' * 300}", f"{api.root}/\x00",
             "/", "/etc/passwd", "/proc/self/mem", "~", "..", ".", "a/../../b"]  # fmt: skip
    with api.client(token=None, timeout=60) as client:
        answered = {f"{m} {p}": _fuzz(client, doc, m, p, op, paths) for m, p, op in operations}
    # The run got past auth and validation for every operation that needs a token.
    for name, codes in answered.items():
        assert codes - {401, 403}, (name, codes)
    assert {401, 404, 422} <= set().union(*answered.values()), answered
