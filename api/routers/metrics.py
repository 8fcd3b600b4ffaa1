"""Prometheus metrics (text exposition format); like every read, it needs a token."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Core, Reader

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(core: Core, _: Reader) -> Response:
    """Update durations per stage, outcomes, per-channel fallbacks, active version, live ranks."""
    await run_in_threadpool(core.refresh_metrics)
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)
