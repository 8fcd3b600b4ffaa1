"""Builds the FastAPI app around a started `Refitd` core."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routers import artifacts, health, metrics, weights
from orchestrator.service.daemon import Refitd


def create_app(core: Refitd) -> FastAPI:
    app = FastAPI(
        title="refitd",
        version="0.1.0",
        summary="Versioned, verified, all-or-nothing FP8 weight updates for TP-served LLMs.",
        description=(
            "Trainers post updates (trainer token); operators read state (either token) and "
            "roll back (admin token). `/healthz` and `/readyz` need no token."
        ),
    )
    app.state.core = core
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(weights.router)
    app.include_router(metrics.router)
    app.include_router(artifacts.router)
    return app
