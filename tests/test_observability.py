"""Metrics and logs: what an operator sees, and what must never appear in it."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ledger_service import observability
from ledger_service.api.app import create_app
from ledger_service.observability import JsonFormatter, RedactingFilter, redact
from ledger_service.services.audit import AuditService
from ledger_service.services.housekeeping import Housekeeping
from ledger_service.services.ledger import LedgerService
from ledger_service.settings import Settings
from tests.processes import AUTH, ServiceProcess
from tests.support import ADMIN_SECRET, LedgerClient


async def scrape(ledger: LedgerClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await ledger.client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_by_route_and_the_lifecycle(
    ledger: LedgerClient, service: LedgerService, settings: Settings
) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    before = await scrape(ledger)
    for rid in ("m1", "m2", "m3"):
        assert (await ledger.hold(request_id=rid, max_tokens=10)).status_code == 201
    await ledger.hold(request_id="m1", max_tokens=10)  # a replay: not a new hold
    await ledger.post("/v1/holds/m1/settle", {"channel_id": 1, "prompt_tokens": 1, "completion_tokens": 1})
    await ledger.post("/v1/holds/m2/refund", {})
    await ledger.backdate("m3")
    await Housekeeping(
        service.engine, service.lifecycle, AuditService(service.engine, sweep_interval_seconds=5), settings
    ).sweep()
    await ledger.get("/v1/holds/nope")
    await ledger.get("/v1/no-such-route")  # no route: 404
    await ledger.client.delete("/v1/topups", headers={"Authorization": f"Bearer {ADMIN_SECRET}"})  # no such method
    after = await scrape(ledger)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ledger_holds_opened_total", trusted="false") == 3
    assert delta("ledger_holds_settled_total", late="false") == 1
    assert delta("ledger_holds_refunded_total") == 1
    assert delta("ledger_holds_expired_total") == 1
    http = {"app_name": "ledger", "method": "POST", "path": "/v1/holds"}
    assert delta("ledger_http_requests_total", **http, status_code="201") == 3
    assert delta("ledger_http_requests_total", **http, status_code="200") == 1
    not_found = {"app_name": "ledger", "method": "GET", "path": "/v1/holds/{request_id}", "status_code": "404"}
    assert delta("ledger_http_requests_total", **not_found) == 1  # one series per route, not per request_id
    unmatched = {"app_name": "ledger", "path": "unmatched"}  # requests no route took: one series, not per path
    assert delta("ledger_http_requests_total", **unmatched, method="GET", status_code="404") == 1
    assert delta("ledger_http_requests_total", **unmatched, method="DELETE", status_code="405") == 1
    assert delta("ledger_http_requests_total", **unmatched, method="POST", status_code="201") == 0  # never twice
    assert any(name == "ledger_http_request_duration_seconds_bucket" for name, _ in after)
    assert value(after, "ledger_sweeper_lag_seconds") == 0.0  # nothing overdue left


async def test_gauges_show_how_stale_the_background_work_is(
    ledger: LedgerClient, service: LedgerService, settings: Settings
) -> None:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1)
    await ledger.hold(request_id="late", max_tokens=10)
    await ledger.backdate("late")
    await ledger.conn.execute(
        "SET session_replication_role = replica; UPDATE requests SET expires_at = now() - interval '90 seconds';"
        " SET session_replication_role = origin"
    )
    housekeeping = Housekeeping(
        service.engine, service.lifecycle, AuditService(service.engine, sweep_interval_seconds=5), settings
    )
    await housekeeping.materialize()
    samples = await scrape(ledger)
    assert value(samples, "ledger_unsealed_entries") == 0
    assert 0 <= value(samples, "ledger_snapshot_age_seconds") < 60
    await ledger.fund(2, 1)
    await housekeeping.materialize()
    assert value(await scrape(ledger), "ledger_unsealed_entries") == 0  # the new entry was sealed too


async def test_logs_are_json_with_the_request_id_and_never_a_secret(database_url: str) -> None:
    service = ServiceProcess(database_url, settings={"LEDGER_LOG_FORMAT": "json"})
    try:
        await service.start()

        async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
            await http.post("/v1/topups", json={"user_id": 1, "amount": 10**6, "reference": "f"}, headers=AUTH)
            await http.put("/v1/tokens/1", json={"user_id": 1, "unlimited": True}, headers=AUTH)
            hold = {"request_id": "trace-me", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 1}
            assert (await http.post("/v1/holds", json=hold, headers=AUTH)).status_code == 201
            await http.get("/v1/users/1", headers={"Authorization": "Bearer lsk_not-a-real-key-at-all"})
            assert (await http.get("/v1/nowhere/lsk_secret-in-the-path", headers=AUTH)).status_code == 404
        await service.stop()
        lines = [line for line in service.logged().splitlines() if line.strip()]
    finally:
        await service.stop()
        service.close()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    hold_lines = [r for r in records if r.get("route") == "/v1/holds" and r.get("method") == "POST"]
    assert len(hold_lines) == 1
    (line,) = hold_lines
    assert (line["request_id"], line["status"], line["logger"]) == ("trace-me", 201, "ledger_service.access")
    assert isinstance(line["key_id"], int)
    assert line["duration_ms"] > 0
    refused = [r for r in records if r.get("route") == "/v1/users/{user_id}"]
    assert refused[0]["status"] == 401
    unmatched = [r for r in records if r.get("route") == "unmatched"]  # no route took it: logged all the same
    assert [(r["method"], r["status"], r["logger"]) for r in unmatched] == [("GET", 404, "ledger_service.access")]
    everything = "\n".join(lines)
    assert ADMIN_SECRET not in everything
    assert "lsk_not-a-real-key" not in everything
    assert "lsk_secret-in-the-path" not in everything  # an unmatched request is logged by route, not by path
    assert "Authorization" not in everything


def test_secrets_are_redacted_from_any_log_record() -> None:
    assert redact("Authorization: Bearer abc.def-123") == "Authorization: Bearer [redacted]"
    assert redact("key lsk_Zx9_-Q is bad") == "key lsk_[redacted] is bad"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", ("bearer s3cr3t",), None)
    assert RedactingFilter().filter(record)
    assert json.loads(JsonFormatter().format(record))["message"] == "got bearer [redacted]"


async def test_metrics_add_up_across_worker_processes(database_url: str) -> None:
    """With two workers, every scrape (whichever worker answers it) counts the requests of both."""
    service = ServiceProcess(database_url, settings={"LEDGER_WORKERS": "2", "LEDGER_LOG_FORMAT": "text"})
    try:
        await service.start()
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
            for _ in range(20):
                assert (await http.get("/v1/users/1", headers=AUTH)).status_code == 200
            seen = set()
            for _ in range(6):
                response = await http.get("/metrics", headers={"Connection": "close"})
                for family in text_string_to_metric_families(response.text):
                    for sample in family.samples:
                        if (
                            sample.name == "ledger_http_requests_total"
                            and sample.labels.get("path") == "/v1/users/{user_id}"
                        ):
                            seen.add(sample.value)
            assert seen == {20.0}
    finally:
        await service.stop()
        service.close()


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """configure_logging changes the root logger and the module's handler: put both back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, observability._access_handler)
    try:
        yield
    finally:
        root.handlers, observability._access_handler = saved[0], saved[2]
        root.setLevel(saved[1])
        observability.access_log.filters.clear()


