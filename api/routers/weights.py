"""Updates, versions, the active version and rollback."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from api.deps import Admin, Core, Reader, Trainer
from api.schemas import (
    ActiveState,
    RollbackRequest,
    RollbackResult,
    TensorSource,
    UpdateAccepted,
    UpdateRequest,
    UpdateState,
    VersionDetail,
    VersionList,
    VersionSummary,
    error_responses,
    update_request,
)
from orchestrator.errors import (
    BadRequest,
    PayloadTooLarge,
    RedisUnavailable,
    UnsupportedMediaType,
)
from orchestrator.service.updates import UpdateRecord, UpdateStatus
from orchestrator.state.redis_client import REDIS_DOWN, OutageLog

router = APIRouter(prefix="/weights", tags=["weights"])
log = logging.getLogger("refitd.api")
_REDIS_DOWN: tuple[type[BaseException], ...] = (RedisUnavailable, *REDIS_DOWN)

UPLOAD_TYPES = ("application/octet-stream", "application/x-safetensors")
# Uploads are written to disk in chunks of this size, off the event loop.
_WRITE_CHUNK = 8 * 2**20
# A JSON request names a path or a version (a few hundred bytes), or a trainer's tensor table
# (about 150 bytes a tensor: several thousand fit). Past this it is not one of ours, and reading
# it whole would let a client fill the daemon's memory.
MAX_JSON_BYTES = 2**20

_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 503)
_ROLLBACK_ERRORS = {**_ERRORS, **error_responses(415)}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` written in place: in an OpenAPI document a
    '#/$defs/...' reference resolves against the document's root, where there are none."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].removeprefix("#/$defs/")])
            if "discriminator" in node:
                # Its mapping names '$defs' too; the inlined oneOf's `const` types say the same.
                node = {
                    **node,
                    "discriminator": {"propertyName": node["discriminator"]["propertyName"]},
                }
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(schema)  # type: ignore[no-any-return]


_UPDATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(UpdateRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "The bytes of one .safetensors file; label and verify go in "
                "the query string.",
            },
        },
    }
}


def _status_url(request: Request, update_id: str) -> str:
    return str(request.url_for("get_update", update_id=update_id))


@router.post(
    "/update",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=UpdateAccepted,
    responses={200: {"model": UpdateState}, **_ERRORS, **error_responses(429, 507)},
    openapi_extra=_UPDATE_BODY,
)
async def post_update(
    request: Request,
    core: Core,
    _: Trainer,
    wait: Annotated[bool, Query(description="Answer when the update is final.")] = False,
    label: Annotated[str | None, Query(max_length=200, description="Uploads only.")] = None,
    verify: Annotated[bool | None, Query(description="Uploads only.")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """A new version from a safetensors path or a trainer's tensors on this host (JSON body),
    or an upload (octet-stream body).

    Answers 202 with where to follow it; with `?wait=true`, answers once the update is final:
    200 committed, 422 rejected (bad content or failed verification), 409 aborted (a rank failed).
    The same Idempotency-Key with the same body gives the same answer; with another body, 422.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    pipeline = core.pipeline
    if content_type == "application/json":
        body = update_request(await _json_bytes(request))
        if isinstance(body.source, TensorSource):
            # Copies the trainer's buckets before answering: the trainer frees them then.
            record, _created = await run_in_threadpool(
                pipeline.submit_tensors,
                body.source.model_dump(),
                label=body.label,
                verify=body.verify,
                idempotency_key=idempotency_key,
            )
        else:
            record, _created = await run_in_threadpool(
                pipeline.submit_path,
                body.source.path,
                label=body.label,
                verify=body.verify,
                idempotency_key=idempotency_key,
            )
    elif content_type in UPLOAD_TYPES:
        record = await _receive_upload(request, core, label, verify, idempotency_key)
    else:
        raise BadRequest(
            'send JSON ({"source": {"type": "path", "path": ...}}) with Content-Type '
            "application/json, or the bytes of a .safetensors file with Content-Type "
            f"application/octet-stream (got {content_type or 'no Content-Type'!r})"
        )
    if wait:
        return await _wait_final(request, core, record)
    accepted = UpdateAccepted(
        update_id=record.update_id,
        version=record.version,
        status_url=_status_url(request, record.update_id),
    )
    return JSONResponse(status_code=202, content=accepted.model_dump())


