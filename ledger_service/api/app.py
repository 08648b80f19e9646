"""The application factory: wires settings, the engine, services, routes and error handling together."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.plugins.prometheus import PrometheusController
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.api.bodies import CommandSchemas, StrictBodies
from ledger_service.api.console.routes import TEMPLATES, console_router, console_static_router
from ledger_service.api.controllers.accounts import AccountController
from ledger_service.api.controllers.api_keys import ApiKeyController
from ledger_service.api.controllers.batch import BatchController
from ledger_service.api.controllers.entries import EntryController
from ledger_service.api.controllers.external import ExternalController, upload_router
from ledger_service.api.controllers.external_reconciliation import ExternalReconciliationController, MarginController
from ledger_service.api.controllers.funding import FundingController
from ledger_service.api.controllers.health import HealthController
from ledger_service.api.controllers.pricing import PricingController
from ledger_service.api.controllers.reports import AccountsController, ReportsController
from ledger_service.api.controllers.requests import ConsumptionController, HoldController
from ledger_service.api.middleware import access_log_middleware, admit_request, unrouted_middleware
from ledger_service.api.positions import add_position
from ledger_service.api.problems import handle_exception
from ledger_service.api.ratelimit import RateLimiter
from ledger_service.db.engine import create_engine
from ledger_service.db.lifecycle import SeenBalances, create_pool
from ledger_service.observability import configure_logging
from ledger_service.services.api_keys import ApiKeyService
from ledger_service.services.audit import HEAVY_REPORT_STATEMENT_SECONDS, AuditService, HeavyReads
from ledger_service.services.batch import BatchService
from ledger_service.services.console import ConsoleService
from ledger_service.services.external import ExternalService
from ledger_service.services.external_reconciliation import ExternalReconciliationService
from ledger_service.services.housekeeping import Housekeeping
from ledger_service.services.ledger import LedgerService
from ledger_service.services.lifecycle import LifecycleService
from ledger_service.services.margin import MarginService
from ledger_service.services.pricing import PricingService
from ledger_service.services.replicas import Positions, check_replication
from ledger_service.settings import Settings, SettingsError


def _provide(name: str) -> Provide:
    """A dependency that hands a handler the service the lifespan keeps on the app's state under `name`."""

    def provide(state: State) -> Any:
        return state[name]

    return Provide(provide, sync_to_thread=False)


DEPENDENCIES = {
    "ledger": _provide("ledger"),
    "prices": _provide("pricing"),
    "keys": _provide("api_keys"),
    "audit": _provide("audit"),
    "batches": _provide("batches"),
    "reconciliations": _provide("external_reconciliations"),
    "margins": _provide("margins"),
    "external": _provide("external"),
}
"""Handler parameter -> the service it receives."""


class MetricsController(PrometheusController):
    """GET /metrics in the Prometheus text format, without authentication (scrapers rarely carry keys): expose
    it only where the scraper can reach it (docs/operations.md)."""

    path = "/metrics"
    include_in_schema = False


