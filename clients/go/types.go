package ledger

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/big"
	"strconv"
	"time"
)

// Decimal is an exact decimal number kept as its digits ("0.075"), as the ledger writes ratios and USD amounts.
// It is sent as a JSON string and read from a JSON string or number without going through a binary float.
type Decimal string

// String returns the digits.
func (d Decimal) String() string { return string(d) }

// Float64 converts to the nearest float64. Use it only where an interface demands a float (one-api's ratios).
func (d Decimal) Float64() (float64, error) { return strconv.ParseFloat(string(d), 64) }

// Rat returns the exact value.
func (d Decimal) Rat() (*big.Rat, bool) { return new(big.Rat).SetString(string(d)) }

// MarshalJSON writes the decimal as a JSON string.
func (d Decimal) MarshalJSON() ([]byte, error) { return json.Marshal(string(d)) }

// UnmarshalJSON reads a JSON string or number, keeping its digits. null leaves the value unchanged.
func (d *Decimal) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if bytes.Equal(b, []byte("null")) {
		return nil
	}
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*d = Decimal(s)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("ledger: decimal: %w", err)
	}
	*d = Decimal(n.String())
	return nil
}

// HoldStatus is the state of a request: open, settled, refunded or expired.
type HoldStatus string

// The states of a hold.
const (
	StatusOpen     HoldStatus = "open"
	StatusSettled  HoldStatus = "settled"
	StatusRefunded HoldStatus = "refunded"
	StatusExpired  HoldStatus = "expired"
)

// HoldRequest is the body of POST /v1/holds.
type HoldRequest struct {
	RequestID    string `json:"request_id"`
	UserID       int64  `json:"user_id"`
	TokenID      int64  `json:"token_id"`
	Group        string `json:"group,omitempty"` // default "default"
	Model        string `json:"model"`
	PromptTokens int64  `json:"prompt_tokens"`
	MaxTokens    int64  `json:"max_tokens,omitempty"`
	// Amount, when set, is held instead of the priced estimate.
	Amount *int64 `json:"amount,omitempty"`
	// ExpiresIn is the hold's lifetime in seconds (1..86400); nil: the service's LEDGER_HOLD_TTL_SECONDS.
	ExpiresIn *int64 `json:"expires_in,omitempty"`
}

// SettleRequest is the body of POST /v1/holds/{request_id}/settle.
type SettleRequest struct {
	ChannelID        int64 `json:"channel_id"`
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	// Quota, when set, is charged instead of the priced charge.
	Quota *int64 `json:"quota,omitempty"`
}

// RefundRequest is the body of POST /v1/holds/{request_id}/refund.
type RefundRequest struct {
	Reason *string `json:"reason,omitempty"`
}

// ConsumptionRequest is the body of POST /v1/consumptions: a charge with no hold.
type ConsumptionRequest struct {
	RequestID        string `json:"request_id"`
	UserID           int64  `json:"user_id"`
	TokenID          int64  `json:"token_id"`
	ChannelID        int64  `json:"channel_id"`
	Group            string `json:"group,omitempty"`
	Model            string `json:"model"`
	PromptTokens     int64  `json:"prompt_tokens"`
	CompletionTokens int64  `json:"completion_tokens"`
	Quota            *int64 `json:"quota,omitempty"`
}

