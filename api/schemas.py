"""Request and response bodies of the REST API (the OpenAPI document is built from these)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # Request bodies: no unknown key, and no coercion (`true` is not version 1, "16" is not 16,
    # "yes" is not a boolean): a trainer's or operator's mistake is refused, not guessed at.
    model_config = ConfigDict(extra="forbid", strict=True)


class PathSource(_Strict):
    type: Literal["path"]
    path: str = Field(
        ..., min_length=1, max_length=4096,
        description="A .safetensors file, or a directory of them (with or without "
        "model.safetensors.index.json), inside one of sources.allowed_roots.",
    )  # fmt: skip


_Count = Annotated[int, Field(ge=0, le=2**62)]
_Blob = Annotated[str, Field(max_length=1024, description="base64")]


class TensorEntry(_Strict):
    """Where one tensor lies in its bucket (orchestrator/data/flat.py's layout: back to back,
    itemsize descending then name)."""

    name: str = Field(..., min_length=1, max_length=1024)
    dtype: str = Field(..., min_length=1, max_length=16, description="safetensors' name: BF16...")
    shape: list[_Count] = Field(..., max_length=8)
    offset: _Count
    nbytes: _Count


class CudaHandle(_Strict):
    """A CUDA IPC handle of a bucket (torch's CUDA IPC arguments, as orchestrator/data/ipc.py
    writes them)."""

    kind: Literal["cuda"]
    device: _Count
    nbytes: _Count
    tensor_offset: _Count
    storage_handle: _Blob
    storage_size_bytes: _Count
    storage_offset_bytes: _Count
    ref_counter_handle: _Blob
    ref_counter_offset: _Count
    event_handle: _Blob | None
    event_sync_required: bool
    device_uuid: str | None = Field(..., max_length=64)
    pid: _Count


class ShmHandle(_Strict):
    """A bucket of CPU tensors in a shared-memory file (/dev/shm/refitd-*) of the exporter's."""

    kind: Literal["shm"]
    path: str = Field(..., min_length=1, max_length=4096)
    nbytes: _Count
    offset: _Count


class TensorBucket(_Strict):
    handle: CudaHandle | ShmHandle = Field(..., discriminator="kind")
    tensors: list[TensorEntry] = Field(..., min_length=1, max_length=100_000)
    digest: str = Field(
        ..., max_length=128, description="The bucket's digest (kernels/digest.py + table hash)."
    )


class Exporter(_Strict):
    """The process that exported the buckets; must be on the daemon's host, as its user."""

    host: str = Field(..., max_length=255)
    boot_id: str = Field(..., max_length=64)
    uid: _Count
    pid: _Count
    start_time: _Count


class TensorSource(_Strict):
    type: Literal["cuda_ipc"]
    exporter: Exporter
    buckets: list[TensorBucket] = Field(
        ..., min_length=1, max_length=4096,
        description="Flat buckets of the trainer's tensors (CUDA IPC, or shared memory for CPU "
        "tensors); the daemon copies them before it answers. Sent by refitd_client.",
    )  # fmt: skip


class _UpdateOptions(_Strict):
    label: str | None = Field(None, max_length=200, description="Free-form, e.g. the train step.")
    verify: bool | None = Field(
        None, description="Check against bf16 reference logits (default: verification.enabled)."
    )


class UpdateRequest(_UpdateOptions):
    """The body of POST /weights/update as the OpenAPI document shows it. A request is validated
    as the model of its source's type (`update_request`), so that an error names the field as
    the client wrote it (source.mode, not source.path.mode)."""

    source: PathSource | TensorSource = Field(..., discriminator="type")


class PathUpdateRequest(_UpdateOptions):
    source: PathSource


class TensorUpdateRequest(_UpdateOptions):
    source: TensorSource


def update_request(raw: bytes) -> PathUpdateRequest | TensorUpdateRequest:
    """Validate a JSON body of POST /weights/update (pydantic's ValidationError when invalid)."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None  # the path model's own parse says what is wrong with it
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, dict) and source.get("type") == "cuda_ipc":
        return TensorUpdateRequest.model_validate_json(raw)
    return PathUpdateRequest.model_validate_json(raw)


class UpdateAccepted(BaseModel):
    update_id: str
    version: int
    status_url: str


class UpdateState(BaseModel):
    update_id: str
    version: int
    status: Literal["queued", "running", "succeeded", "failed"]
    stage: str
    progress: float = Field(..., ge=0, le=1)
    error: str | None
    label: str | None
    verify: bool
    created_at: float
    started_at: float | None = Field(None, description="When its first stage began.")
    finished_at: float | None
    status_url: str | None = None


class RankState(BaseModel):
    model_config = ConfigDict(extra="allow")
    rank: int
    version: int | None = None
    state: str | None = None
    transport: str | None = Field(
        None,
        description="How the shard the rank serves arrived: cuda_ipc, shm, distributed/nccl, "
        "distributed/gloo, artifact (read from disk) or http.",
    )


class VersionSummary(BaseModel):
    version: int
    status: str
    label: str | None
    created_at: float
    updated_at: float
    update_id: str | None
    reason: str | None


class VersionDetail(VersionSummary):
    times: dict[str, float]
    quantization: list[dict[str, Any]] | None
    verification: dict[str, Any] | None
    artifact: dict[str, Any] | None
    layout: dict[str, Any] | None = Field(
        None, description="Per rank: the digest, bytes and tensor count of the shard it gets."
    )
    ranks: list[dict[str, Any]]


class VersionList(BaseModel):
    versions: list[VersionSummary]


class ActiveState(BaseModel):
    active_version: int | None
    epoch: int | None = None
    ranks: list[RankState]


class RollbackRequest(_Strict):
    to_version: int | None = Field(
        None, ge=1, description="Default: the version committed before the active one."
    )


class RollbackResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    active_version: int
    previous_version: int | None = None


class ErrorBody(BaseModel):
    """Every error: a sentence that says what was wrong (and, where an update was recorded
    before the error, its `update_id` and `version`)."""

    model_config = ConfigDict(extra="allow")
    detail: str


_ERROR_DESCRIPTIONS = {
    400: "The request is malformed.",
    401: "No bearer token, or not a valid one.",
    403: "The token's role may not do this.",
    404: "No such update, version or shard.",
    409: "The request conflicts with the current state (busy, queue full, aborted).",
    413: "The body is over a configured limit.",
    415: "The body is not declared as JSON (Content-Type: application/json).",
    422: "The input is invalid; the detail says what to fix.",
    429: "Too many updates from trainer tensors are held in memory; retry after Retry-After.",
    503: "Redis does not answer; if an update was recorded, the body names it.",
    507: "The data directory's filesystem is full; nothing was kept.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entries of these error codes, each an ErrorBody."""
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}
