"""The OpenAI-compatible FastAPI app: `build_app(engine, cfg)`. Nothing happens at import time.

The only module that speaks HTTP: handlers return protocol objects or streams of server-sent events, and
raise `APIError`s; this turns them into responses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import fdkit
from fdkit.engine.async_engine import AsyncLLM
from fdkit.serving import protocol as P
from fdkit.serving.errors import APIError, from_validation_error
from fdkit.serving.handlers import OpenAIServing
from fdkit.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(self, engine: AsyncLLM, cfg):
        self.engine, self.cfg = engine, cfg
        self.serving = OpenAIServing(engine, cfg)
        self.metrics = ServerMetrics(engine)
        engine.metrics = self.metrics
        self.api_keys = set(cfg.server.api_keys or [])
        self.num_in_flight = 0
        self.is_shutting_down = False


def build_app(engine: AsyncLLM, cfg) -> FastAPI:
    state = ServerState(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.is_shutting_down = True

    app = FastAPI(title="fdkit", version=fdkit.__version__, lifespan=lifespan)
    app.state.fdkit = state
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cfg.server.cors_origins),
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,
    )
    _add_error_handlers(app)
    _add_service_routes(app, state)
    _add_generation_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return _error_response(APIError(400, str(exc.errors()[0].get("msg")), code="invalid_value"))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("unhandled error")
        error = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
        return _error_response(error)


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.engine.is_healthy and not state.is_shutting_down:
            return Response(status_code=200)
        return _error_response(APIError(503, "the engine is not serving", code="engine_unavailable"))

    @app.get("/version")
    async def version():
        return {"version": fdkit.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(state, request)
        card = P.ModelCard(
            id=state.serving.model_name,
            root=str(state.engine.llm.model_path),
            max_model_len=state.engine.llm.max_model_len,
        )
        return P.ModelList(data=[card]).model_dump()


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(state, request, P.ChatCompletionRequest)
        return await _run(state, state.serving.chat, req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(state, request, P.CompletionRequest)
        return await _run(state, state.serving.completion, req)


async def _parse(state: ServerState, request: Request, model: type[P.RequestModel]):
    """Auth, limits, JSON and schema checks, each with its own status and message."""
    _check_auth(state, request)
    if state.is_shutting_down or not state.engine.is_healthy:
        message = "the server is shutting down or its engine has stopped"
        raise APIError(503, message, code="engine_unavailable")
    payload = await _read_json(request, state.cfg.server.max_request_bytes)
    try:
        req = model.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    if req.unknown_fields:
        logger.info("ignoring unknown request fields: %s", ", ".join(req.unknown_fields))
    name = state.serving.model_name
    if state.cfg.server.strict_model_name and req.model not in (None, name):
        message = f"The model `{req.model}` does not exist; this server serves `{name}`"
        raise APIError(404, message, "model", "model_not_found")
    return req


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, at most `limit` bytes (checked before and after reading it)."""
    too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = await request.body()
    if len(body) > limit:
        raise too_large
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_value")
    return payload


def _check_auth(state: ServerState, request: Request) -> None:
    if not state.api_keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    if token not in state.api_keys:
        raise APIError(
            401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
        )


async def _run(state: ServerState, handler, req) -> Response:
    """Runs a handler within the concurrency limit; a stream holds its slot until it ends."""
    limit = state.cfg.server.max_concurrency
    if state.num_in_flight >= limit:
        raise APIError(429, f"too many concurrent requests (limit {limit})", code="too_many_requests")
    state.num_in_flight += 1
    try:
        result = await handler(req)
    except BaseException:
        state.num_in_flight -= 1
        raise
    if isinstance(result, BaseModel):
        state.num_in_flight -= 1
        return JSONResponse(result.model_dump(exclude_none=True))
    events = _release_after(state, result)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _release_after(state: ServerState, events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        state.num_in_flight -= 1


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code)
