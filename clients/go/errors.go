package ledger

import (
	"fmt"
	"time"
)

// Problem is an error answer of the ledger: an application/problem+json body (RFC 9457) with the contract's
// machine-readable Code. It matches the sentinel errors of this package through errors.Is:
//
//	if errors.Is(err, ledger.ErrInsufficientUserQuota) { ... }
//
// A non-problem error answer (uvicorn's plain-text 503, a proxy's 502, ...) is also a *Problem: its Code is
// derived from the status (503 -> "unavailable", 429 -> "rate_limited"), or empty when there is no such code.
type Problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
	Code   string `json:"code"`
	// RetryAfter is the Retry-After header of the answer (0 when absent). Set on 429 and 503.
	RetryAfter time.Duration `json:"-"`
}

func (p *Problem) Error() string {
	if p.Detail != "" {
		return fmt.Sprintf("ledger: %d %s: %s", p.Status, p.Code, p.Detail)
	}
	if p.Title != "" {
		return fmt.Sprintf("ledger: %d %s: %s", p.Status, p.Code, p.Title)
	}
	return fmt.Sprintf("ledger: %d %s", p.Status, p.Code)
}

// Is reports whether target is the sentinel error of p's code.
func (p *Problem) Is(target error) bool {
	s, ok := target.(*sentinel)
	return ok && s.code == p.Code && p.Code != ""
}

// sentinel is the type of the Err* values: an error standing for one problem code.
type sentinel struct{ code string }

func (s *sentinel) Error() string { return "ledger: " + s.code }

// Code returns the problem code the sentinel stands for.
func (s *sentinel) Code() string { return s.code }

// The problem codes of the service (docs/api.md, "Status codes"), one sentinel each. Match them with errors.Is;
// the *Problem itself (errors.As) has the status and the detail.
var (
	// 400: malformed JSON, wrong type, unknown field, out-of-range value, ... Nothing was written.
	ErrValidation = &sentinel{"validation_error"}
	// 401: missing, unknown or revoked API key.
	ErrUnauthorized = &sentinel{"unauthorized"}
	// 403: the key's role may not call this route.
	ErrForbidden = &sentinel{"forbidden"}
	// 403 on holds: the user's available quota is below the estimate.
	ErrInsufficientUserQuota = &sentinel{"insufficient_user_quota"}
	// 403 on holds: a limited token's remaining allowance is below the estimate.
	ErrInsufficientTokenQuota = &sentinel{"insufficient_token_quota"}
	// 404: the token is not registered (PUT /v1/tokens/{id} registers it).
	ErrTokenNotFound = &sentinel{"token_not_found"}
	// 404: no hold or consumption with this request_id.
	ErrHoldNotFound = &sentinel{"hold_not_found"}
	// 404: no journal entry with this id.
	ErrEntryNotFound = &sentinel{"entry_not_found"}
	// 404: no API key with this id.
	ErrAPIKeyNotFound = &sentinel{"api_key_not_found"}
	// 404: unknown path.
	ErrNotFound = &sentinel{"not_found"}
	// 405: the route does not take this method.
	ErrMethodNotAllowed = &sentinel{"method_not_allowed"}
	// 409: the token belongs to another user.
	ErrTokenUserMismatch = &sentinel{"token_user_mismatch"}
	// 409: the hold is settled (refund, or a settle with a different body), or the request_id is a consumption.
	ErrHoldAlreadySettled = &sentinel{"hold_already_settled"}
	// 409: the hold was refunded; it can no longer be settled.
	ErrHoldAlreadyRefunded = &sentinel{"hold_already_refunded"}
	// 409: the idempotency key (request_id or reference) was used with a different body.
	ErrIdempotencyConflict = &sentinel{"idempotency_conflict"}
	// 409: the entry has already been reversed.
	ErrAlreadyReversed = &sentinel{"already_reversed"}
	// 409: the entry cannot be reversed (a reversal, or one that posts to a hold account).
	ErrEntryNotReversible = &sentinel{"entry_not_reversible"}
	// 409: revoking the last active admin key is refused.
	ErrLastAdminKey = &sentinel{"last_admin_key"}
	// 413: the body is over LEDGER_MAX_BODY_BYTES.
	ErrPayloadTooLarge = &sentinel{"payload_too_large"}
	// 415: the body was not declared as JSON.
	ErrUnsupportedMediaType = &sentinel{"unsupported_media_type"}
	// 424: only inside an atomic batch's results: not applied because another operation was refused.
	ErrBatchAborted = &sentinel{"batch_aborted"}
	// 429: the API key is over its rate limit. Retried by the client.
	ErrRateLimited = &sentinel{"rate_limited"}
	// 429: a heavy report is already running. Retried by the client.
	ErrBusy = &sentinel{"busy"}
	// 503: the database cannot be reached; nothing was acknowledged. Retried by the client.
	ErrUnavailable = &sentinel{"unavailable"}
	// 500: a bug in the service.
	ErrInternal = &sentinel{"internal_error"}
)

// ErrNoRequestID is returned by the Bookkeeper when the context carries no request id (see WithRequestID).
var ErrNoRequestID = fmt.Errorf("ledger: no request id in the context (use ledger.WithRequestID or one-api's request-id middleware)")
