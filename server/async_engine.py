"""Runs `LLMEngine.step()` in its own thread and hands outputs to asyncio per request.

The engine is not thread-safe, so exactly one thread (the engine thread) ever touches it:
the asyncio side submits commands (add, abort) to a queue that the engine thread drains
between steps, and gets results back through `loop.call_soon_threadsafe` (one callback per
step for all outputs, so a step with 64 requests costs one wake-up of the event loop).

Failure model:
- `add_request` raising `ValueError` (bad input) or `QueueFullError` fails only the request
  that was being added (the HTTP layer maps them to 400 / 429); any other exception from
  `add_request` fails that request with a server error and the loop keeps serving.
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
from dataclasses import dataclass
from typing import Any

from .metrics import ServerMetrics

logger = logging.getLogger("cdlm.server")

try:  # the engine lands in cdlm/; import lazily-tolerant so the server module imports alone
    from cdlm.scheduler import QueueFullError  # type: ignore
except Exception:  # pragma: no cover - only while cdlm.scheduler does not exist yet
    class QueueFullError(RuntimeError):  # type: ignore[no-redef]
        pass


class EngineDeadError(RuntimeError):
    """The engine loop died; nothing can be served any more."""


class RequestFailedError(RuntimeError):
    """This one request failed inside the engine (others are unaffected)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown, drain timeout)."""


@dataclass
class _Tracked:
    request_id: str
    stream: "RequestStream"
    arrival: float                       # time.monotonic() when the HTTP request arrived
    first_block: float | None = None
    last_block: float | None = None
    tokens_seen: int = 0
    prompt_counted: bool = False
    queue_time_done: bool = False


class RequestStream:
    """What `add_request` returns: await `get()` for the next `RequestOutput`.

    `get()` raises `RequestFailedError`, `RequestAbortedError` or `EngineDeadError` when the
    request ends that way. After an output with `finished=True` nothing more arrives.
    """

    def __init__(self, request_id: str, queue: asyncio.Queue | None = None) -> None:
        self.request_id = request_id
        # Items are (request_id, RequestOutput | exception); several streams may share one
        # queue (the n choices of one HTTP request) and use `queue.get()` directly.
        self.queue: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue()
        self.finished = False

    async def get(self) -> Any:
        _, item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if getattr(item, "finished", False):
            self.finished = True
        return item


class AsyncEngine:
    def __init__(self, engine: Any, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self._cv = threading.Condition()
        self._cmds: collections.deque = collections.deque()
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

    async def add_request(self, request_id: str, prompt: Any, params: Any, *,
                          mode: str | None = None,
                          arrival: float | None = None,
                          queue: asyncio.Queue | None = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it (or raises its error)."""
        if self.dead_reason is not None or not self.healthy:
            raise EngineDeadError(self.dead_reason or "engine loop is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        stream = RequestStream(request_id, queue)
        tracked = _Tracked(request_id, stream,
                           arrival if arrival is not None else time.monotonic())
        self._submit(("add", tracked, prompt, params, mode, fut))
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(request_id)  # the add may have succeeded meanwhile
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (client went away). Safe for unknown or finished ids."""
        self._submit(("abort", request_id, None))

    def abort_all(self, reason: str) -> None:
        self._submit(("abort_all", reason))

    def retry_after(self, waiting: int, max_num_seqs: int) -> int:
        """A rough Retry-After in seconds: time for the queue ahead to drain."""
        e2e = self._e2e_ema or 1.0
        return int(min(60, max(1, round(e2e * (1 + waiting / max(1, max_num_seqs))))))

    def _submit(self, cmd: tuple) -> None:
        with self._cv:
            self._cmds.append(cmd)
            self._cv.notify()

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    @staticmethod
    def _deliver(items: list[tuple[RequestStream, Any]]) -> None:
        for stream, item in items:
            stream.queue.put_nowait((stream.request_id, item))

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
                out_items: list[tuple[RequestStream, Any]] = []
                if cmds:
                    self._handle_commands(cmds, out_items)
                    self._refresh_gauges()
                if eng.has_unfinished_requests():
                    t0 = time.perf_counter()
                    outputs = eng.step()
                    self.last_step_time = time.perf_counter() - t0
                    self.num_steps += 1
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
        for cmd in self._drain_cmds():
            if cmd[0] == "add":
                self._post(self._resolve, cmd[5], EngineDeadError("server is shutting down"))
        items = []
        for rid, t in list(self._tracked.items()):
            self._safe_abort(rid)
            items.append((t.stream, RequestAbortedError("server is shutting down")))
            self.metrics.observe_finished("abort")
        self._tracked.clear()
        if items:
            self._post(self._deliver, items)

    def _drain_cmds(self) -> list[tuple]:
        with self._cv:
            cmds = list(self._cmds)
            self._cmds.clear()
        return cmds

    def _fail_all(self, exc: BaseException) -> None:
        items = [(t.stream, exc) for t in self._tracked.values()]
        for _ in self._tracked:
            self.metrics.observe_failure("error")
        self._tracked.clear()
        for cmd in self._drain_cmds():
            if cmd[0] == "add":
                self._post(self._resolve, cmd[5], exc)
        if items:
            self._post(self._deliver, items)

    def _safe_abort(self, rid: str) -> None:
        try:
            self.engine.abort_request(rid)
        except Exception:  # noqa: BLE001 - unknown/finished ids are fine
            logger.debug("abort_request(%s) failed", rid, exc_info=True)

    def _handle_commands(self, cmds: list[tuple], out: list) -> None:
        for cmd in cmds:
            kind = cmd[0]
            if kind == "add":
                _, tracked, prompt, params, mode, fut = cmd
                try:
                    kwargs: dict[str, Any] = {"arrival_time": tracked.arrival}
                    if mode is not None:
                        kwargs["mode"] = mode
                    self.engine.add_request(tracked.request_id, prompt, params, **kwargs)
                except (ValueError, QueueFullError) as exc:
                    self._post(self._resolve, fut, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - fail this request only
                    logger.exception("add_request(%s) failed", tracked.request_id)
                    self._post(self._resolve, fut,
                               RequestFailedError(f"{type(exc).__name__}: {exc}"))
                    continue
                self._tracked[tracked.request_id] = tracked
                self._post(self._resolve, fut, None)
            elif kind == "abort":
                rid = cmd[1]
                t = self._tracked.pop(rid, None)
                if t is None:
                    continue
                self._safe_abort(rid)
                self.metrics.observe_finished("abort")
                out.append((t.stream, RequestAbortedError("request aborted")))
            elif kind == "abort_all":
                for rid, t in list(self._tracked.items()):
                    self._safe_abort(rid)
                    self.metrics.observe_finished("abort")
                    out.append((t.stream, RequestAbortedError(cmd[1])))
                self._tracked.clear()

    def _refresh_gauges(self) -> None:
        try:
            st = self.engine.stats
        except Exception:  # noqa: BLE001
            return
        self.metrics.set_gauges(_first_attr(st, "num_running", "num_requests_running"),
                                _first_attr(st, "num_waiting", "num_requests_waiting"),
                                _first_attr(st, "kv_cache_usage", "kv_cache_usage_perc"))

    def _after_step(self, outputs: list[Any], out: list) -> None:
        m = self.metrics
        try:
            st = self.engine.stats
            m.set_gauges(_first_attr(st, "num_running", "num_requests_running"),
                         _first_attr(st, "num_waiting", "num_requests_waiting"),
                         _first_attr(st, "kv_cache_usage", "kv_cache_usage_perc"))
            last = getattr(st, "last_step", None)
            if last is not None:
                m.observe_step(int(last.batch_size or 0),
                               [n for n in last.tokens_finalized if n > 0],
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
                if not getattr(o, "finished", False):
                    self._safe_abort(o.request_id)
                m.observe_failure("error")
                out.append((t.stream, RequestFailedError(f"{type(exc).__name__}: {exc}")))

    def _on_output(self, t: _Tracked, o: Any, now: float, out: list) -> None:
        m = self.metrics
        err = getattr(o, "error", None)
        if err:
            self._tracked.pop(t.request_id, None)
            if not o.finished:
                self._safe_abort(t.request_id)
            m.observe_failure("error")
            out.append((t.stream, RequestFailedError(str(err))))
            return
        if not t.prompt_counted:
            m.prompt_tokens.inc(len(o.prompt_token_ids or ()))
            t.prompt_counted = True
        rm = getattr(o, "metrics", None)
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
        out.append((t.stream, o))
        if o.finished:
            self._tracked.pop(t.request_id, None)
            e2e = now - t.arrival
            self._e2e_ema = e2e if self._e2e_ema is None else 0.9 * self._e2e_ema + 0.1 * e2e
            m.observe_finished(o.finish_reason or "stop", e2e=e2e, steps=o.steps)


def _first_attr(obj: Any, *names: str) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return None
