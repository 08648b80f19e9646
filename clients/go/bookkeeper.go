package ledger

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"
)

// ConsumeLog is one-api's consume record (relay/billing.ConsumeLog of the Bookkeeper refactoring), the argument
// of Bookkeeper.Consume. Quota is the charge the relay computed; PreConsumedQuota what PreConsumeQuota returned.
type ConsumeLog struct {
	UserId           int
	ChannelId        int
	PromptTokens     int
	CompletionTokens int
	ModelName        string
	TokenId          int
	TokenName        string
	Quota            int64
	Content          string
	PreConsumedQuota int64
}

// DefaultSettleTimeout bounds a Bookkeeper's or Funding's settlement or refund, retries included.
const DefaultSettleTimeout = 30 * time.Second

// Bookkeeper implements one-api's billing interface (relay/billing.Bookkeeper) on the ledger:
//
//	ModelRatio(model string) float64
//	GroupRation(group string) float64          // sic, one-api's spelling
//	ModelCompletionRatio(model string) float64
//	Consume(ctx context.Context, consumeLog *ConsumeLog)
//	PreConsumeQuota(ctx context.Context, preConsumedQuota int64, userId, tokenId int) (int64, error)
//	RefundQuota(ctx context.Context, preConsumedQuota int64, tokenId int)
//
// one-api's PreConsumeQuota returns *relaymodel.ErrorWithStatusCode; this package has no dependency, so it
// returns error (a *Problem for the ledger's refusals, whose Status and Code map onto one-api's error wrapper).
//
// None of these methods carries a request id. It is taken from ctx: the one set by WithRequestID, else one-api's
// (helper.RequestIdKey, "X-Oneapi-Request-Id", set by its request-id middleware on the request context and on the
// *gin.Context). Without one, PreConsumeQuota, Consume and RefundQuota fail with ErrNoRequestID. The request id is
// the ledger's idempotency key: PreConsumeQuota, Consume and RefundQuota of one request must see the same one.
//
// one-api retries a failed upstream call on another channel within the same client request, under the same
// request id, after refunding the first attempt. The ledger request_id of a retry is therefore "<id>:2", "<id>:3",
// ...: PreConsumeQuota takes the first one whose hold is not refunded, expired or settled, and the Bookkeeper
// remembers it (in memory, per process, for up to an hour) for the Consume or RefundQuota that follows.
//
// Consume and RefundQuota return nothing (as one-api's interface demands): their errors go to the error handler
// (WithErrorHandler; the default logs them). TryConsume and TryRefundQuota are the same calls returning the error.
// Both run on a context that keeps ctx's values but not its cancellation, bounded by the settle timeout, so that a
// client hanging up does not drop the settlement.
type Bookkeeper struct {
	c             *Client
	pricing       *PricingCache
	settleTimeout time.Duration
	refresh       time.Duration
	onError       func(ctx context.Context, op string, err error)
	attempts      *attempts
}

// BookkeeperOption configures a Bookkeeper.
type BookkeeperOption func(*Bookkeeper)

// WithPricingRefresh sets how often the ratios are reloaded from GET /v1/pricing (default 60 s).
func WithPricingRefresh(d time.Duration) BookkeeperOption {
	return func(b *Bookkeeper) { b.refresh = d }
}

// WithSettleTimeout bounds Consume and RefundQuota, retries included (default 30 s).
func WithSettleTimeout(d time.Duration) BookkeeperOption {
	return func(b *Bookkeeper) { b.settleTimeout = d }
}

// WithErrorHandler receives the errors of Consume, RefundQuota and background pricing reloads (op is "consume",
// "refund" or "pricing"). The default logs them with the standard logger.
func WithErrorHandler(f func(ctx context.Context, op string, err error)) BookkeeperOption {
	return func(b *Bookkeeper) { b.onError = f }
}

// NewBookkeeper loads the prices (GET /v1/pricing) and returns the Bookkeeper; c needs a relay (or admin) key.
func NewBookkeeper(ctx context.Context, c *Client, opts ...BookkeeperOption) (*Bookkeeper, error) {
	b := &Bookkeeper{c: c, settleTimeout: DefaultSettleTimeout, refresh: DefaultPricingRefresh,
		attempts: newAttempts(time.Hour)}
	for _, o := range opts {
		o(b)
	}
	if b.onError == nil {
		b.onError = func(ctx context.Context, op string, err error) {
			log.Printf("ledger: %s of request %q: %v", op, RequestIDFrom(ctx), err)
		}
	}
	pc, err := NewPricingCache(ctx, c, b.refresh, func(err error) { b.onError(context.Background(), "pricing", err) })
	if err != nil {
		return nil, fmt.Errorf("ledger: loading the prices: %w", err)
	}
	b.pricing = pc
	return b, nil
}

// Pricing is the Bookkeeper's price cache.
func (b *Bookkeeper) Pricing() *PricingCache { return b.pricing }

