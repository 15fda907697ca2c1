"""The OpenAI-compatible FastAPI app: `build_app(engine, cfg)`. Nothing happens at import time.

The only module that speaks HTTP: handlers return protocol objects or streams of server-sent events, and
raise `APIError`s; this turns them into responses. Its OpenAPI schema is the API: request bodies, the
error envelope of each status, and what /health and /metrics answer.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import fdkit
from fdkit.engine.async_engine import AsyncLLM
from fdkit.serving import protocol as P
from fdkit.serving.app_guard import AuthGuard, ServerState, parse_json
from fdkit.serving.errors import APIError, from_validation_error, internal_error
from fdkit.serving.streams import EventStream

logger = logging.getLogger(__name__)

ERROR_DESCRIPTIONS = {
    400: "Invalid request",
    401: "Missing or invalid API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "Too many concurrent requests",
    503: "The engine is not serving, or the server is shutting down",
}


def _errors(*codes: int) -> dict:
    return {code: {"model": P.ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def build_app(engine: AsyncLLM, cfg) -> FastAPI:
    state = ServerState(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.is_draining = True

    app = FastAPI(title="fdkit", version=fdkit.__version__, lifespan=lifespan)
    app.state.fdkit = state
    public = ["/health", *cfg.server.public_paths]
    app.add_middleware(AuthGuard, api_keys=list(cfg.server.api_keys or []), public_paths=public)
    app.add_middleware(  # outermost: preflights need no key, and every answer gets CORS headers
        CORSMiddleware,
        allow_origins=list(cfg.server.cors_origins),
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,
    )
    _add_error_handlers(app)
    _add_service_routes(app, state)
    if cfg.server.metrics_port in (None, cfg.server.port):  # else on its own port: build_metrics_app
        _add_metrics_route(app, state)
    _add_generation_routes(app, state)
    _add_tokenizer_routes(app, state)
    _complete_openapi(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return _error_response(APIError(400, "invalid request", code="invalid_value"))

    @app.exception_handler(Exception)
    async def unhandled_error(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", None) or P.random_id("req")
        logger.error("request %s: internal error", request_id, exc_info=exc)
        return _error_response(internal_error(request_id))


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    health_responses = {200: {"description": "Serving (empty body)", "content": {}}, **_errors(503)}

    @app.get("/health", response_class=Response, responses=health_responses)
    async def health():
        try:
            state.check_serving()
        except APIError as exc:
            return _error_response(exc)
        return Response(status_code=200)

    @app.get("/version", responses=_errors(401))
    async def version() -> dict[str, str]:
        return {"version": fdkit.__version__}

    @app.get("/v1/models", response_model=P.ModelList, responses=_errors(401))
    async def models():
        card = P.ModelCard(
            id=state.serving.model_name,
            root=str(state.engine.llm.model_path),
            max_model_len=state.engine.llm.max_model_len,
        )
        return P.ModelList(data=[card])


def build_metrics_app(state: ServerState, cfg) -> FastAPI:
    """`/metrics` alone, for `server.metrics_port` (FastDeploy's --metrics-port), behind the same keys."""
    app = FastAPI(title="fdkit metrics", version=fdkit.__version__, openapi_url=None)
    public = ["/health", *cfg.server.public_paths]
    app.add_middleware(AuthGuard, api_keys=list(cfg.server.api_keys or []), public_paths=public)
    _add_error_handlers(app)
    _add_metrics_route(app, state)
    return app


def _add_metrics_route(app: FastAPI, state: ServerState) -> None:
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    text = {
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        401: {"content": envelope, "description": ERROR_DESCRIPTIONS[401]},
    }

    @app.get("/metrics", response_class=PlainTextResponse, responses=text)
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    errors = _errors(400, 401, 404, 413, 429, 503)

    def streamed(model: type[BaseModel], chunk: type[BaseModel]) -> dict:
        events = {"text/event-stream": {"schema": _event_schema(chunk)}}
        return {200: {"model": model, "content": events, "description": "The response, or its events"}}

    chat = streamed(P.ChatCompletionResponse, P.ChatCompletionStreamResponse)

    @app.post("/v1/chat/completions", responses={**chat, **errors})
    async def chat_completions(request: Request):
        req = await _parse(state, request, P.ChatCompletionRequest, "chatcmpl")
        return await _run(state, state.serving.chat, req)

    @app.post("/v1/completions", responses={**streamed(P.CompletionResponse, P.CompletionResponse), **errors})
    async def completions(request: Request):
        req = await _parse(state, request, P.CompletionRequest, "cmpl")
        return await _run(state, state.serving.completion, req)


def _add_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    """vLLM's /tokenize and /detokenize, under /v1 and (out of the schema) where vLLM serves them."""
    errors = _errors(400, 401, 404, 413, 503)

    async def tokenize(request: Request):
        req = await _parse(state, request, P.TokenizeRequest)
        return JSONResponse((await state.serving.tokenize(req)).model_dump(exclude_none=True))

    async def detokenize(request: Request):
        req = await _parse(state, request, P.DetokenizeRequest)
        return JSONResponse((await state.serving.detokenize(req)).model_dump(exclude_none=True))

    for prefix, in_schema in (("/v1", True), ("", False)):
        app.post(
            prefix + "/tokenize",
            responses={200: {"model": P.TokenizeResponse}, **errors},
            include_in_schema=in_schema,
        )(tokenize)
        app.post(
            prefix + "/detokenize",
            responses={200: {"model": P.DetokenizeResponse}, **errors},
            include_in_schema=in_schema,
        )(detokenize)


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_schema(chunk: type[BaseModel]) -> dict:
    """One server-sent event: `data` is a JSON chunk, an error envelope, or `[DONE]` at the end."""
    payload = {"anyOf": [_ref(chunk), _ref(P.ErrorResponse)]}
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": payload},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}


def _complete_openapi(app: FastAPI) -> None:
    """The routes read their bodies themselves (size limit first, our own errors): their schema says
    what they read (each request model, under components), and the stream chunks are there too."""
    bodies = {
        "/v1/chat/completions": P.ChatCompletionRequest,
        "/v1/completions": P.CompletionRequest,
        "/v1/tokenize": P.TokenizeRequest,
        "/v1/detokenize": P.DetokenizeRequest,
    }
    default_openapi = app.openapi

    def add(components: dict, model: type[BaseModel], mode: str) -> None:
        schema = model.model_json_schema(mode=mode, ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        add(components, P.ChatCompletionStreamResponse, "serialization")
        for path, model in bodies.items():
            add(components, model, "validation")
            content = {"application/json": {"schema": _ref(model)}}
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _parse(state: ServerState, request: Request, model: type[P.RequestModel], prefix: str = ""):
    """Admission, limits, JSON and schema checks, each with its own status and message; a generation
    request (`prefix` given) gets its request id."""
    state.check_serving()
    payload = parse_json(await _read_body(request, state.cfg.server.max_request_bytes))
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
    if prefix:
        req.request_id = request.state.request_id = req.request_id or P.random_id(prefix)
    return req


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: checked against Content-Length first, then while it arrives."""
    too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise APIError(400, "the client disconnected", code="client_disconnected") from exc
    return b"".join(chunks)


async def _run(state: ServerState, handler, req) -> Response:
    """Runs a handler within the concurrency limit; a stream holds its slot until it is closed."""
    state.admit()
    try:
        result = await handler(req)
    except BaseException:
        state.release()
        raise
    if isinstance(result, BaseModel):
        state.release()
        return JSONResponse(result.model_dump(exclude_none=True))
    result.on_close(state.release)
    return EventStreamResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class EventStreamResponse(StreamingResponse):
    """Closes its stream whatever happens (client gone, cancelled, never started): the engine requests
    are aborted and the stream's slot and ids are given back."""

    body_iterator: EventStream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
