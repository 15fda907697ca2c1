"""What stands between a client and the handlers, without FastAPI: the API-key check (a plain ASGI
middleware, so it covers every route and mount), the request body's JSON checks, and the server's
admission state (concurrency limit, draining on shutdown)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fdkit.engine.async_engine import AsyncLLM
from fdkit.serving.errors import APIError
from fdkit.serving.handlers import OpenAIServing
from fdkit.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

MAX_JSON_DEPTH = 64  # requests nest 5 deep; arbitrary depth only invites RecursionErrors downstream
DRAIN_FLUSH_S = 5.0  # after fail_all: how long the ended streams get to send their last events


class ServerState:
    """The serving objects of one app, and which requests it admits."""

    def __init__(self, engine: AsyncLLM, cfg):
        self.engine, self.cfg = engine, cfg
        self.serving = OpenAIServing(engine, cfg)
        self.metrics = ServerMetrics(engine)
        engine.metrics = self.metrics
        self.num_in_flight = 0
        self.is_draining = False

    def check_serving(self) -> None:
        if self.is_draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if not self.engine.is_healthy:
            raise APIError(503, "the engine is not serving", code="engine_unavailable")

    def admit(self) -> None:
        """Takes a slot of the concurrency limit (429 when none is left); `release` gives it back."""
        limit = self.cfg.server.max_concurrency
        if self.num_in_flight >= limit:
            raise APIError(429, f"too many concurrent requests (limit {limit})", code="too_many_requests")
        self.num_in_flight += 1

    def release(self) -> None:
        self.num_in_flight -= 1

    async def drain(self, grace_s: float) -> None:
        """Admits nothing more, lets what runs finish within `grace_s`, then ends the rest."""
        self.is_draining = True
        logger.info("draining: %d request(s) in flight, up to %.1f s", self.num_in_flight, grace_s)
        if await self._wait_idle(grace_s):
            return
        logger.warning("shutdown grace period over: ending %d request(s)", self.num_in_flight)
        self.engine.fail_all("the server shut down before the request finished")
        await self._wait_idle(DRAIN_FLUSH_S)

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.num_in_flight


# -- request bodies ---------------------------------------------------------------------------------


def parse_json(body: bytes) -> dict:
    """A JSON object of well-formed text (no lone surrogates), nested at most MAX_JSON_DEPTH deep."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise _too_deep() from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        message = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise APIError(400, f"the body is not valid JSON: {message}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_value")
    _check_values(payload)
    return payload


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep() -> APIError:
    return APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def _check_values(payload: dict) -> None:
    """Walks the payload without recursion: its depth, and every string (keys too) encodable as UTF-8."""
    stack: list[tuple[object, tuple]] = [(payload, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict | list):
            if len(path) >= MAX_JSON_DEPTH:
                raise _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                _check_text(str(key), path)
                stack.append((item, (*path, key)))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        param = ".".join(map(str, path)) or None
        message = "a lone UTF-16 surrogate (\\ud800-\\udfff) is not text"
        raise APIError(400, f"{param}: {message}" if param else message, param, "invalid_value") from exc


# -- API keys ---------------------------------------------------------------------------------------


class AuthGuard:
    """ASGI middleware: with API keys set, every path but `public_paths` (and what is under them) needs
    `Authorization: Bearer <key>`; others get 401 in OpenAI's envelope."""

    def __init__(self, app, api_keys: list[str], public_paths: list[str]):
        self.app, self.api_keys = app, set(api_keys)
        self.public_paths = [p.rstrip("/") or "/" for p in public_paths]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            message = "invalid or missing API key (send 'Authorization: Bearer <key>')"
            error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await send_error(send, error)

    def _allowed(self, scope) -> bool:
        if not self.api_keys or self._is_public(scope["path"]):
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        return token in self.api_keys

    def _is_public(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.public_paths)


async def send_error(send, error: APIError) -> None:
    """An error response in OpenAI's envelope, straight through ASGI."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
