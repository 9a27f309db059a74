"""The FastAPI app: OpenAI-compatible endpoints over one `AsyncEngine`.

`create_app(async_engine, config)` builds the app; `server.cli.run_serve` loads the engine and
runs it under uvicorn with the graceful-drain signal handling. Tests build the same app around
a real engine and run it on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import protocol as P
from .async_engine import (AsyncEngine, EngineDeadError, QueueFullError, RequestAbortedError,
                           RequestFailedError)
from .errors import (APIError, draining, engine_dead, from_validation_errors, install_error_handlers,
                     internal_error, invalid_request, model_not_found, queue_full, unauthorized)
from .metrics import CONTENT_TYPE_LATEST

logger = logging.getLogger("cdlm.server")

DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256        # chat without max_tokens: the paper's generation length,
                                     # clipped to the context left after the prompt


@dataclass
class ServerConfig:
    served_model_names: list[str] = field(default_factory=lambda: ["cdlm-default"])
    api_key: str | None = None
    drain_timeout: float = 30.0
    max_model_len: int | None = None
    vocab_size: int | None = None
    max_num_seqs: int = 64
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    model_root: str | None = None    # what /v1/models reports as `root` (path or hub id)


class ServerState:
    """Admission state shared by the handlers, the drain logic and /health."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.created = int(time.time())

    # --- admission ----------------------------------------------------------------------
    def check_admission(self) -> None:
        if self.draining:
            self.engine.metrics.observe_failure("rejected")
            raise draining()
        if not self.engine.healthy:
            self.engine.metrics.observe_failure("rejected")
            raise engine_dead(self.engine.dead_reason or "")

    def check_model(self, model: str | None) -> str:
        names = self.config.served_model_names
        if model is None or model == "":
            return names[0]
        if model not in names:
            raise model_not_found(model, names)
        return model

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    # --- drain --------------------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Stop admission, wait for in-flight requests up to `timeout`; abort the rest.

        Returns True when everything finished in time."""
        self.draining = True
        logger.info("draining: %d request(s) in flight, timeout %.1fs", self.inflight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            logger.warning("drain timeout: aborting %d request(s)", self.inflight)
            self.engine.abort_all("server shutting down: drain timeout reached")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=5.0)
            return False


# ------------------------------------------------------------------------------------------
# Auth


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/* only, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._digest is not None and scope["type"] == "http":
            path = scope.get("path", "")
            if path == "/v1" or path.startswith("/v1/"):
                if not self._authorized(scope):
                    await unauthorized().response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                header = v
                break
        scheme, _, token = header.partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        # Both sides hashed to a fixed length: the comparison leaks neither content nor length.
        ok = hmac.compare_digest(given, self._digest)
        return ok and scheme.lower() == b"bearer"


# ------------------------------------------------------------------------------------------
# Streaming response with active disconnect detection


class SSEResponse(StreamingResponse):
    """Server-Sent Events. Watches for the client going away *while waiting for the engine*
    (not only when the next chunk fails to send), so an abandoned request is aborted at once
    and stops within one engine step."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(body, status_code=200, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        stream_task = asyncio.create_task(stream())
        listen_task = asyncio.create_task(listen())
        try:
            done, _ = await asyncio.wait({stream_task, listen_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if stream_task in done:
                with contextlib.suppress(OSError):
                    stream_task.result()   # propagate real errors, not a vanished peer
            else:
                logger.info("client disconnected during streaming; aborting")
        finally:
            await _cancel_and_wait(stream_task, listen_task)
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


async def _cancel_and_wait(*tasks: asyncio.Task) -> None:
    """Cancel the tasks and wait until each has ended, whatever it raised."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------------------------------
# Generation core (shared by both endpoints)


@dataclass
class _Choice:
    index: int
    request_id: str
    prompt: Any
    params: Any
    count_prompt: bool            # count its prompt tokens in usage (once per prompt, not per n)
    stream: Any = None
    text: str = ""                # the output so far (final text once finished)
    sent: str = ""                # what was streamed so far
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    steps: int = 0
    num_blocks: int = 0
    prompt_tokens: int = 0
    started: bool = False


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _sampling_params(req: P._SamplingFields, max_tokens: int, seed: int | None) -> Any:
    from cdlm.sampling_params import SamplingParams

    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "stop": req.stop_list()}
    if req.temperature is not None:
        kwargs["temperature"] = float(req.temperature)
    if req.top_p is not None:
        kwargs["top_p"] = float(req.top_p)
    if seed is not None:
        kwargs["seed"] = seed
    if req.threshold is not None:
        kwargs["threshold"] = float(req.threshold)
    if req.tokens_per_step is not None:
        kwargs["tokens_per_step"] = req.tokens_per_step
    if req.ignore_eos:
        kwargs["ignore_eos"] = True
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise invalid_request(str(exc)) from exc


def _engine_value_error(exc: ValueError) -> APIError:
    msg = str(exc)
    low = msg.lower()
    if "context" in low or "too long" in low or "max_model_len" in low or "kv cache" in low:
        return invalid_request(msg, param="prompt", code="context_length_exceeded")
    return invalid_request(msg)


def _fail_from(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return engine_dead(str(exc))
    if isinstance(exc, RequestAbortedError):
        return APIError(f"The request was aborted: {exc}", status_code=503,
                        type="service_unavailable", code="aborted")
    if isinstance(exc, RequestFailedError):
        return internal_error(f"Engine error: {exc}")
    return internal_error()


class Generation:
    """One HTTP generation request: its choices in the engine, and their assembly."""

    def __init__(self, state: ServerState, request: Request, kind: str, model: str,
                 req: P._SamplingFields, choices: list[_Choice]) -> None:
        self.state = state
        self.request = request
        self.kind = kind  # "completion" | "chat"
        self.model = model
        self.req = req
        self.choices = choices
        self.by_rid = {c.request_id: c for c in choices}
        self.id = P.new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = P.now()
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._closed = False

    # --- admission ----------------------------------------------------------------------
    async def admit(self) -> None:
        eng = self.state.engine
        added: list[_Choice] = []
        try:
            for c in self.choices:
                c.stream = await eng.add_request(c.request_id, c.prompt, c.params,
                                                 arrival=self.arrival, queue=self.queue)
                added.append(c)
        except BaseException as exc:
            for c in added:
                eng.abort(c.request_id)
            if isinstance(exc, ValueError):
                raise _engine_value_error(exc) from exc
            if isinstance(exc, QueueFullError):
                eng.metrics.observe_failure("rejected")
                stats = getattr(eng.engine, "stats", None)
                waiting = getattr(stats, "num_waiting", 0) or 0
                raise queue_full(eng.retry_after(waiting, self.state.config.max_num_seqs),
                                 str(exc)) from exc
            if isinstance(exc, EngineDeadError):
                eng.metrics.observe_failure("rejected")
                raise engine_dead(str(exc)) from exc
            if isinstance(exc, RequestFailedError):
                eng.metrics.observe_failure("error")
                raise internal_error(f"Engine error: {exc}") from exc
            raise

    def abort_unfinished(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self.choices:
            if c.finish_reason is None and c.stream is not None:
                self.state.engine.abort(c.request_id)

    # --- output handling ----------------------------------------------------------------
    def _apply(self, c: _Choice, out: Any, hold_back: bool = False) -> str:
        """Update the choice from a cumulative output; return the new text to send.

        With `hold_back` (streaming with stop strings) a tail of an unfinished output that
        could be the start of a stop string is not sent yet: if the stop string completes in
        the next block, the engine cuts the text before it, and text already sent cannot be
        taken back."""
        text = out.text
        if out.finished:
            reason = out.finish_reason or "stop"
            if reason not in ("stop", "length"):
                raise RequestFailedError(f"request ended with finish_reason={reason}")
        c.text = text
        visible = text
        if hold_back and not out.finished:
            visible = text[:len(text) - _stop_prefix_len(text, c.params.stop)]
        if visible.startswith(c.sent):
            delta = visible[len(c.sent):]
            c.sent = visible
        else:  # text already sent was cut afterwards: it cannot be taken back
            logger.warning("streamed text of %s is no longer a prefix of its output",
                           c.request_id)
            delta = visible[len(c.sent):] if len(visible) > len(c.sent) else ""
            c.sent = visible if len(visible) > len(c.sent) else c.sent
        c.token_ids = list(out.token_ids)
        c.steps = out.steps
        c.num_blocks = getattr(out.outputs[0], "num_blocks", 0)
        c.prompt_tokens = len(out.prompt_token_ids or ())
        if out.finished:
            c.finish_reason = out.finish_reason or "stop"
        return delta

    def usage(self) -> dict:
        return P.usage_dict(
            prompt_tokens=sum(c.prompt_tokens for c in self.choices if c.count_prompt),
            completion_tokens=sum(len(c.token_ids) for c in self.choices),
            steps=sum(c.steps for c in self.choices),
            blocks=sum(c.num_blocks for c in self.choices))

    async def _next(self) -> tuple[_Choice, Any]:
        rid, item = await self.queue.get()
        c = self.by_rid[rid]
        if isinstance(item, BaseException):
            raise item
        return c, item

    # --- non-streaming ------------------------------------------------------------------
    async def run_full(self) -> Response:
        async def collect() -> None:
            left = len(self.choices)
            while left:
                c, out = await self._next()
                self._apply(c, out)
                if out.finished:
                    left -= 1

        work = asyncio.create_task(collect())
        watcher = asyncio.create_task(_wait_disconnect(self.request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                logger.info("client disconnected; aborting %s", self.id)
                self.abort_unfinished()
                return Response(status_code=499)
            exc = work.exception()
            if exc is not None:
                self.abort_unfinished()
                return _fail_from(exc).response()
        finally:
            await _cancel_and_wait(work, watcher)
        self._closed = True
        if self.kind == "completion":
            choices = [P.completion_choice(c.index, c.text, c.finish_reason)
                       for c in self.choices]
            body = P.completion_response(self.id, self.created, self.model, choices,
                                         self.usage())
        else:
            choices = [P.chat_choice(c.index, c.text, c.finish_reason) for c in self.choices]
            body = P.chat_response(self.id, self.created, self.model, choices, self.usage())
        return JSONResponse(body)

    # --- streaming ----------------------------------------------------------------------
    def _chunk(self, c: _Choice, delta: str, finish: str | None) -> str:
        with_usage = self.req.include_usage
        usage = self.usage() if self.req.continuous_usage else None
        if self.kind == "completion":
            body = P.completion_chunk(self.id, self.created, self.model,
                                      [P.completion_choice(c.index, delta, finish)],
                                      usage=usage, with_usage_key=with_usage)
        else:
            body = P.chat_chunk(self.id, self.created, self.model,
                                [P.chat_chunk_choice(c.index, delta, finish, not c.started)],
                                usage=usage, with_usage_key=with_usage)
        c.started = True
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """One SSE chunk per engine output, i.e. per finished block (the last one carries
        `finish_reason`), then the usage chunk if asked, then `data: [DONE]`."""
        left = len(self.choices)
        try:
            while left:
                c, out = await self._next()
                delta = self._apply(c, out, hold_back=bool(c.params.stop))
                if out.finished:
                    left -= 1
                yield self._chunk(c, delta, c.finish_reason)
            if self.req.include_usage:
                mk = P.completion_chunk if self.kind == "completion" else P.chat_chunk
                body = mk(self.id, self.created, self.model, [], usage=self.usage())
                yield f"data: {json.dumps(body)}\n\n"
            self._closed = True
        except Exception as exc:  # noqa: BLE001 - turn into an in-band error event
            self.abort_unfinished()
            yield _fail_from(exc).sse()
        yield "data: [DONE]\n\n"

    def streaming_response(self) -> Response:
        def close() -> None:
            self.abort_unfinished()
            self.state.leave()
        return SSEResponse(self.events(), on_close=close)


# ------------------------------------------------------------------------------------------
# App


MAX_BODY_BYTES = 64 << 20


async def _read_body(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(f"Request body too large (limit {MAX_BODY_BYTES} bytes).",
                       status_code=413, type="invalid_request_error", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(f"Request body too large (limit {MAX_BODY_BYTES} bytes).",
                           status_code=413, type="invalid_request_error",
                           code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_request(f"We could not parse the JSON body of your request: {exc}. "
                              "Send a JSON object.", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    return data


def _validate(model_cls: type, data: dict) -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


def create_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    state_holder: dict[str, ServerState] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        st = ServerState(engine, config)
        state_holder["state"] = st
        app.state.cdlm = st
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="cdlm", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    def state(request: Request) -> ServerState:
        return request.app.state.cdlm

    @app.get("/health")
    async def health(request: Request) -> Response:
        st = state(request)
        if st.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not st.engine.healthy:
            return JSONResponse({"status": "engine_dead", "reason": st.engine.dead_reason},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(state(request).engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        st = state(request)
        return JSONResponse(P.models_response(st.config.served_model_names, st.created,
                                              st.config.model_root, st.config.max_model_len))

    @app.get("/v1/models/{model_id:path}")
    async def model_info(request: Request, model_id: str) -> Response:
        st = state(request)
        st.check_model(model_id)
        data = P.models_response([model_id], st.created, st.config.model_root,
                                 st.config.max_model_len)["data"][0]
        return JSONResponse(data)

    async def run(request: Request, gen_factory: Callable[[ServerState], Any]) -> Response:
        st = state(request)
        st.check_admission()
        gen: Generation = await gen_factory(st)
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

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def build(st: ServerState) -> Generation:
            req: P.CompletionRequest = _validate(P.CompletionRequest, await _read_body(request))
            model = st.check_model(req.model)
            prompts = req.check(st.config.max_model_len, st.config.vocab_size)
            max_tokens = req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
            for p in prompts:
                if isinstance(p, list):
                    _check_context(len(p), max_tokens, st.config.max_model_len)
            return Generation(st, request, "completion", model, req,
                              _fan_out(req, prompts, max_tokens))
        return await run(request, build)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        async def build(st: ServerState) -> Generation:
            req: P.ChatCompletionRequest = _validate(P.ChatCompletionRequest,
                                                     await _read_body(request))
            model = st.check_model(req.model)
            messages = req.check(st.config.max_model_len)
            ids = await asyncio.to_thread(_encode_chat, st.engine.engine.tokenizer, messages)
            max_len = st.config.max_model_len
            if req.max_tokens is not None:
                max_tokens = req.max_tokens
            else:
                max_tokens = st.config.default_chat_max_tokens
                if max_len is not None:
                    max_tokens = max(1, min(max_tokens, max_len - len(ids)))
            _check_context(len(ids), max_tokens, max_len)
            return Generation(st, request, "chat", model, req, _fan_out(req, [ids], max_tokens))
        return await run(request, build)

    return app


def _encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
    try:
        if hasattr(tokenizer, "encode_chat"):
            return tokenizer.encode_chat(messages)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    except ValueError as exc:  # ChatTemplateError is a ValueError: the request's fault
        raise invalid_request(str(exc), param="messages") from exc


def _check_context(prompt_len: int, max_tokens: int, max_model_len: int | None) -> None:
    if max_model_len is not None and prompt_len + max_tokens > max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion (max_tokens)). Reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded")


def _fan_out(req: P._SamplingFields, prompts: list, max_tokens: int) -> list[_Choice]:
    n = req.n or 1
    choices = []
    base = P.new_id("req")
    for pi, prompt in enumerate(prompts):
        for i in range(n):
            seed = None if req.seed is None else req.seed + i
            choices.append(_Choice(index=pi * n + i, request_id=f"{base}-{pi * n + i}",
                                   prompt=prompt, params=_sampling_params(req, max_tokens, seed),
                                   count_prompt=(i == 0)))
    return choices