async def _json_bytes(request: Request) -> bytes:
    """The request body, refused with 413 past MAX_JSON_BYTES (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"a JSON body is at most {MAX_JSON_BYTES} bytes, got {declared}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                raise PayloadTooLarge(f"a JSON body is at most {MAX_JSON_BYTES} bytes")
    except ClientDisconnect:
        log.warning("a client disconnected %d bytes into a JSON body", len(body))
        raise BadRequest("the client disconnected before the body was complete") from None
    return bytes(body)


async def _receive_upload(
    request: Request,
    core: Core,
    label: str | None,
    verify: bool | None,
    idempotency_key: str | None,
) -> UpdateRecord:
    limit = core.settings.limits.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"the upload is {declared} bytes, over limits.max_upload_bytes={limit}; "
            "put the files under an allowed root and send a path source instead"
        )
    sink = await run_in_threadpool(core.pipeline.open_upload)
    try:
        buffer = bytearray()
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= _WRITE_CHUNK:
                await run_in_threadpool(sink.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await run_in_threadpool(sink.write, bytes(buffer))
    except ClientDisconnect:
        sink.discard()
        # The client's doing, not the daemon's: one line, no traceback. No one reads the answer.
        log.warning("a client disconnected %d bytes into an upload (of %s declared); nothing "
                    "was kept", sink.size + len(buffer), declared or "no length")  # fmt: skip
        raise BadRequest("the client disconnected before the upload was complete") from None
    except BaseException:
        sink.discard()
        raise
    record, _created = await run_in_threadpool(
        core.pipeline.submit_upload,
        sink,
        label=label,
        verify=verify,
        idempotency_key=idempotency_key,
    )
    return record


async def _wait_final(request: Request, core: Core, record: UpdateRecord) -> JSONResponse:
    """The update's final state, polled until limits.request_timeout_s. The update is recorded:
    a Redis that stops answering meanwhile is waited out (the update runs once it is back), and
    if it is still down at the deadline the answer says which update to follow, so that the
    trainer does not send it again."""
    deadline = time.monotonic() + core.settings.limits.request_timeout_s
    outage = OutageLog(log, f"?wait=true on update {record.update_id}")
    while not record.final and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        try:
            record = await run_in_threadpool(core.pipeline.queue.get, record.update_id)
        except _REDIS_DOWN as exc:
            outage.failed(exc)
            continue
        outage.recovered()
    if outage.down:
        detail = (f"Redis does not answer, so update {record.update_id} (version "
                  f"{record.version}, recorded) cannot be followed now; it runs once Redis is "
                  "back: follow it at status_url, and do not send it again")  # fmt: skip
        body = {"detail": detail, **_state(request, record).model_dump()}
        return JSONResponse(status_code=503, content=body)
    body = _state(request, record).model_dump()
    if not record.final:
        return JSONResponse(status_code=202, content=body)
    if record.status is UpdateStatus.SUCCEEDED:
        return JSONResponse(status_code=200, content=body)
    code = 422 if record.stage.value == "rejected" else 409
    return JSONResponse(status_code=code, content={"detail": record.error, **body})


def _state(request: Request, record: UpdateRecord) -> UpdateState:
    data = record.to_dict()
    data.pop("source")
    return UpdateState(**data, status_url=_status_url(request, record.update_id))


@router.get("/updates/{update_id}", response_model=UpdateState, responses=_ERRORS)
async def get_update(update_id: str, request: Request, core: Core, _: Reader) -> UpdateState:
    """Where an update stands: status, stage, progress (0..1), error."""
    record = await run_in_threadpool(core.pipeline.queue.get, update_id)
    return _state(request, record)


@router.get("/versions", response_model=VersionList, responses=_ERRORS)
async def list_versions(
    core: Core, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> VersionList:
    """Versions, newest first."""
    records = await run_in_threadpool(core.versions.list, limit=limit)
    return VersionList(versions=[VersionSummary(**r.to_dict()) for r in records])


@router.get("/versions/{version}", response_model=VersionDetail, responses=_ERRORS)
async def get_version(version: int, core: Core, _: Reader) -> VersionDetail:
    """One version: status, label, times, quantization report, verification metrics, ranks."""
    record = await run_in_threadpool(core.versions.get, version)
    ranks = await run_in_threadpool(core.coordinator.ledger.version_ranks, version)
    return VersionDetail(**record.to_dict(), ranks=ranks)


@router.get("/active", response_model=ActiveState, responses=_ERRORS)
async def get_active(core: Core, _: Reader) -> Any:
    """The active version and what every rank holds."""
    return await run_in_threadpool(core.coordinator.ledger.active)


# The body is read in the handler, after auth: a body parameter would be parsed before the
# token is checked, so a caller without a token would get 422 for malformed JSON instead of 401.
_ROLLBACK_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": RollbackRequest.model_json_schema()}},
    }
}


@router.post(
    "/rollback",
    response_model=RollbackResult,
    responses=_ROLLBACK_ERRORS,
    openapi_extra=_ROLLBACK_BODY,
)
async def post_rollback(request: Request, core: Core, _: Admin) -> Any:
    """Roll every rank back, all or none: to `to_version`, or to the previously committed one."""
    raw = (await _json_bytes(request)).strip()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if raw and content_type != "application/json":
        # A body that is not declared JSON is not obeyed: a form or a text/plain body can be
        # sent cross-site without a preflight, a JSON one cannot.
        raise UnsupportedMediaType(
            'send the rollback body as JSON ({"to_version": N}) with Content-Type '
            f"application/json, or no body at all (got {content_type or 'no Content-Type'!r})"
        )
    body = RollbackRequest.model_validate_json(raw) if raw not in (b"", b"null") else None
    to_version = body.to_version if body else None
    return await run_in_threadpool(core.rollback, to_version)
