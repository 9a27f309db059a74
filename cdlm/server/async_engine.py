"""Runs `LLMEngine.step()` in its own thread and hands outputs to asyncio per request.

The engine is not thread-safe, so exactly one thread (the engine thread) ever touches it:
the asyncio side submits commands (`AddGroup`, `Abort`, `AbortAll`) to a queue that the engine
thread drains between steps, and gets results back through `loop.call_soon_threadsafe` (one
callback per step for all outputs, so a step with 64 requests costs one wake-up of the event
loop).

Admission is decided where a request arrives, not after the current step: `add_group` counts
the requests already waiting in the engine plus those queued here and not yet handed over, and
raises `QueueFullError` at once when the group does not fit `max_queue` (a 429 takes
milliseconds even while a long step runs). A group (the n choices and prompts of one HTTP
request) is handed to the engine in one command and queued all-or-nothing.

Failure model:
- `LLMEngine.add_requests` raising `InvalidRequestError` / `ContextLengthError` (bad input) or
  `QueueFullError` fails only the group that was being added (the HTTP layer maps them to
  400 / 429); any other exception fails that group with a server error and the loop keeps
  serving.
- an output with `error` set fails only that request.
- an exception escaping `engine.step()` means the engine state can no longer be trusted: the
  loop stops, every in-flight request gets `EngineDeadError`, `healthy` turns False
  (`/health` answers 503, `cdlm:engine_healthy` 0) and new requests are refused.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cdlm.engine import LLMEngine, NewRequest
from cdlm.errors import InvalidRequestError, QueueFullError
from cdlm.outputs import RequestOutput

from .metrics import ServerMetrics

logger = logging.getLogger("cdlm.server")

# What arrives on a group's output queue: (request_id, RequestOutput or the exception that
# ended the request).
OutputQueue = asyncio.Queue


class EngineDeadError(RuntimeError):
    """The engine loop died; nothing can be served any more."""


class RequestFailedError(RuntimeError):
    """This one request failed inside the engine (others are unaffected)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown, drain timeout)."""


# --- commands from the event loop to the engine thread -------------------------------------

@dataclass
class AddGroup:
    requests: list[NewRequest]
    queue: OutputQueue            # outputs of every request of the group go here
    accepted: asyncio.Future      # resolved once the engine queued the group (or refused it)


@dataclass
class Abort:
    request_id: str


@dataclass
class AbortAll:
    reason: str


Command = AddGroup | Abort | AbortAll


@dataclass
class _Tracked:
    """Per-request bookkeeping on the engine thread (metrics and delivery)."""

    request_id: str
    queue: OutputQueue
    arrival: float                       # time.monotonic() when the HTTP request arrived
    first_block: float | None = None
    last_block: float | None = None
    tokens_seen: int = 0
    prompt_counted: bool = False
    queue_time_done: bool = False


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.max_queue = engine.config.max_queue
        self._cv = threading.Condition()
        self._cmds: collections.deque[Command] = collections.deque()
        # Admission counts (under `_cv`): requests submitted but not yet handed to the engine,
        # and the engine's waiting queue as the engine thread last saw it.
        self._pending_adds = 0
        self._engine_waiting = 0
        self._tracked: dict[str, _Tracked] = {}   # engine thread only
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead_reason: str | None = None
        self.num_steps = 0
        self.last_step_time = 0.0
        self._e2e_ema: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return (self.dead_reason is None and self._thread is not None
                and self._thread.is_alive())

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cdlm-engine", daemon=True)
        self._thread.start()
        self.metrics.engine_healthy.set(1)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ asyncio side

    @property
    def num_queued(self) -> int:
        """Requests admitted and not running yet (engine queue + not yet handed over)."""
        with self._cv:
            return self._pending_adds + self._engine_waiting

    async def add_group(self, requests: list[NewRequest], queue: OutputQueue) -> None:
        """Admit a group of requests now or raise: `QueueFullError` when the queue cannot hold
        all of them, `InvalidRequestError` when it never could (more than `max_queue`),
        `EngineDeadError`. Returns once the engine queued them (or raises its error)."""
        if self.dead_reason is not None or not self.healthy:
            raise EngineDeadError(self.dead_reason or "engine loop is not running")
        n = len(requests)
        if n > self.max_queue:
            raise InvalidRequestError(
                f"this request asks for {n} generations (prompts x n), more than the server's "
                f"queue holds ({self.max_queue}); split it", param="n")
        accepted = asyncio.get_running_loop().create_future()
        with self._cv:
            queued = self._pending_adds + self._engine_waiting
            if queued + n > self.max_queue:
                raise QueueFullError(
                    f"{queued} requests are waiting, the queue holds {self.max_queue}",
                    waiting=queued, limit=self.max_queue)
            self._pending_adds += n
            self._cmds.append(AddGroup(requests, queue, accepted))
            self._cv.notify()
        try:
            await accepted
        except asyncio.CancelledError:
            for r in requests:   # the add may have succeeded meanwhile
                self.abort(r.request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Abort a request (client went away). Safe for unknown or finished ids."""
        self._submit(Abort(request_id))

    def abort_all(self, reason: str) -> None:
        self._submit(AbortAll(reason))

    def retry_after(self) -> float:
        """A rough Retry-After in seconds: the time for the queue ahead to drain."""
        e2e = self._e2e_ema or 1.0
        ahead = self.num_queued / max(1, self.engine.config.max_num_seqs)
        return min(60.0, max(0.05, e2e * (1 + ahead)))

    def _submit(self, cmd: Command) -> None:
        with self._cv:
            self._cmds.append(cmd)
            self._cv.notify()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    @staticmethod
    def _deliver(items: list[tuple[_Tracked, Any]]) -> None:
        for tracked, item in items:
            tracked.queue.put_nowait((tracked.request_id, item))

    @staticmethod
    def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._cv:
                    while not self._cmds and not self._stop and not eng.has_unfinished_requests():
                        self._cv.wait(timeout=1.0)
                    if self._stop:
                        break
                    cmds = list(self._cmds)
                    self._cmds.clear()
                out_items: list[tuple[_Tracked, Any]] = []
                if cmds:
                    self._handle_commands(cmds, out_items)
                    self._publish_waiting()   # aborts shrink the queue too
                    self._refresh_gauges()
                if eng.has_unfinished_requests():
                    t0 = time.perf_counter()
                    outputs = eng.step()
                    self.last_step_time = time.perf_counter() - t0
                    self.num_steps += 1
                    self._publish_waiting()
                    self._after_step(outputs, out_items)
                if out_items:
                    self._post(self._deliver, out_items)
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            logger.exception("engine loop died")
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            self.metrics.engine_healthy.set(0)
            self._fail_all(EngineDeadError(self.dead_reason))
            return
        # Orderly stop: whatever is still in flight is aborted.
        self.metrics.engine_healthy.set(0)
        self._refuse_pending(EngineDeadError("server is shutting down"))
        items = []
        for rid, t in list(self._tracked.items()):
            self._safe_abort(rid)
            items.append((t, RequestAbortedError("server is shutting down")))
            self.metrics.observe_finished("abort")
        self._tracked.clear()
        if items:
            self._post(self._deliver, items)

    def _publish_waiting(self, handed_over: int = 0) -> None:
        with self._cv:
            self._pending_adds -= handed_over
            self._engine_waiting = self.engine.stats.num_waiting

    def _refuse_pending(self, exc: BaseException) -> None:
        with self._cv:
            cmds = list(self._cmds)
            self._cmds.clear()
        for cmd in cmds:
            if isinstance(cmd, AddGroup):
                self._publish_waiting(len(cmd.requests))
                self._post(self._resolve, cmd.accepted, exc)

    def _fail_all(self, exc: BaseException) -> None:
        items = [(t, exc) for t in self._tracked.values()]
        for _ in self._tracked:
            self.metrics.observe_failure("error")
        self._tracked.clear()
        self._refuse_pending(exc)
        if items:
            self._post(self._deliver, items)

    def _safe_abort(self, rid: str) -> None:
        try:
            self.engine.abort_request(rid)
        except Exception:  # noqa: BLE001 - unknown/finished ids are fine
            logger.debug("abort_request(%s) failed", rid, exc_info=True)

    def _handle_commands(self, cmds: list[Command], out: list) -> None:
        for cmd in cmds:
            if isinstance(cmd, AddGroup):
                self._add_group(cmd)
            elif isinstance(cmd, Abort):
                t = self._tracked.pop(cmd.request_id, None)
                if t is None:
                    continue
                self._safe_abort(cmd.request_id)
                self.metrics.observe_finished("abort")
                out.append((t, RequestAbortedError("request aborted")))
            elif isinstance(cmd, AbortAll):
                for rid, t in list(self._tracked.items()):
                    self._safe_abort(rid)
                    self.metrics.observe_finished("abort")
                    out.append((t, RequestAbortedError(cmd.reason)))
                self._tracked.clear()

    def _add_group(self, cmd: AddGroup) -> None:
        error: BaseException | None = None
        try:
            self.engine.add_requests(cmd.requests)
        except (ValueError, QueueFullError) as exc:   # the request's fault, or no room
            error = exc
        except Exception as exc:  # noqa: BLE001 - fail this group only
            logger.exception("add_requests(%s) failed", cmd.requests[0].request_id)
            error = RequestFailedError(f"{type(exc).__name__}: {exc}")
        self._publish_waiting(len(cmd.requests))
        if error is None:
            for r in cmd.requests:
                arrival = r.arrival_time if r.arrival_time is not None else time.monotonic()
                self._tracked[r.request_id] = _Tracked(r.request_id, cmd.queue, arrival)
        self._post(self._resolve, cmd.accepted, error)

    def _refresh_gauges(self) -> None:
        st = self.engine.stats
        self.metrics.set_gauges(st.num_running, st.num_waiting, st.kv_cache_usage)

    def _after_step(self, outputs: list[RequestOutput], out: list) -> None:
        m = self.metrics
        try:
            self._refresh_gauges()
            last = self.engine.stats.last_step
            m.observe_step(last.batch_size, [n for n in last.tokens_finalized if n > 0],
                           list(last.block_steps))
        except Exception:  # noqa: BLE001 - metrics must never kill the loop
            logger.debug("stats update failed", exc_info=True)
        now = time.monotonic()
        for o in outputs:
            t = self._tracked.get(o.request_id)
            if t is None:
                continue
            try:
                self._on_output(t, o, now, out)
            except Exception as exc:  # noqa: BLE001 - fail only this request
                logger.exception("output handling failed for %s", o.request_id)
                self._tracked.pop(o.request_id, None)
                if not o.finished:
                    self._safe_abort(o.request_id)
                m.observe_failure("error")
                out.append((t, RequestFailedError(f"{type(exc).__name__}: {exc}")))

    def _on_output(self, t: _Tracked, o: RequestOutput, now: float, out: list) -> None:
        m = self.metrics
        if o.error:
            self._tracked.pop(t.request_id, None)
            if not o.finished:
                self._safe_abort(t.request_id)
            m.observe_failure("error")
            out.append((t, RequestFailedError(o.error)))
            return
        if not t.prompt_counted:
            m.prompt_tokens.inc(len(o.prompt_token_ids))
            t.prompt_counted = True
        rm = o.metrics
        if not t.queue_time_done and rm is not None and rm.first_scheduled_time is not None:
            m.queue_time.observe(max(0.0, rm.first_scheduled_time - rm.arrival_time))
            t.queue_time_done = True
        ntok = len(o.token_ids)
        if ntok > t.tokens_seen:
            m.generation_tokens.inc(ntok - t.tokens_seen)
            t.tokens_seen = ntok
        if t.first_block is None:
            t.first_block = now
            m.time_to_first_token.observe(now - t.arrival)
        else:
            m.inter_block_latency.observe(now - t.last_block)
        t.last_block = now
        out.append((t, o))
        if o.finished:
            self._tracked.pop(t.request_id, None)
            e2e = now - t.arrival
            self._e2e_ema = e2e if self._e2e_ema is None else 0.9 * self._e2e_ema + 0.1 * e2e
            m.observe_finished(o.finish_reason or "stop", e2e=e2e, steps=o.steps)
