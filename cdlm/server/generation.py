"""One HTTP generation request: its choices in the engine, and their assembly into a response.

`build_choices` fans a validated request out into engine requests (prompts x n, choice
`index = prompt_index * n + i`, seed `seed + i`); `Generation` admits them as one group,
collects their outputs from one queue, and answers JSON or Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cdlm.engine import NewRequest
from cdlm.errors import ContextLengthError, InvalidRequestError, QueueFullError
from cdlm.outputs import RequestOutput
from cdlm.sampling_params import SamplingParams

from . import protocol as P
from . import responses as R
from .async_engine import EngineDeadError, RequestAbortedError, RequestFailedError
from .errors import (APIError, engine_dead, internal_error, invalid_request, queue_full,
                     safe_json)
from .prompts import context_error
from .state import ServerState
from .streaming import SSEResponse, cancel_and_wait, wait_disconnect

logger = logging.getLogger("cdlm.server")

Kind = Literal["completion", "chat"]


@dataclass
class Choice:
    index: int
    request: NewRequest
    count_prompt: bool            # count its prompt tokens in usage (once per prompt, not per n)
    text: str = ""                # the output so far (final text once finished)
    sent: str = ""                # what was streamed so far
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    steps: int = 0
    num_blocks: int = 0
    started: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)


def sampling_params(req: P.SamplingFields, max_tokens: int, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, stop=req.stop_list(),
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else float(req.min_p),
            seed=seed, threshold=req.threshold, tokens_per_step=req.tokens_per_step,
            ignore_eos=bool(req.ignore_eos))
    except ValueError as exc:
        raise invalid_request(str(exc)) from exc


def build_choices(req: P.SamplingFields, prompts: list[list[int]], max_tokens: int,
                  arrival: float) -> list[Choice]:
    n = req.n or 1
    base = P.new_id("req")
    choices = []
    for pi, prompt in enumerate(prompts):
        for i in range(n):
            index = pi * n + i
            seed = None if req.seed is None else req.seed + i
            request = NewRequest(f"{base}-{index}", prompt, sampling_params(req, max_tokens, seed),
                                 arrival_time=arrival)
            choices.append(Choice(index=index, request=request, count_prompt=(i == 0)))
    return choices


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def admission_error(exc: BaseException, state: ServerState) -> APIError:
    """The HTTP error for a group the engine would not take, chosen by the error's type."""
    metrics = state.engine.metrics
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return context_error(exc)
    if isinstance(exc, InvalidRequestError):
        return invalid_request(str(exc), param=exc.param)
    if isinstance(exc, QueueFullError):
        metrics.observe_failure("rejected")
        return queue_full(state.engine.retry_after(), str(exc))
    if isinstance(exc, EngineDeadError):
        metrics.observe_failure("rejected")
        return engine_dead(str(exc))
    if isinstance(exc, RequestFailedError):
        metrics.observe_failure("error")
        return internal_error(f"Engine error: {exc}")
    return internal_error()


def failure_error(exc: BaseException) -> APIError:
    """The HTTP error for a request that ended badly after it was admitted."""
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

    def __init__(self, state: ServerState, request: Request, kind: Kind, model: str,
                 req: P.SamplingFields, choices: list[Choice]) -> None:
        self.state = state
        self.request = request
        self.kind = kind
        self.model = model
        self.req = req
        self.choices = choices
        self.by_rid = {c.request_id: c for c in choices}
        self.id = P.new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = P.now()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._admitted = False
        self._closed = False

    # --- admission ----------------------------------------------------------------------
    async def admit(self) -> None:
        """Hand every choice to the engine as one group (admitted together or not at all)."""
        try:
            await self.state.engine.add_group([c.request for c in self.choices], self.queue)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to the matching HTTP error
            raise admission_error(exc, self.state) from exc
        self._admitted = True

    def abort_unfinished(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._admitted:
            return
        for c in self.choices:
            if c.finish_reason is None:
                self.state.engine.abort(c.request_id)

    # --- output handling ----------------------------------------------------------------
    def _apply(self, c: Choice, out: RequestOutput, hold_back: bool = False) -> str:
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
            visible = text[:len(text) - stop_prefix_len(text, c.params.stop)]
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
        c.num_blocks = out.outputs[0].num_blocks
        if out.finished:
            c.finish_reason = out.finish_reason or "stop"
        return delta

    def usage(self) -> dict:
        return R.usage_dict(
            prompt_tokens=sum(c.prompt_tokens for c in self.choices if c.count_prompt),
            completion_tokens=sum(len(c.token_ids) for c in self.choices),
            steps=sum(c.steps for c in self.choices),
            blocks=sum(c.num_blocks for c in self.choices))

    async def _next(self) -> tuple[Choice, RequestOutput]:
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
        watcher = asyncio.create_task(wait_disconnect(self.request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                logger.info("client disconnected; aborting %s", self.id)
                self.abort_unfinished()
                return Response(status_code=499)
            exc = work.exception()
            if exc is not None:
                self.abort_unfinished()
                return failure_error(exc).response()
        finally:
            await cancel_and_wait(work, watcher)
        self._closed = True
        if self.kind == "completion":
            choices = [R.completion_choice(c.index, c.text, c.finish_reason)
                       for c in self.choices]
            body = R.completion_response(self.id, self.created, self.model, choices,
                                         self.usage())
        else:
            choices = [R.chat_choice(c.index, c.text, c.finish_reason) for c in self.choices]
            body = R.chat_response(self.id, self.created, self.model, choices, self.usage())
        return JSONResponse(body)

    # --- streaming ----------------------------------------------------------------------
    def _chunk(self, c: Choice, delta: str, finish: str | None) -> str:
        with_usage = self.req.include_usage
        usage = self.usage() if self.req.continuous_usage else None
        if self.kind == "completion":
            body = R.completion_chunk(self.id, self.created, self.model,
                                      [R.completion_choice(c.index, delta, finish)],
                                      usage=usage, with_usage_key=with_usage)
        else:
            body = R.chat_chunk(self.id, self.created, self.model,
                                [R.chat_chunk_choice(c.index, delta, finish, not c.started)],
                                usage=usage, with_usage_key=with_usage)
        c.started = True
        return f"data: {safe_json(body)}\n\n"

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
                mk = R.completion_chunk if self.kind == "completion" else R.chat_chunk
                body = mk(self.id, self.created, self.model, [], usage=self.usage())
                yield f"data: {safe_json(body)}\n\n"
            self._closed = True
        except Exception as exc:  # noqa: BLE001 - turn into an in-band error event
            self.abort_unfinished()
            yield failure_error(exc).sse()
        yield "data: [DONE]\n\n"

    def streaming_response(self) -> Response:
        def close() -> None:
            self.abort_unfinished()
            self.state.leave()
        return SSEResponse(self.events(), on_close=close)

