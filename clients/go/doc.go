// Package ledger is the Go client of the ledger service, a double-entry quota ledger for LLM API relays
// (one-api, new-api and the like). It uses the standard library only and builds with Go 1.19.
//
// # Client
//
// New returns a Client for the lifecycle calls (Hold, Settle, Refund, Consume, Batch, GetHold), funding (Topup,
// Adjust, admin key), tokens (PutToken, GetToken), balances (GetUser, GetChannel) and prices (Pricing). Every
// method takes a context.Context. Quota amounts are int64; the unbounded sums of balances (Sum in the service's
// docs/api.md) are json.Number; ratios and USD amounts are Decimal strings, never float64 on the wire.
//
// # Errors
//
// An error answer is a *Problem (application/problem+json: type, title, status, detail, code) that matches the
// sentinel errors through errors.Is:
//
//	_, err := c.Hold(ctx, req)
//	switch {
//	case errors.Is(err, ledger.ErrInsufficientUserQuota): // 403
//	case errors.Is(err, ledger.ErrTokenNotFound):         // 404
//	case errors.Is(err, ledger.ErrIdempotencyConflict):   // 409
//	}
//
// # Retries and idempotency
//
// Connection errors, 503 and 429 are retried with capped exponential backoff and full jitter, at most
// WithMaxAttempts times in all (default 4), never past the context's end, waiting at least what Retry-After asks.
// A retry sends exactly the same bytes: the same request_id or reference, so the service answers a repeat of a call
// it had already applied as a replay (200, Idempotent-Replayed: true, surfaced as Replayed) and charges nothing
// twice. Other 4xx answers are never retried. POST /v1/api-keys, the one call without an idempotency key, is not
// retried after a connection error.
//
// # The request id
//
// The ledger keys a request's hold, settlement and consumption by its request_id. The Client takes it explicitly.
// The relay adapters, whose signatures carry none, read it from the context: the id set by WithRequestID, else
// one-api's, which its request-id middleware stores under helper.RequestIdKey ("X-Oneapi-Request-Id",
// OneAPIRequestIDKey) both on the request context and on the *gin.Context. Every call of one request must see the
// same id; without one, the Bookkeeper answers ErrNoRequestID.
//
// # Relay adapters
//
// Bookkeeper implements one-api's billing interface (ModelRatio, GroupRation, ModelCompletionRatio, Consume,
// PreConsumeQuota, RefundQuota), with the ratios cached from GET /v1/pricing (refreshed every 60 s by default,
// WithPricingRefresh). Funding (Client.NewFunding) is a per-request adapter shaped like new-api's FundingSource
// (PreConsume(amount), Settle(delta), Refund()).
package ledger
