"""Annotated dependencies: the daemon core, and (later) the caller's role."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from orchestrator.daemon import Refitd


def get_core(request: Request) -> Refitd:
    return request.app.state.core  # type: ignore[no-any-return]


Core = Annotated[Refitd, Depends(get_core)]
