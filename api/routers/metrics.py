"""Prometheus metrics (text exposition format); like every read, it needs a token."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Core, Reader
from api.schemas import error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        **error_responses(401, 403, 503),
    },
)
async def metrics(core: Core, _: Reader) -> Response:
    """Update durations per stage, outcomes, per-channel fallbacks, active version, live ranks."""
    await run_in_threadpool(core.refresh_metrics)
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)
