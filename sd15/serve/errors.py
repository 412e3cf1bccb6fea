"""Errors as A1111 clients read them: `{"error", "detail", "body", "errors"}` with a 4xx for bad input.

    raise ApiError(422, "unknown sampler 'x'; valid: ...")     # -> 422 {"error": "ValueError", "detail": ...}
    install(app)                                               # every error of the app in that shape

A1111's `handle_exception` answers `{"error": <exception class>, "detail": <HTTPException detail or "">,
"body": "", "errors": str(e)}`. We keep the keys and put the human message in both `detail` and
`errors` (clients show one or the other). Request-body validation errors, which FastAPI would answer in
its own `{"detail": [...]}` shape, are turned into the same shape, each problem named with its field.
An unexpected exception is a 500 whose body says only that: the traceback goes to the server log,
never to the client (it would show paths and code).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sd15.serve")


class ApiError(Exception):
    """An answer other than 2xx, with the message the client sees. `kind` is A1111's "error" field."""

    def __init__(self, status: int, detail: str, kind: str = "ValueError", headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.kind, self.headers = status, detail, kind, headers or {}


def bad_input(e: ValueError) -> ApiError:
    """A ValueError of the engine (Request validation, CheckpointError, ImageError) as a 422."""
    return ApiError(422, str(e), type(e).__name__)


def error_body(kind: str, detail: str) -> dict:
    return {"error": kind, "detail": detail, "body": "", "errors": detail}


def error_response(status: int, kind: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, detail), status_code=status, headers=headers)


def describe_validation(e: RequestValidationError) -> str:
    """pydantic's errors as one line: "steps: Input should be a valid integer (got 'many'); ..."."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        text = f"{where}: {err.get('msg', 'invalid')}"
        if "input" in err and err.get("type") != "json_invalid" and isinstance(err["input"], (str, int, float, bool)):
            shown = repr(err["input"])
            text += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
        parts.append(text)
    return "; ".join(parts) or "the request body is not valid"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.kind, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(422, "RequestValidationError", describe_validation(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "HTTPException", str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(500, type(e).__name__, "internal server error; the server log has the details")
