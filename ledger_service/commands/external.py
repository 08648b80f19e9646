"""`ledger-service external upload FILE --source NAME [--channel ID]`: store a provider's file as the API would."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger_service.domain import errors
from ledger_service.domain.external import Source
from ledger_service.services.external import ExternalService, UploadOutcome


class UploadFailed(Exception):
    """The file cannot be read or is malformed: one line for stderr, nothing stored."""


def read_file(path: Path) -> bytes:
    try:
        content = path.read_bytes()
    except OSError as error:
        raise UploadFailed(f"cannot read {path}: {error.strerror or error}") from None
    if not content:
        raise UploadFailed(f"{path} is empty")
    return content


async def run_upload(
    engine: AsyncEngine, content: bytes, *, source: Source, filename: str, channel_id: int | None
) -> UploadOutcome:
    try:
        return await ExternalService(engine).upload(source, content, filename=filename, channel_id=channel_id)
    except errors.LedgerError as error:  # malformed (validation_error), or the bytes under another source
        raise UploadFailed(error.detail) from None


def render(outcome: UploadOutcome) -> str:
    view = outcome.view
    if not outcome.created:
        return (
            f"already uploaded as upload {view.upload_id}: {view.records} records ({view.source}, sha256 {view.sha256})"
        )
    return f"upload {view.upload_id}: {view.records} records ({view.source}, sha256 {view.sha256})"
