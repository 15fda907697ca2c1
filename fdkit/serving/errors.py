"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status.

`APIError` carries its status and body; the app turns it into an HTTP response.
"""

from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError

from fdkit.serving.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code

    def body(self) -> dict:
        error_type = ERROR_TYPES.get(self.status_code, HTTPStatus(self.status_code).phrase)
        info = ErrorInfo(message=self.message, type=error_type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def engine_unavailable(exc: Exception) -> APIError:
    return APIError(503, str(exc), code="engine_unavailable")


def from_validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code="invalid_value")


def from_engine_error(exc: ValueError) -> APIError:
    message = str(exc)
    if "too long" in message:
        return APIError(400, message, param="messages", code="context_length_exceeded")
    return APIError(400, message, code="invalid_value")
