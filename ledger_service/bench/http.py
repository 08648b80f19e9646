"""The load generator's HTTP/1.1 client: keep-alive, Content-Length bodies, nothing else. The load generator shares
two cores with the service and PostgreSQL; a general-purpose client would spend more CPU than the service it
measures."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class HttpConnection:
    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n".encode() + self.auth
        if payload:
            head += b"Content-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n".encode()
        self.writer.write(head + payload)
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
