"""uvicorn's HTTP/1.1 protocol with every idle connection bounded in time.

uvicorn arms its keep-alive timer only after a response, and any byte received cancels it for
good: a connection that never sends a request, or sends its headers one byte at a time, stays
open forever (and holds a file descriptor and a slot). Here a connection must have a request
in progress within `timeout_keep_alive` seconds of connecting or of its last response, or it
is closed. A request in progress (headers complete) is not timed: generation takes as long as
it takes, and client disconnects are detected separately.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class BoundedH11Protocol(H11Protocol):
    _idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.transport.is_closing():
            return
        if self.conn.our_state not in (h11.ERROR, h11.CLOSED):
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
        self.transport.close()