def serve_app() -> Litestar:
    """The factory `ledger-service serve` runs in each worker: settings from the environment, JSON logs."""
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    return create_app(settings)


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the Litestar app. The database must already exist and be migrated (`ledger-service serve` does both)."""
    settings = settings or Settings.from_env()
    v1 = Router(
        path="/v1",
        security=[{"BearerAuth": []}],
        before_request=admit_request,
        route_handlers=[
            HoldController,
            ConsumptionController,
            BatchController,
            FundingController,
            AccountController,
            EntryController,
            PricingController,
            ApiKeyController,
            AccountsController,
            ReportsController,
            ExternalReconciliationController,
            MarginController,
            ExternalController,
            upload_router(settings.max_upload_bytes),  # its own body limit: LEDGER_MAX_UPLOAD_BYTES
        ],
    )
    app = Litestar(
        route_handlers=[
            HealthController,
            MetricsController,
            v1,
            console_router(),
            console_static_router(),
            swagger_static_router(),
        ],
        template_config=TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine),
        middleware=[access_log_middleware],
        plugins=[
            StrictBodies(),
            CommandSchemas(),
        ],  # request bodies: decoded strictly, documented as strictly (bodies.py)
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
        lifespan=[_lifespan(settings)],
        # Only reads a replica serves need a write's position: without one, no hook on every response either.
        before_send=[add_position] if settings.read_database_url is not None else [],
        dependencies=DEPENDENCIES,
        exception_handlers={Exception: handle_exception},
        openapi_config=OPENAPI,
    )
    _require_admission(app)
    app.asgi_handler = unrouted_middleware(app.asgi_handler)  # 404 and 405 for no route: logged and counted too
    return app


SWAGGER_STATIC = "/static/swagger-ui"
"""Where Swagger UI's scripts and styles are served from: the swagger-ui-py package's copy, so that /schema works
on a network without internet access (Litestar's default loads them from a CDN)."""


def _swagger_ui_static() -> Path:
    spec = importlib.util.find_spec("swagger_ui")
    assert spec is not None, "swagger-ui-py is a dependency"
    assert spec.origin is not None
    return Path(spec.origin).parent / "static"


def swagger_static_router() -> Router:
    return create_static_files_router(
        path=SWAGGER_STATIC,
        directories=[_swagger_ui_static()],
        name="swagger-static",
        include_in_schema=False,
    )


OPENAPI = OpenAPIConfig(
    title="Ledger service",
    version="1.0.0",
    description="A double-entry ledger for LLM API relays. See docs/api.md.",
    path="/schema",
    render_plugins=[
        SwaggerRenderPlugin(
            js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
            css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
            standalone_preset_js_url=f"{SWAGGER_STATIC}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{SWAGGER_STATIC}/favicon-32x32.png'>",
        )
    ],
    components=Components(
        security_schemes={
            "BearerAuth": SecurityScheme(
                type="http", scheme="bearer", description="An API key: `Authorization: Bearer <key>`"
            )
        }
    ),
)


def _lifespan(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """Open the database pools and build the services when the app starts; stop and close them when it stops."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.database_url is None:
            raise SettingsError(
                "LEDGER_DATABASE_URL is not set (`ledger-service serve` sets it for the embedded server)"
            )
        cache = settings.statement_cache
        engine = create_engine(settings.database_url, pool_size=settings.pool_size, statement_cache=cache)
        engines = [engine]
        seen = SeenBalances()
        try:
            await check_replication(engine, settings)
            lifecycle_pool = await create_pool(
                settings.database_url,
                size=settings.pool_size,
                on_connect=seen.forget,
                statement_cache=cache,
                startup_isolation=settings.pgbouncer == "off",
            )
        except BaseException:
            await engine.dispose()
            raise
        lifecycle = LifecycleService(lifecycle_pool, settings, seen)

        # The whole-journal reports get connections of their own: they never take the shared pool's (services/audit.py).
        def reports_engine_of(url: str, *, reads_only: bool = False) -> AsyncEngine:
            return create_engine(
                url,
                pool_size=settings.heavy_reports,
                application_name="ledger-service-reports",
                command_timeout=HEAVY_REPORT_STATEMENT_SECONDS,
                statement_cache=cache,
                reads_only=reads_only,
            )

        reports_engine = reports_engine_of(settings.database_url)
        engines.append(reports_engine)
        replica = replica_reports = None
        if settings.read_database_url is not None:  # the audit reads' own server (services/replicas.py)
            replica = create_engine(
                settings.read_database_url,
                pool_size=settings.pool_size,
                application_name="ledger-service-audit",
                statement_cache=cache,
                reads_only=True,
            )
            replica_reports = reports_engine_of(settings.read_database_url, reads_only=True)
            engines += [replica, replica_reports]
        heavy = HeavyReads(reports_engine, settings.heavy_reports, replica=replica_reports)
        audit = AuditService(
            engine,
            sweep_interval_seconds=settings.sweep_interval_seconds,
            snapshot_interval_seconds=settings.snapshot_interval_seconds,
            heavy=heavy,
            replica=replica,
        )
        # Positions matter only to reads a replica serves; without one, writes skip the extra round trip.
        positions = Positions(lifecycle_pool) if replica is not None else None
        state = app.state
        state.engine = engine
        state.positions = positions
        state.ledger = LedgerService(engine, settings, lifecycle)
        state.batches = BatchService(lifecycle)
        state.pricing = PricingService(engine)
        state.api_keys = ApiKeyService(engine)
        state.audit = audit
        state.external_reconciliations = ExternalReconciliationService(engine, settings)
        state.margins = MarginService(engine, settings)
        state.external = ExternalService(engine)
        state.console = ConsoleService(engine, state.api_keys, audit, session_seconds=settings.console_session_seconds)
        state.rate_limiter = (
            RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
            if settings.rate_limit_per_second > 0
            else None
        )
        if settings.admin_key:
            await state.api_keys.ensure(settings.admin_key)
        housekeeping = Housekeeping(engine, lifecycle, audit, settings)
        warming: asyncio.Task[None] | None = None
        if settings.background_tasks:
            housekeeping.start()
            warming = asyncio.create_task(_warm_console(state.console))  # the console overview's chart
        try:
            yield
        finally:
            if warming is not None:
                warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming
            await housekeeping.stop()
            if positions is not None:
                await positions.close()
            await lifecycle_pool.close()
            for each in engines:
                await each.dispose()

    return lifespan


async def _warm_console(console: ConsoleService) -> None:
    try:
        await console.warm()
    except Exception:  # the overview reads it again when it is shown: a failure here only costs that page the time
        logging.getLogger(__name__).warning("reading the console's usage chart at start failed", exc_info=True)


def _require_admission(app: Litestar) -> None:
    """Refuse to build an app in which a `/v1` route skips the key check. The check is the `/v1` router's
    before-request hook, and Litestar runs only the closest layer's hook: a controller or handler that declared
    its own would silently replace it (guards, by contrast, add up across layers), and WebSocket and ASGI routes never
    run it."""
    for route in app.routes:
        if not route.path.startswith("/v1"):
            continue
        if not isinstance(route, HTTPRoute):  # before-request hooks run for HTTP routes only
            raise RuntimeError(f"{route.path} is not an HTTP route: nothing would check its key")
        for handler in route.route_handlers:
            if handler.resolve_before_request() is not admit_request:
                raise RuntimeError(f"{route.path} does not run admit_request before its handler")
