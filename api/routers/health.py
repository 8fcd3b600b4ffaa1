"""Liveness and readiness, for operators and load balancers. No token needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.deps import Core

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str  # "ok" or "unavailable"
    reason: str | None = None


class Ready(BaseModel):
    ready: bool
    reason: str


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(core: Core) -> JSONResponse:
    """200 while the daemon can work (it serves HTTP and its Redis answers); else 503 with the
    reason, e.g. while its embedded Redis restarts, or once it has given up on it."""
    state = await run_in_threadpool(core.liveness)
    if state.ready:
        return JSONResponse(
            status_code=200, content=Health(status="ok").model_dump(exclude_none=True)
        )
    body = Health(status="unavailable", reason=state.reason).model_dump()
    return JSONResponse(status_code=503, content=body)


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(core: Core) -> JSONResponse:
    """200 only when Redis answers, every rank is alive and holds the active version, and no
    update is stuck; else 503 with the reason."""
    state = await run_in_threadpool(core.readiness)
    body = Ready(ready=state.ready, reason=state.reason).model_dump()
    return JSONResponse(status_code=200 if state.ready else 503, content=body)
