"""Turning a service Outcome into a response: 201 for new, 200 for existing, and the replay header."""

from __future__ import annotations

from typing import TypeVar

from litestar.response import Response

from ledger_service.services.ledger import Outcome

T = TypeVar("T")

REPLAYED_HEADER = "Idempotent-Replayed"


def respond(outcome: Outcome[T], *, created_status: int = 201) -> Response[T]:
    status = created_status if outcome.created else 200
    headers = {REPLAYED_HEADER: "true"} if outcome.replayed else None
    return Response(outcome.value, status_code=status, headers=headers)
