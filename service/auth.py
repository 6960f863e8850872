"""Bearer-token authentication for the write endpoints; reading is open."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import Settings

# auto_error=False: a missing header gets our 401 (with WWW-Authenticate), not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="A token from BYOL_API_TOKENS.")


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


def user_for_token(settings: Settings, token: str) -> str | None:
    # Every stored token is compared, each in constant time, so the time taken says nothing
    # about which user (if any) a guess came close to.
    found = None
    given = token.encode()
    for user, expected in settings.api_tokens.items():
        if secrets.compare_digest(given, expected.encode()):
            found = user
    return found


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    return authenticate(request.app.state.settings, credentials)


def authenticate(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The user a request's bearer credentials (``bearer``'s reading of its header) belong to;
    a 401 that says what is wrong otherwise."""
    if not settings.api_tokens:
        raise unauthorized(
            "no API tokens are configured: the operator must set BYOL_API_TOKENS "
            '(JSON, e.g. {"alice": "a-long-random-token"}) to allow creating and cancelling jobs'
        )
    if credentials is None:
        raise unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    user = user_for_token(settings, credentials.credentials)
    if user is None:
        raise unauthorized("invalid bearer token")
    return user


User = Annotated[str, Depends(current_user)]


def is_admin(settings: Settings, user: str) -> bool:
    return user in settings.admins
