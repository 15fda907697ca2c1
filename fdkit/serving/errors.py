"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status.

`APIError` carries its status and body; the app turns it into an HTTP response. What reaches a client
is a message of ours: never a traceback, a file path or an exception's text from deep down (those go to
the log, with the request id).
"""

from __future__ import annotations

import re
from http import HTTPStatus

from pydantic import BaseModel, ValidationError

from fdkit.serving import protocol as P

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
# Signs of a message that is not for clients: a traceback, a source file, an absolute path.
_LEAKY = re.compile(r"Traceback|File \"|\.py\b|(^|[\s'\"(=])/[\w.-]+/")


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code
        self.headers = headers

    def body(self) -> dict:
        error_type = ERROR_TYPES.get(self.status_code, HTTPStatus(self.status_code).phrase)
        info = P.ErrorInfo(message=self.message, type=error_type, param=self.param, code=self.code)
        return P.ErrorResponse(error=info).model_dump()


def internal_error(request_id: str) -> APIError:
    return APIError(500, f"internal error (request id {request_id})", code="internal_error")


def engine_unavailable(request_id: str | None = None) -> APIError:
    suffix = f" (request id {request_id})" if request_id else ""
    return APIError(503, f"the engine is not serving{suffix}", code="engine_unavailable")


def client_message(text: str, fallback: str = "the request could not be processed") -> str:
    """`text` if it is safe to show a client (one short line, no trace or path), else `fallback`."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:500] if line and not _LEAKY.search(text) else fallback


def from_validation_error(exc: ValidationError) -> APIError:
    """The most specific problem (the deepest one: for a union, the member that got furthest)."""
    first = max(exc.errors(), key=lambda error: len(error["loc"]))
    param = ".".join(str(part) for part in first["loc"] if _is_field(part)) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, client_message(message, "invalid request"), param=param, code="invalid_value")


def _is_field(part: str | int) -> bool:
    """Locations name fields and list indices, and for unions also the member's type: leave those out."""
    return isinstance(part, int) or part in _FIELD_NAMES


def _field_names(model: type[BaseModel], seen: set[str]) -> set[str]:
    if model.__name__ not in seen:
        seen.add(model.__name__)
        for name, info in model.model_fields.items():
            _FIELD_NAMES.add(name)
            for arg in _types_in(info.annotation):
                _field_names(arg, seen)
    return _FIELD_NAMES


def _types_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _types_in(arg)]


_FIELD_NAMES: set[str] = set()
for _model in (P.ChatCompletionRequest, P.CompletionRequest, P.TokenizeRequest, P.DetokenizeRequest):
    _field_names(_model, set())


def from_engine_error(exc: ValueError) -> APIError:
    message = client_message(str(exc))
    if "too long" in message:
        return APIError(400, message, param="messages", code="context_length_exceeded")
    return APIError(400, message, code="invalid_value")
