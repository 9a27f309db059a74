"""The FastAPI app: OpenAI-compatible endpoints over one `AsyncEngine`.

`create_app(async_engine, config)` builds the app; `server.cli.run_serve` loads the engine and
runs it under uvicorn with the graceful-drain signal handling. Tests build the same app around
a real engine and run it on a loopback port. Routes stay thin: body reading in `body.py`,
validation in `protocol.py`, prompt bounds and tokenization in `prompts.py`, the request's
life in the engine and its response in `generation.py`. `/openapi.json` and `/docs` come from
the same request and response models.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from . import protocol as P
from . import responses as R
from .async_engine import AsyncEngine
from .auth import APIKeyMiddleware
from .body import read_json_body
from .errors import from_validation_errors, install_error_handlers, invalid_request
from .generation import Generation, build_choices
from .metrics import CONTENT_TYPE_LATEST
from .prompts import PromptEncoder
from .state import ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app"]

DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
API_VERSION = "0.1.0"

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": R.ErrorResponse, "description": why} for status, why in (
        (400, "invalid request (OpenAI's error JSON; FastAPI's 422 is answered 400)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body over --max-request-bytes"),
        (415, "request body not sent as JSON"),
        (429, "queue full; Retry-After and retry-after-ms say when to retry"),
        (500, "this request failed inside the engine"),
        (503, "draining after SIGTERM, or the engine stopped"))}
# With `stream: true`: Server-Sent Events; each event's `data` is one chunk's JSON (a
# CompletionResponse-shaped chunk, or a ChatCompletionChunk), the last one `[DONE]`.
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "chunk JSON, one per finished "
                                                          "block, or [DONE]"},
                   "event": {"type": "string"}},
    "description": "one Server-Sent Event"}}}
# In the schema besides what the routes reference: the request bodies and the streamed chunk.
_SCHEMA_MODELS: tuple[type[BaseModel], ...] = (P.CompletionRequest, P.ChatCompletionRequest,
                                               R.ChatCompletionChunk)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _validate(model_cls: type[BaseModel], data: dict) -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


def _check_group_size(prompts: int, n: int, limit: int) -> None:
    if prompts * n > limit:
        raise invalid_request(
            f"This request asks for {prompts * n} generations ({prompts} prompt(s) x n={n}); "
            f"at most {limit} per request (the server's queue bound).", param="n")


def create_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    llm = engine.engine
    encoder = PromptEncoder(llm.tokenizer, llm.max_model_len, config.tokenizer_threads,
                            config.chat_special_tokens_in_content)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.cdlm = ServerState(engine, config)
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.shutdown()
            encoder.close()

    app = FastAPI(title="cdlm", version=API_VERSION, lifespan=lifespan,
                  description="OpenAI-compatible server for Consistency Diffusion Language "
                              "Models", docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    install_error_handlers(app)
    app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    if config.allowed_origins:   # outermost, so preflights are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.openapi = lambda: _openapi(app, llm.max_model_len, llm.model_config.vocab_size,  # type: ignore[method-assign]
                                   engine.max_queue)

    def state(request: Request) -> ServerState:
        return request.app.state.cdlm

    @app.get("/health", response_model=R.Health,
             responses={503: {"model": R.Health, "description": "draining or engine dead"}})
    async def health(request: Request) -> Response:
        st = state(request)
        if st.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not st.engine.healthy:
            return JSONResponse({"status": "engine_dead", "reason": st.engine.dead_reason},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics(request: Request) -> Response:
        return Response(state(request).engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=R.ModelList, responses={401: _ERROR_RESPONSES[401]})
    async def models(request: Request) -> Response:
        st = state(request)
        return JSONResponse(R.models_response(st.config.served_model_names, st.created,
                                              st.config.model_root, st.max_model_len))

    @app.get("/v1/models/{model_id:path}", response_model=R.ModelCard,
             responses={k: _ERROR_RESPONSES[k] for k in (401, 404)})
    async def model_info(request: Request, model_id: str) -> Response:
        st = state(request)
        st.check_model(model_id)
        data = R.models_response([model_id], st.created, st.config.model_root,
                                 st.max_model_len)["data"][0]
        return JSONResponse(data)

    async def run(st: ServerState, gen: Generation) -> Response:
        st.enter()
        streaming = False
        try:
            await gen.admit()
            if gen.req.stream:
                streaming = True
                return gen.streaming_response()
            return await gen.run_full()
        except asyncio.CancelledError:
            gen.abort_unfinished()
            raise
        finally:
            if not streaming:
                st.leave()

    @app.post("/v1/completions", response_model=R.CompletionResponse,
              responses={200: {"content": _SSE}, **_ERROR_RESPONSES},
              openapi_extra=_json_body(P.CompletionRequest))
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        st = state(request)
        st.check_admission()
        req = _validate(P.CompletionRequest,
                        await read_json_body(request, config.max_request_bytes))
        model = st.check_model(req.model)
        prompts = req.check(st.max_model_len, st.vocab_size, engine.max_queue)
        _check_group_size(len(prompts), req.n or 1, engine.max_queue)
        ids = await encoder.completion_prompts(prompts)
        max_tokens = req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        for p in ids:
            encoder.check_context(len(p), max_tokens)
        choices = build_choices(req, ids, max_tokens, arrival)
        return await run(st, Generation(st, request, "completion", model, req, choices))

    @app.post("/v1/chat/completions", response_model=R.ChatCompletionResponse,
              responses={200: {"content": _SSE}, **_ERROR_RESPONSES},
              openapi_extra=_json_body(P.ChatCompletionRequest))
    async def chat(request: Request) -> Response:
        arrival = time.monotonic()
        st = state(request)
        st.check_admission()
        req = _validate(P.ChatCompletionRequest,
                        await read_json_body(request, config.max_request_bytes))
        model = st.check_model(req.model)
        messages = req.check(st.max_model_len)
        _check_group_size(1, req.n or 1, engine.max_queue)
        ids = await encoder.chat_prompt(messages)
        if req.max_tokens is not None:
            max_tokens = req.max_tokens
        else:
            max_tokens = max(1, min(config.default_chat_max_tokens, st.max_model_len - len(ids)))
        encoder.check_context(len(ids), max_tokens)
        choices = build_choices(req, [ids], max_tokens, arrival)
        return await run(st, Generation(st, request, "chat", model, req, choices))

    return app


def _openapi(app: FastAPI, max_model_len: int, vocab_size: int, max_queue: int
             ) -> dict[str, Any]:
    """FastAPI's schema plus the request models (bodies are read by `read_json_body`, so
    FastAPI does not see them as parameters), with this model's limits filled in."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in _SCHEMA_MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    _fill_limits(schemas, max_model_len, vocab_size, max_queue)
    app.openapi_schema = schema
    return schema


def _fill_limits(schemas: dict[str, Any], max_model_len: int, vocab_size: int,
                 max_queue: int) -> None:
    """What depends on the served model: context length, vocabulary, queue bound."""
    stream_rule = {"if": {"properties": {"stream_options": {"type": "object"}},
                          "required": ["stream_options"]},
                   "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field]["maximum"] = max_model_len
        schemas[name].update(stream_rule)
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for form in prompt["anyOf"][1:]:
        items = form["items"]
        if items.get("type") == "integer":
            items["maximum"] = vocab_size - 1
            form["maxItems"] = max_model_len
        elif items.get("type") == "array":
            items["items"]["maximum"] = vocab_size - 1
            items["maxItems"] = max_model_len
            form["maxItems"] = max_queue
        else:
            form["maxItems"] = max_queue