// ModelRatio is the model's ratio from the cached GET /v1/pricing (the default, 30, for an unlisted model).
// float64 only because one-api's interface demands it; the ledger keeps the exact decimal. A model priced per
// call (model_price) has no per-token ratio to give here: read Pricing() for it.
func (b *Bookkeeper) ModelRatio(model string) float64 { return b.pricing.ModelRatio(model) }

// GroupRation is the group's ratio (one-api's spelling of GroupRatio).
func (b *Bookkeeper) GroupRation(group string) float64 { return b.pricing.GroupRatio(group) }

// ModelCompletionRatio is the model's completion ratio.
func (b *Bookkeeper) ModelCompletionRatio(model string) float64 {
	return b.pricing.CompletionRatio(model)
}

// PreConsumeQuota holds preConsumedQuota for the request of ctx (POST /v1/holds with an explicit amount) and
// returns the quota held: 0 when the ledger trusts the user (the hold answered trusted: true), as one-api's own
// trust rule does. A refusal is a *Problem: errors.Is(err, ErrInsufficientUserQuota), ErrInsufficientTokenQuota,
// ErrTokenNotFound, ErrTokenUserMismatch; nothing is held then and 0 is returned.
func (b *Bookkeeper) PreConsumeQuota(ctx context.Context, preConsumedQuota int64, userId, tokenId int) (int64, error) {
	id := RequestIDFrom(ctx)
	if id == "" {
		return 0, ErrNoRequestID
	}
	if preConsumedQuota < 0 {
		preConsumedQuota = 0
	}
	info := requestInfoFrom(ctx)
	h, n, err := holdAttempt(ctx, b.c, HoldRequest{
		RequestID: id,
		UserID:    int64(userId),
		TokenID:   int64(tokenId),
		Group:     info.Group,
		Model:     info.Model,
		Amount:    &preConsumedQuota,
	})
	if err != nil {
		return 0, err
	}
	b.attempts.set(id, n)
	return h.Amount, nil
}

// Consume settles the request of ctx with the explicit charge consumeLog.Quota and its usage. When the request
// has no hold (PreConsumeQuota was not called), it posts a consumption instead. Errors go to the error handler.
func (b *Bookkeeper) Consume(ctx context.Context, consumeLog *ConsumeLog) {
	if _, err := b.TryConsume(ctx, consumeLog); err != nil {
		b.onError(ctx, "consume", err)
	}
}

// TryConsume is Consume returning the request's hold object, or the error.
func (b *Bookkeeper) TryConsume(ctx context.Context, l *ConsumeLog) (*Hold, error) {
	if l == nil {
		return nil, errors.New("ledger: Consume: nil ConsumeLog")
	}
	id := RequestIDFrom(ctx)
	if id == "" {
		return nil, ErrNoRequestID
	}
	sctx, cancel := detach(ctx, b.settleTimeout)
	defer cancel()
	quota := l.Quota
	if quota < 0 {
		quota = 0
	}
	prompt, completion := nonNegative(l.PromptTokens), nonNegative(l.CompletionTokens)
	n := b.attempts.get(id)
	h, err := b.c.Settle(sctx, attemptID(id, n), SettleRequest{
		ChannelID:        int64(l.ChannelId),
		PromptTokens:     prompt,
		CompletionTokens: completion,
		Quota:            &quota,
	})
	if err == nil {
		b.attempts.forget(id)
	}
	if err == nil || !errors.Is(err, ErrHoldNotFound) || n > 1 {
		return h, err
	}
	info := requestInfoFrom(ctx)
	model := l.ModelName
	if model == "" {
		model = info.Model
	}
	return b.c.Consume(sctx, ConsumptionRequest{
		RequestID:        id,
		UserID:           int64(l.UserId),
		TokenID:          int64(l.TokenId),
		ChannelID:        int64(l.ChannelId),
		Group:            info.Group,
		Model:            model,
		PromptTokens:     prompt,
		CompletionTokens: completion,
		Quota:            &quota,
	})
}

// RefundQuota refunds the hold of the request of ctx after a failed upstream call. A request with nothing held
// (no hold, and preConsumedQuota 0) is not an error. Errors go to the error handler.
func (b *Bookkeeper) RefundQuota(ctx context.Context, preConsumedQuota int64, tokenId int) {
	if err := b.TryRefundQuota(ctx, preConsumedQuota, tokenId); err != nil {
		b.onError(ctx, "refund", err)
	}
}

// TryRefundQuota is RefundQuota returning the error. tokenId is not needed: the hold knows its token.
func (b *Bookkeeper) TryRefundQuota(ctx context.Context, preConsumedQuota int64, tokenId int) error {
	id := RequestIDFrom(ctx)
	if id == "" {
		return ErrNoRequestID
	}
	sctx, cancel := detach(ctx, b.settleTimeout)
	defer cancel()
	_, err := b.c.Refund(sctx, attemptID(id, b.attempts.get(id)), RefundRequest{})
	if err != nil && preConsumedQuota == 0 && errors.Is(err, ErrHoldNotFound) {
		return nil
	}
	if err == nil {
		b.attempts.forget(id)
	}
	return err
}

func nonNegative(n int) int64 {
	if n < 0 {
		return 0
	}
	return int64(n)
}
