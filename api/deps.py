"""Annotated dependencies: the daemon core and the caller's role."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.service.daemon import Refitd


class Role(StrEnum):
    TRAINER = "trainer"
    ADMIN = "admin"


def get_core(request: Request) -> Refitd:
    return request.app.state.core  # type: ignore[no-any-return]


Core = Annotated[Refitd, Depends(get_core)]

# Declares the scheme in the OpenAPI document (so /docs can authorize); the header itself is
# checked by _caller_roles, whose 401s say what was wrong with it.
_BEARER = HTTPBearer(
    auto_error=False,
    description="The trainer token (updates, reads) or the admin token (rollback, reads).",
)


def _caller_roles(request: Request, core: Refitd) -> set[Role]:
    """The roles the request's Bearer token grants. In dev mode a role without a configured
    token is open to everyone."""
    auth = core.settings.auth
    tokens = {
        Role.TRAINER: auth.trainer_token.get_secret_value() if auth.trainer_token else None,
        Role.ADMIN: auth.admin_token.get_secret_value() if auth.admin_token else None,
    }
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    roles = {role for role, token in tokens.items() if token is None and core.settings.dev_mode}
    if header:
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "the Authorization header must be 'Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        matched = {
            role
            for role, token in tokens.items()
            if token is not None and hmac.compare_digest(token.encode(), presented.strip().encode())
        }
        if not matched and not roles:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "the bearer token is not valid",
                headers={"WWW-Authenticate": "Bearer"},
            )
        roles |= matched
    elif not roles:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return roles


def _requires(*allowed: Role) -> Callable[..., Role]:
    def dependency(
        request: Request,
        core: Core,
        _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> Role:
        roles = _caller_roles(request, core)
        for role in allowed:
            if role in roles:
                return role
        wanted = " or ".join(r.value for r in allowed)
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {wanted} token")

    return dependency


Trainer = Annotated[Role, Depends(_requires(Role.TRAINER))]
Admin = Annotated[Role, Depends(_requires(Role.ADMIN))]
Reader = Annotated[Role, Depends(_requires(Role.TRAINER, Role.ADMIN))]
