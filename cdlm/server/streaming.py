"""Server-Sent Events with active disconnect detection, and the helpers both response kinds use
to notice a client that went away while it waited for the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("cdlm.server")


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
                data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                await send({"type": "http.response.body", "body": data, "more_body": True})
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
            await cancel_and_wait(stream_task, listen_task)
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


async def cancel_and_wait(*tasks: asyncio.Task) -> None:
    """Cancel the tasks and wait until each has ended, whatever it raised."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


async def wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
