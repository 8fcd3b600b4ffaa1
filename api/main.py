"""Builds the FastAPI app around a started `Refitd` core."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routers import health
from orchestrator.daemon import Refitd


def create_app(core: Refitd) -> FastAPI:
    app = FastAPI(
        title="refitd",
        version="0.1.0",
        summary="Versioned, verified, all-or-nothing FP8 weight updates for TP-served LLMs.",
    )
    app.state.core = core
    install_error_handlers(app)
    app.include_router(health.router)
    return app
