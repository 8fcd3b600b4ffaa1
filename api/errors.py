"""Maps domain errors to HTTP answers in one place: `{"detail": "..."}` with a precise code."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from orchestrator.errors import RefitError


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RefitError)
    async def _refit_error(_: Request, exc: RefitError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.message})
