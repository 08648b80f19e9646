"""Every refusal the ledger can answer with. Each carries the contract's error code and HTTP status.

The HTTP layer turns a LedgerError into an RFC 9457 problem response; nothing else needs to know the status.
"""

from __future__ import annotations


class LedgerError(Exception):
    """A request the ledger refuses. Subclasses fix `code`, `status` and `title`."""

    code = "ledger_error"
    status = 400
    title = "Request refused"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        """Response headers the refusal needs (Retry-After)."""


class ValidationFailed(LedgerError):
    code = "validation_error"
    status = 400
    title = "Invalid request"


class Unauthorized(LedgerError):
    code = "unauthorized"
    status = 401
    title = "Missing or unknown API key"


class Forbidden(LedgerError):
    code = "forbidden"
    status = 403
    title = "This API key's role may not do that"


class InsufficientUserQuota(LedgerError):
    code = "insufficient_user_quota"
    status = 403
    title = "The user's available quota is below the estimate"


class InsufficientTokenQuota(LedgerError):
    code = "insufficient_token_quota"
    status = 403
    title = "The token's remaining allowance is below the estimate"


class NotFound(LedgerError):
    code = "not_found"
    status = 404
    title = "Not found"


class TokenNotFound(NotFound):
    code = "token_not_found"
    title = "Token not registered"


class HoldNotFound(NotFound):
    code = "hold_not_found"
    title = "No hold with this request_id"


class EntryNotFound(NotFound):
    code = "entry_not_found"
    title = "No entry with this id"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"
    title = "No API key with this id"


class UploadNotFound(NotFound):
    code = "upload_not_found"
    title = "No provider upload with this id"


class Conflict(LedgerError):
    code = "conflict"
    status = 409
    title = "Conflict"


class TokenUserMismatch(Conflict):
    code = "token_user_mismatch"
    title = "The token belongs to another user"


class HoldAlreadySettled(Conflict):
    code = "hold_already_settled"
    title = "The hold is already settled"


class HoldAlreadyRefunded(Conflict):
    code = "hold_already_refunded"
    title = "The hold is already refunded"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"
    title = "This idempotency key was used with a different request"


class AlreadyReversed(Conflict):
    code = "already_reversed"
    title = "The entry is already reversed"


class LastAdminKey(Conflict):
    code = "last_admin_key"
    title = "This is the last active admin key"


class UploadConflict(Conflict):
    code = "upload_conflict"
    title = "These bytes were already uploaded under another source"


class Unavailable(LedgerError):
    code = "unavailable"
    status = 503
    title = "The database is unavailable; retry later"


class EntryNotReversible(Conflict):
    code = "entry_not_reversible"
    title = "This entry cannot be reversed"


class UnsupportedMediaType(LedgerError):
    code = "unsupported_media_type"
    status = 415
    title = "Request bodies must be JSON"


class RateLimited(LedgerError):
    code = "rate_limited"
    status = 429
    title = "Too many requests for this API key"


class BatchAborted(LedgerError):
    code = "batch_aborted"
    status = 424
    title = "Not applied: another operation of the atomic batch was refused"


class Busy(LedgerError):
    code = "busy"
    status = 429
    title = "This process is already running as many heavy reports as it may; retry later"
