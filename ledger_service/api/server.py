"""The HTTP protocol `ledger-service serve` runs: uvicorn's httptools protocol with a deadline for reading requests.

uvicorn arms no timer on a connection until it has answered a first request (then the keep-alive timeout), and none
at all while a request is being read: a client that connects and sends nothing, or trickles its headers or body,
keeps its connection, and its slot under LEDGER_MAX_CONNECTIONS, for as long as it likes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class ReadTimeoutProtocol(HttpToolsProtocol):
    """Closes a connection that has not sent a whole request (headers and body) within `read_timeout` seconds of
    connecting, or of the first byte of a later request on it. Idle time between requests is the keep-alive
    timeout's, and time the app takes to read a body it was sent is not counted against the client."""

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.flow is not None and self.flow.read_paused:
            self._arm()  # uvicorn stopped reading: the app has not taken the body yet, which is not the client's doing
            return
        if not self.transport.is_closing():
            self.transport.close()  # a request in progress sees a disconnect (logged as 499, api/problems.py)
