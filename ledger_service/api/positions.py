"""The `Ledger-Position` header of successful writes: a WAL position past their commit (services/replicas.py).

An audit read given it as `min_position` shows the write, whichever server serves the read.
"""

from __future__ import annotations

from litestar.types import Message, Scope

POSITION_HEADER = "Ledger-Position"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def add_position(message: Message, scope: Scope) -> None:
    """Before a write's answer starts: a 2xx (the write committed, or was committed before and is replayed) gets
    the primary's position. Any other answer wrote nothing, and gets none."""
    if message["type"] != "http.response.start" or scope.get("method") not in WRITES:
        return
    if not 200 <= message["status"] < 300:
        return
    if not scope["path"].startswith("/v1/"):
        return
    positions = getattr(scope["litestar_app"].state, "positions", None)
    position = None if positions is None else await positions.after_commit()
    if position is not None:
        message["headers"] = [*message.get("headers", ()), (POSITION_HEADER.lower().encode(), position.encode())]
