"""Every error as OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request body as a 400, naming the field (`messages[0].role`)."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error')})")
    loc = list(err["loc"])[1:] if err["loc"][:1] == ("body",) else list(err["loc"])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    if not param and err["type"] == "value_error":  # a check of the whole body
        return APIError(400, message)
    if not param:
        return APIError(400, f"the body must be a JSON object ({message})")
    return APIError(400, f"{param}: {message}", param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer APIError, validation errors, HTTP errors (404 route, 405) and crashes alike."""

    def respond(e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.status, e.param, e.code), e.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return respond(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
