"""Liveness and readiness, for operators and load balancers. No token needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.deps import Core

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    reason: str


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process lives and serves HTTP."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(core: Core) -> JSONResponse:
    """200 only when Redis answers, every rank is alive and holds the active version, and no
    update is stuck; else 503 with the reason."""
    state = await run_in_threadpool(core.readiness)
    body = Ready(ready=state.ready, reason=state.reason).model_dump()
    return JSONResponse(status_code=200 if state.ready else 503, content=body)
