from __future__ import annotations

from litestar import Controller, get
from litestar.datastructures import State
from litestar.response import Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.schemas import HealthView

HEALTH_TIMEOUT_SECONDS = 2.0


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]

    @get("/", summary="Liveness and database reachability")
    async def health(self, state: State) -> Response[HealthView]:
        engine: AsyncEngine = state.engine
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"), execution_options={"timeout": HEALTH_TIMEOUT_SECONDS})
        except Exception:
            return Response(
                HealthView(status="degraded", database="unreachable"),
                status_code=503,
                headers={"Retry-After": "2"},
            )
        return Response(HealthView(status="ok", database="ok"), status_code=200)