def test_access_lines_follow_the_logging_configuration(
    logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The direct write is only a shortcut to configure_logging's handler: after logging is reconfigured, a filter
    on the access logger, or a broken stream, the line goes through the logging machinery instead."""
    observability.configure_logging("json")
    observability.log_request("POST", "/v1/holds", 201, time.perf_counter(), 3)
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert (line["logger"], line["message"], line["key_id"]) == ("ledger_service.access", "POST /v1/holds 201", 3)
    observability.access_log.addFilter(lambda record: True)  # any filter: the line takes the logging path
    observability.log_request("POST", "/v1/holds", 201, time.perf_counter(), 3)
    (through_logging,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    observability.access_log.filters.clear()
    assert list(through_logging) == list(line)  # the same keys in the same order
    assert {k: v for k, v in through_logging.items() if k not in ("time", "duration_ms")} == {
        k: v for k, v in line.items() if k not in ("time", "duration_ms")
    }

    dropped: list[logging.LogRecord] = []

    def drop(record: logging.LogRecord) -> bool:
        dropped.append(record)
        return False

    observability.access_log.addFilter(drop)
    observability.log_request("GET", "/v1/users/{user_id}", 200, time.perf_counter(), 3)
    assert len(dropped) == 1
    assert capsys.readouterr().err == ""
    observability.access_log.filters.clear()

    elsewhere = io.StringIO()
    logging.getLogger().handlers = [logging.StreamHandler(elsewhere)]  # reconfigured by someone else
    observability.log_request("GET", "/v1/users/{user_id}", 200, time.perf_counter(), 3)
    assert elsewhere.getvalue() == "GET /v1/users/{user_id} 200\n"
    assert capsys.readouterr().err == ""

    observability.configure_logging("json")
    assert observability._access_handler is not None
    broken = io.StringIO()
    broken.close()
    observability._access_handler.setStream(broken)
    observability.log_request("GET", "/v1/users/{user_id}", 200, time.perf_counter(), 3)  # does not raise
    assert "Logging error" in capsys.readouterr().err  # the handler reported it, as for any other record

    observability.configure_logging("text")  # text lines always go through the formatter
    observability.log_request("GET", "/v1/users/{user_id}", 200, time.perf_counter(), 3)
    assert capsys.readouterr().err.endswith(" INFO ledger_service.access: GET /v1/users/{user_id} 200\n")


async def test_a_method_of_the_clients_own_is_counted_as_other_never_as_a_label_of_its_own() -> None:
    """uvicorn's parser refuses unknown methods, but another server may pass them on: on the open /metrics, a label
    per method would grow without bound and publish whatever the client sent."""
    app = create_app(Settings.from_env({"LEDGER_DATABASE_URL": "postgresql://unused@/unused"}))  # no database use
    series = 'ledger_http_requests_total{app_name="ledger",method="OTHER",path="unmatched",status_code="405"}'

    def count(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))

    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # Litestar's scope types are narrower
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as http:
        before = count((await http.get("/metrics")).text)
        assert (await http.request("LSK_SECRET", "/v1/topups")).status_code == 405
        metrics = (await http.get("/metrics")).text
    assert count(metrics) == before + 1
    assert "LSK_SECRET" not in metrics


async def test_an_unmatched_request_never_carries_an_earlier_calls_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """In one task (in-process ASGI, tests), a request no route takes must not log the request_id an earlier call
    bound."""
    from ledger_service.api import middleware

    seen: list[str | None] = []
    monkeypatch.setattr(middleware, "log_request", lambda *args: seen.append(observability.request_id_var.get()))

    async def no_route(scope: object, receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def sent(message: object) -> None:
        return None

    observability.bind_request_id("an-earlier-call")
    wrapped = middleware.unrouted_middleware(no_route)
    await wrapped({"type": "http", "method": "GET", "path": "/nope", "state": {}}, None, sent)  # type: ignore[arg-type]
    assert seen == [None]
