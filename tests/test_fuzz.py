"""Schemathesis fuzzes the running service from its own OpenAPI schema: valid and invalid requests alike.

Bounded and reproducible: a fixed number of examples per operation, derandomized (the same inputs every run).
Every response must be a documented status with a body matching its schema, never a server error; invalid
requests must be refused; and a request without the API key must be refused too. Valid requests must also be
accepted: what the document allows, the API must not refuse as malformed (`validation_error`), though it may give a
business answer (403, 404, 409, 422...); the few rules JSON Schema cannot state are listed in narrow_valid_case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from ledger_service.database import EmbeddedPostgres
from tests.conftest import TEMPLATE
from tests.processes import free_port
from tests.support import ADMIN_SECRET

EXAMPLES_PER_OPERATION = 30
FRAMING_HEADERS = frozenset({"transfer-encoding", "content-length", "connection", "host", "te", "trailer", "upgrade"})
"""Headers that frame the HTTP message: the client's business, not the API's input. A garbled one is refused by the
HTTP server's parser (400, plain text) before the application sees the request, so it is not generated."""
INSTANT_PARAMETERS = frozenset({"from", "to", "as_of"})
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
CHECKS: list[Any] = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.ignored_auth,
]


@schemathesis.check
def invalid_data_rejected(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's negative_data_rejection, but a batch refuses an invalid operation in that operation's
    result (200 overall, docs/api.md): a batch answered 200 with a `validation_error` result has refused it."""
    if case.path == "/v1/batch" and response.status_code == 200:
        codes = {result["body"].get("code") for result in response.json()["results"]}
        if "validation_error" in codes:
            return None
    return openapi_checks.negative_data_rejection(ctx, response, case)


CHECKS.append(invalid_data_rejected)


@schemathesis.check
def valid_data_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """What the schema allows, the API accepts: a valid request (positive mode) must not be refused as malformed.

    Business answers are fine: 404 for an id that names nothing, 403 for a role or quota, 409 for a conflict, 422
    for a rule of the books. The tell of a refusal by validation is the problem's `code`, `validation_error`
    (always a 400): the request broke a rule the document did not state."""
    if response.status_code not in (400, 422):
        return None
    try:
        code = response.json().get("code")
    except Exception:  # not a problem document: status_code_conformance and the content checks report it
        code = None
    if code == "validation_error" or code is None:
        raise AssertionError(
            f"a request the schema allows was refused ({response.status_code}): {response.text[:500]}\n"
            f"{case.method} {case.formatted_path} query={case.query} body={case.body!r}"[:1500]
        )
    return None


@schemathesis.check
def valid_batch_operations_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """A batch answers 200 with one result per operation: a valid operation's result must not be a refusal by
    validation either."""
    if case.path != "/v1/batch" or response.status_code != 200:
        return None
    refused = [result for result in response.json()["results"] if result["body"].get("code") == "validation_error"]
    if refused:
        raise AssertionError(
            f"a batch operation the schema allows was refused: {refused[0]}\nbody={case.body!r}"[:1500]
        )
    return None


POSITIVE_CHECKS: list[Any] = [*CHECKS, valid_data_accepted, valid_batch_operations_accepted]


def integral_floats_as_ints(value: Any) -> Any:
    """JSON Schema's `integer` takes 163.0 (a number with no fraction), and schemathesis generates such floats;
    the service's strict decoder refuses them (docs/api.md: an integer is written without a fraction or an
    exponent), a rule no JSON Schema keyword states. So valid requests send them as the integers they stand for."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_floats_as_ints(item) for item in value]
    return value


def narrow_valid_case(case: Any) -> None:
    """The few valid-request rules the schema cannot state, each applied to the generated case (docs/api.md):

    - a `cursor` is opaque: only a `next_cursor` the service handed out is one (its charset is stated), so the
      generated one is left out;
    - an integer is sent as an integer (integral_floats_as_ints);
    - a batch operation's `body.request_id` is the operation's own (JSON Schema cannot compare two values);
    - an instant of year 1 or 9999 is sent in UTC: with some offsets it falls outside years 1-9999 in UTC, which
      the API refuses and neither the pattern nor `format: date-time` can state."""
    if case.query:
        case.query.pop("cursor", None)
        for name in INSTANT_PARAMETERS & case.query.keys():
            value = case.query[name]
            if isinstance(value, str) and value[:4] in ("0001", "9999"):
                case.query[name] = value[:19] + "Z"
    if isinstance(case.body, (dict, list)):
        case.body = integral_floats_as_ints(case.body)
    if case.path == "/v1/batch" and isinstance(case.body, dict):
        for operation in case.body.get("operations", []):
            body = operation.get("body") if isinstance(operation, dict) else None
            if isinstance(body, dict) and "request_id" in body:
                body["request_id"] = operation["request_id"]


@pytest.fixture(scope="module")
def fuzz_server(postgres: EmbeddedPostgres) -> Iterator[str]:
    """A service process on its own database, with a little data so that reads find something."""
    postgres.psql(
        f"DROP DATABASE IF EXISTS fuzzing WITH (FORCE); CREATE DATABASE fuzzing TEMPLATE {TEMPLATE} STRATEGY FILE_COPY;"
    )
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    env.update(
        LEDGER_DATABASE_URL=postgres.url("fuzzing"),
        LEDGER_PORT=str(port),
        LEDGER_ADMIN_KEY=ADMIN_SECRET,
        LEDGER_LOG_FORMAT="text",
    )
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "ledger_service", "serve"], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"the service did not start:\n{log.read()}")
                time.sleep(0.1)
            seed(base)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.seek(0)
            failures = [line for line in log if "Traceback" in line or "unhandled error" in line]
            assert failures == [], "the service logged unhandled errors while being fuzzed"


def seed(base: str) -> None:
    with httpx.Client(base_url=base, headers=ADMIN) as http:
        http.post("/v1/topups", json={"user_id": 1, "amount": 10**9, "reference": "fuzz-funding"}).raise_for_status()
        http.put("/v1/tokens/1", json={"user_id": 1, "unlimited": False, "remaining": 10**8}).raise_for_status()
        hold = {"request_id": "fuzz-hold", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 10}
        http.post("/v1/holds", json=hold).raise_for_status()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server}/schema/openapi.json")


def operation_ids(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_generated_requests(api_schema: Any, fuzz_server: str, mode: GenerationMode) -> None:
    """Every operation, EXAMPLES_PER_OPERATION generated requests each; all failures are reported together."""
    failures: list[str] = []
    for operation in operation_ids(api_schema):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def call(case: Any) -> None:
            for name in list(case.headers or {}):
                if name.lower() in FRAMING_HEADERS:
                    del case.headers[name]
            if mode is GenerationMode.POSITIVE:
                narrow_valid_case(case)
            case.call_and_validate(
                base_url=fuzz_server,
                headers=ADMIN,
                checks=POSITIVE_CHECKS if mode is GenerationMode.POSITIVE else CHECKS,
                timeout=30,
            )

        try:
            call()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request could be generated"
        except (Exception, BaseExceptionGroup) as error:  # every operation is tried; failures are listed at the end
            failures.append(f"{operation.label}: {type(error).__name__}: {str(error)[:2000]}")
    assert failures == [], "\n\n".join(failures)
