"""Maps errors to HTTP answers in one place: `{"detail": "<a sentence>"}` with a precise code."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from orchestrator.errors import RefitError, TooBusy

log = logging.getLogger("refitd.api")


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable sentence from pydantic's error list."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RefitError)
    async def _refit_error(_: Request, exc: RefitError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooBusy) else None
        return JSONResponse(
            status_code=exc.status_code,
            content={"detail": exc.message, **exc.extra},
            headers=headers,
        )

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        # ConnectionError covers a refused password too; either way the state is unreachable.
        log.error("Redis is unavailable: %s", exc)
        return JSONResponse(status_code=503, content={"detail": f"Redis is unavailable: {exc}"})

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": describe_validation(exc.errors())})

    @app.exception_handler(ValidationError)
    async def _body_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": describe_validation(exc.errors())})