// Hold is the hold object: the state of one request (hold, settlement, refund or consumption).
type Hold struct {
	RequestID string     `json:"request_id"`
	UserID    int64      `json:"user_id"`
	TokenID   int64      `json:"token_id"`
	Group     string     `json:"group"`
	Model     string     `json:"model"`
	Status    HoldStatus `json:"status"`
	// Amount is the quota held when the hold was created (0 when trusted, and for a consumption).
	Amount int64 `json:"amount"`
	// Trusted is true when the trust rule held nothing.
	Trusted   bool       `json:"trusted"`
	Charged   *int64     `json:"charged"`
	ChannelID *int64     `json:"channel_id"`
	Late      bool       `json:"late"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt *time.Time `json:"expires_at"`
	// Entries is the request's audit trail; only GET /v1/holds/{request_id} fills it.
	Entries []Entry `json:"entries,omitempty"`
	// Replayed is true when the service answered with Idempotent-Replayed: true (nothing was written).
	Replayed bool `json:"-"`
}

// Posting is one line of a journal entry.
type Posting struct {
	Ledger  string `json:"ledger"`
	Account string `json:"account"`
	Amount  int64  `json:"amount"`
}

// Entry is an immutable journal entry.
type Entry struct {
	ID        int64           `json:"id"`
	Kind      string          `json:"kind"`
	RequestID *string         `json:"request_id"`
	UserID    *int64          `json:"user_id"`
	TokenID   *int64          `json:"token_id"`
	ChannelID *int64          `json:"channel_id"`
	CreatedAt time.Time       `json:"created_at"`
	Postings  []Posting       `json:"postings"`
	Details   json.RawMessage `json:"details"`
	Reverses  *int64          `json:"reverses"`
	Reference *string         `json:"reference"`
	Hash      string          `json:"hash"`
}

// User is a user's balances (GET /v1/users/{id}). The sums are unbounded: decode them with json.Number's
// Int64 (which fails past 2^63-1) or with big.Int.
type User struct {
	UserID       int64       `json:"user_id"`
	Available    json.Number `json:"available"`
	Held         json.Number `json:"held"`
	Used         json.Number `json:"used"`
	RequestCount json.Number `json:"request_count"`
}

// Token is a token's allowance (GET and PUT /v1/tokens/{id}). Remaining is nil for an unlimited token.
type Token struct {
	TokenID   int64        `json:"token_id"`
	UserID    int64        `json:"user_id"`
	Unlimited bool         `json:"unlimited"`
	Remaining *json.Number `json:"remaining"`
	Held      json.Number  `json:"held"`
	Used      json.Number  `json:"used"`
	// Created is true when PUT registered the token (201), false when it updated it (200).
	Created bool `json:"-"`
}

// TokenRequest is the body of PUT /v1/tokens/{id}. Remaining is required when Unlimited is false.
type TokenRequest struct {
	UserID    int64  `json:"user_id"`
	Unlimited bool   `json:"unlimited"`
	Remaining *int64 `json:"remaining"`
}

// Channel is a channel's usage (GET /v1/channels/{id}).
type Channel struct {
	ChannelID    int64       `json:"channel_id"`
	Used         json.Number `json:"used"`
	RequestCount json.Number `json:"request_count"`
}

// TopupRequest is the body of POST /v1/topups (Amount >= 1) and POST /v1/adjustments (Amount != 0, signed).
type TopupRequest struct {
	UserID    int64   `json:"user_id"`
	Amount    int64   `json:"amount"`
	Reference string  `json:"reference"`
	Note      *string `json:"note,omitempty"`
}

// FundingResult is the answer of a top-up or an adjustment: the entry and the user's balances now.
type FundingResult struct {
	Entry    Entry `json:"entry"`
	User     User  `json:"user"`
	Replayed bool  `json:"-"`
}

// ModelPricing is one model's prices. ModelPrice (USD per call) is nil for a model priced per token.
type ModelPricing struct {
	ModelRatio      Decimal  `json:"model_ratio"`
	CompletionRatio Decimal  `json:"completion_ratio"`
	ModelPrice      *Decimal `json:"model_price"`
}

// GroupPricing is one group's ratio.
type GroupPricing struct {
	GroupRatio Decimal `json:"group_ratio"`
}

// PricingDefaults are the ratios used for models and groups that are not listed.
type PricingDefaults struct {
	ModelRatio      Decimal `json:"model_ratio"`
	CompletionRatio Decimal `json:"completion_ratio"`
	GroupRatio      Decimal `json:"group_ratio"`
}

// Pricing is GET /v1/pricing.
type Pricing struct {
	Models   map[string]ModelPricing `json:"models"`
	Groups   map[string]GroupPricing `json:"groups"`
	Defaults PricingDefaults         `json:"defaults"`
}

// APIKey is a key created by POST /v1/api-keys. Key (the secret) is only returned at creation.
type APIKey struct {
	ID   int64  `json:"id"`
	Name string `json:"name"`
	Role string `json:"role"`
	Key  string `json:"key"`
}

// Batch operation kinds.
const (
	OpHold    = "hold"
	OpSettle  = "settle"
	OpRefund  = "refund"
	OpConsume = "consume"
)

// BatchOperation is one operation of POST /v1/batch. Build them with HoldOp, SettleOp, RefundOp and ConsumeOp.
type BatchOperation struct {
	Op        string      `json:"op"`
	RequestID string      `json:"request_id"`
	Body      interface{} `json:"body,omitempty"`
}

// HoldOp is a batch operation standing for Hold(r).
func HoldOp(r HoldRequest) BatchOperation {
	return BatchOperation{Op: OpHold, RequestID: r.RequestID, Body: r}
}

// SettleOp is a batch operation standing for Settle(requestID, r).
func SettleOp(requestID string, r SettleRequest) BatchOperation {
	return BatchOperation{Op: OpSettle, RequestID: requestID, Body: r}
}

// RefundOp is a batch operation standing for Refund(requestID, r).
func RefundOp(requestID string, r RefundRequest) BatchOperation {
	return BatchOperation{Op: OpRefund, RequestID: requestID, Body: r}
}

// ConsumeOp is a batch operation standing for Consume(r).
func ConsumeOp(r ConsumptionRequest) BatchOperation {
	return BatchOperation{Op: OpConsume, RequestID: r.RequestID, Body: r}
}

// BatchResult is the answer to one operation: the status and body the single call would have given.
type BatchResult struct {
	Status int             `json:"status"`
	Body   json.RawMessage `json:"body"`
}

// Hold decodes the result: the hold object for a 2xx status, a *Problem error otherwise.
func (r BatchResult) Hold() (*Hold, error) {
	if r.Status < 200 || r.Status > 299 {
		p := &Problem{Status: r.Status}
		if err := json.Unmarshal(r.Body, p); err != nil {
			return nil, fmt.Errorf("ledger: batch result %d: %w", r.Status, err)
		}
		return nil, p
	}
	var h Hold
	if err := json.Unmarshal(r.Body, &h); err != nil {
		return nil, fmt.Errorf("ledger: batch result: %w", err)
	}
	return &h, nil
}

// BatchResponse is the answer of POST /v1/batch: one result per operation, in order.
type BatchResponse struct {
	Results []BatchResult `json:"results"`
}
