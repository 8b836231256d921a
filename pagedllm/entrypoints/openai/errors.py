"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers here turn FastAPI's own errors (unknown route, pydantic's 422, malformed JSON) into that
shape, so a client never sees a framework's raw dump and nothing it sends becomes a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from pagedllm.logger import init_logger

logger = init_logger(__name__)

MAX_VALIDATION_ERRORS_SHOWN = 3

# The errors any route may answer with, for the OpenAPI document (each in ErrorResponse's shape).
DOCUMENTED_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request: a bad field, a value over a limit, a prompt too long"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model or route"),
        (413, "Request body larger than --max-request-body-size"),
        (500, "The engine failed while serving the request"),
        (503, "Overloaded (retry after Retry-After seconds) or the engine has stopped"),
    )
}


class OpenAIError(Exception):
    """Raised anywhere in a handler; becomes a JSON error response with this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> OpenAIError:
        return cls(400, message, param, "invalid_value")

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, self.param, self.code)


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type(status), param=param,
                                         code=code))


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(status, message, param, code)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's error list -> one readable message and the first offending parameter."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {reason}".rstrip(": "), None
    parts, first_param = [], None
    for error in errors[:MAX_VALIDATION_ERRORS_SHOWN]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        parts.append(f"{param or 'body'}: {error.get('msg', 'invalid')}")
    more = len(errors) - MAX_VALIDATION_ERRORS_SHOWN
    if more > 0:
        parts.append(f"and {more} more")
    return "invalid request: " + "; ".join(parts), first_param


# ---- handlers -----------------------------------------------------------------------------------
async def _openai_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation_errors(list(exc.errors()))
    return error_response(400, message, param, "invalid_value")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    code = "request_too_large" if exc.status_code == 413 else None
    return error_response(exc.status_code, message, code=code,
                          headers=getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal server error ({type(exc).__name__}); see the "
                               "server log", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
