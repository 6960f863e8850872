"""Every error the API returns is JSON of one shape (``schemas.ErrorBody``), including the
ones FastAPI and Starlette raise themselves (404 of unknown routes, 405, malformed JSON)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from service.schemas import ErrorBody, FieldError

log = logging.getLogger(__name__)

LOCATIONS = ("body", "query", "header", "path", "cookie")
SHOWN_INPUT_CHARS = 80
DOTTED = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*")


def error_response(
    status_code: int,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(detail=detail, errors=errors).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


SPEC_KINDS = ("train", "sweep")


def field_error(err: dict[str, Any]) -> FieldError:
    """A pydantic error as (dotted field, location, message); loc is e.g. (body, optim, lr)."""
    loc = list(err.get("loc", ()))
    location = str(loc.pop(0)) if loc and loc[0] in LOCATIONS else "body"
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    kind = err.get("type")
    if kind == "json_invalid":
        # loc holds a character offset into the body, not a field
        where = f" at character {loc[0]}" if loc else ""
        reason = (err.get("ctx") or {}).get("error", "")
        return FieldError(field="", location=location, message=f"{message}{where}: {reason}")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind != "missing" and "input" in err and not isinstance(err["input"], dict | list):
        shown = repr(err.get("input"))
        if len(shown) > SHOWN_INPUT_CHARS:
            shown = shown[:SHOWN_INPUT_CHARS] + "…"
        message = f"{message} (got {shown})"
    if loc and loc[0] in SPEC_KINDS:
        loc.pop(0)  # the tag of the body's kind (train or sweep), not a field
    field = ".".join(str(p) for p in loc)
    # JobSpec's cross-field validators report on their section (or the whole spec) but start
    # the message with the exact field, e.g. "data.path is required when ...": name that one.
    named = message.split(" ", 1)[0]
    if DOTTED.fullmatch(named) and (not field or named.startswith(f"{field}.")):
        field = named
    return FieldError(field=field, location=location, message=message)


def one_line(errors: Sequence[FieldError]) -> str:
    return "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [field_error(err) for err in exc.errors()]
    return error_response(status.HTTP_422_UNPROCESSABLE_CONTENT, one_line(errors), errors)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
    log.error("database unavailable: %s", exc)
    return error_response(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "database unavailable; retry later",
        headers={"Retry-After": "5"},
    )


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(Exception, _internal_error)
