package ledger

import (
	"context"
	"errors"
	"sync"
	"time"
)

// FundingRequest binds a Funding to one relay request.
type FundingRequest struct {
	RequestID string // the ledger's idempotency key for this request; required
	UserID    int64
	TokenID   int64
	Group     string // "" means "default"
	Model     string
	// ChannelID is the upstream channel; it may also be set later with SetChannel, before Settle.
	ChannelID int64
	// PromptTokens and MaxTokens are recorded on the hold; SetUsage gives the real usage before Settle.
	PromptTokens int64
	MaxTokens    int64
	// SettleTimeout bounds Settle and Refund, retries included (default DefaultSettleTimeout).
	SettleTimeout time.Duration
}

// Funding is a per-request adapter shaped like new-api's FundingSource (service/funding_source.go):
//
//	Source() string
//	PreConsume(amount int) error
//	Settle(delta int) error
//	Refund() error
//
// PreConsume holds amount (POST /v1/holds with an explicit amount). Settle(delta) charges amount + delta, as
// new-api's delta is relative to what was pre-consumed (a charge below zero is sent as 0); without a hold it
// posts a consumption of delta. Refund refunds the hold; after Settle, or without a hold, it does nothing.
// SettleActual, NeedsRefund and GetPreConsumedQuota follow new-api's BillingSettler.
//
// A relay that retries a request on another channel under the same RequestID, with a new Funding after Refund,
// gets the ledger request_id "<RequestID>:2" (then ":3", ...) for the retry: PreConsume skips ids whose hold is
// refunded, expired or settled. Hold().RequestID is the ledger id in use.
//
// The methods carry no context: PreConsume uses the context given to NewFunding; Settle and Refund use its values
// without its cancellation, bounded by SettleTimeout, so a client hanging up does not drop the settlement.
// A Funding is safe for concurrent use, but its calls are meant to come one after another.
type Funding struct {
	c   *Client
	ctx context.Context
	r   FundingRequest

	mu          sync.Mutex
	id          string // the ledger request_id of the hold (see holdAttempt)
	preConsumed int
	held        bool
	settled     bool
	refunded    bool
	prompt      int64
	completion  int64
	last        *Hold
}

// NewFunding returns the adapter for one request.
func (c *Client) NewFunding(ctx context.Context, r FundingRequest) *Funding {
	if ctx == nil {
		ctx = context.Background()
	}
	if r.SettleTimeout <= 0 {
		r.SettleTimeout = DefaultSettleTimeout
	}
	return &Funding{c: c, ctx: ctx, r: r, prompt: r.PromptTokens}
}

// FundingSourceLedger is what Funding.Source returns.
const FundingSourceLedger = "ledger"

// Source names the funding source, as new-api's FundingSource does ("wallet", "subscription").
func (f *Funding) Source() string { return FundingSourceLedger }

// SetChannel sets the channel that served the request (required before Settle).
func (f *Funding) SetChannel(channelID int64) {
	f.mu.Lock()
	f.r.ChannelID = channelID
	f.mu.Unlock()
}

// SetUsage records the request's real token usage for the settlement (the charge is still the explicit quota).
func (f *Funding) SetUsage(promptTokens, completionTokens int64) {
	f.mu.Lock()
	f.prompt, f.completion = promptTokens, completionTokens
	f.mu.Unlock()
}

// PreConsume holds amount for the request. A refusal is a *Problem (errors.Is(err, ErrInsufficientUserQuota),
// ...) and nothing is held. Calling it again with the same amount is a replay.
func (f *Funding) PreConsume(amount int) error {
	if amount < 0 {
		amount = 0
	}
	a := int64(amount)
	f.mu.Lock()
	req := HoldRequest{
		RequestID:    f.r.RequestID,
		UserID:       f.r.UserID,
		TokenID:      f.r.TokenID,
		Group:        f.r.Group,
		Model:        f.r.Model,
		PromptTokens: f.r.PromptTokens,
		MaxTokens:    f.r.MaxTokens,
		Amount:       &a,
	}
	f.mu.Unlock()
	h, n, err := holdAttempt(f.ctx, f.c, req)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.held, f.preConsumed, f.last, f.id = true, amount, h, attemptID(req.RequestID, n)
	f.mu.Unlock()
	return nil
}

// Settle charges the pre-consumed amount plus delta (new-api's convention: positive takes more, negative gives
// back).
func (f *Funding) Settle(delta int) error {
	f.mu.Lock()
	quota := int64(f.preConsumed) + int64(delta)
	f.mu.Unlock()
	return f.settle(quota)
}

// SettleActual charges actualQuota (new-api's BillingSettler.Settle(actualQuota)).
func (f *Funding) SettleActual(actualQuota int) error { return f.settle(int64(actualQuota)) }

func (f *Funding) settle(quota int64) error {
	if quota < 0 {
		quota = 0
	}
	f.mu.Lock()
	r, held, id := f.r, f.held, f.id
	prompt, completion := f.prompt, f.completion
	f.mu.Unlock()
	if r.ChannelID <= 0 {
		return errors.New("ledger: Funding.Settle: no channel (set FundingRequest.ChannelID or call SetChannel)")
	}
	ctx, cancel := detach(f.ctx, r.SettleTimeout)
	defer cancel()
	var h *Hold
	var err error
	if held {
		h, err = f.c.Settle(ctx, id, SettleRequest{
			ChannelID: r.ChannelID, PromptTokens: prompt, CompletionTokens: completion, Quota: &quota,
		})
	} else {
		h, err = f.c.Consume(ctx, ConsumptionRequest{
			RequestID: r.RequestID, UserID: r.UserID, TokenID: r.TokenID, ChannelID: r.ChannelID,
			Group: r.Group, Model: r.Model, PromptTokens: prompt, CompletionTokens: completion, Quota: &quota,
		})
	}
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.settled, f.last = true, h
	f.mu.Unlock()
	return nil
}

// Refund returns the held amount. It does nothing when nothing was held or the request is settled; a second
// Refund is a replay.
func (f *Funding) Refund() error {
	f.mu.Lock()
	r, held, settled, id := f.r, f.held, f.settled, f.id
	f.mu.Unlock()
	if !held || settled {
		return nil
	}
	ctx, cancel := detach(f.ctx, r.SettleTimeout)
	defer cancel()
	h, err := f.c.Refund(ctx, id, RefundRequest{})
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.refunded, f.last = true, h
	f.mu.Unlock()
	return nil
}

// NeedsRefund reports whether a hold is open on this adapter's side: held, neither settled nor refunded.
func (f *Funding) NeedsRefund() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.held && !f.settled && !f.refunded
}

// GetPreConsumedQuota is the amount given to PreConsume. The ledger may have held nothing for it (a trusted
// user: Hold().Trusted); the settlement's delta stays relative to this amount.
func (f *Funding) GetPreConsumedQuota() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.preConsumed
}

// Hold is the last hold object the ledger answered (nil before PreConsume or Settle).
func (f *Funding) Hold() *Hold {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last
}
