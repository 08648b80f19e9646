package ledger_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

// oneAPIBookkeeper is one-api's relay/billing.Bookkeeper, with its *relaymodel.ErrorWithStatusCode written as
// error and its ConsumeLog as this package's.
type oneAPIBookkeeper interface {
	ModelRatio(model string) float64
	GroupRation(group string) float64
	ModelCompletionRatio(model string) float64
	Consume(ctx context.Context, consumeLog *ledger.ConsumeLog)
	PreConsumeQuota(ctx context.Context, preConsumedQuota int64, userId, tokenId int) (int64, error)
	RefundQuota(ctx context.Context, preConsumedQuota int64, tokenId int)
}

// fundingSource is new-api's service.FundingSource.
type fundingSource interface {
	Source() string
	PreConsume(amount int) error
	Settle(delta int) error
	Refund() error
}

var (
	_ oneAPIBookkeeper = (*ledger.Bookkeeper)(nil)
	_ fundingSource    = (*ledger.Funding)(nil)
)

type errorLog struct {
	mu   sync.Mutex
	errs []error
}

func (l *errorLog) handler(_ context.Context, op string, err error) {
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

func (l *errorLog) list() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.errs...)
}

func newBookkeeper(t *testing.T, opts ...ledger.BookkeeperOption) (*ledger.Bookkeeper, *errorLog) {
	t.Helper()
	el := &errorLog{}
	opts = append([]ledger.BookkeeperOption{ledger.WithErrorHandler(el.handler)}, opts...)
	b, err := ledger.NewBookkeeper(testCtx(t), relay, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return b, el
}

func TestBookkeeperRatios(t *testing.T) {
	b, _ := newBookkeeper(t)
	if r := b.ModelRatio("gpt-4o"); r != 2.5 {
		t.Fatalf("gpt-4o model ratio %v", r)
	}
	if r := b.ModelCompletionRatio("gpt-4o"); r != 4 {
		t.Fatalf("gpt-4o completion ratio %v", r)
	}
	if r := b.ModelRatio("gpt-4o-mini"); r != 0.075 {
		t.Fatalf("gpt-4o-mini model ratio %v", r)
	}
	if r := b.GroupRation("vip"); r != 1 {
		t.Fatalf("vip %v", r)
	}
	if b.ModelRatio("no-such-model") != 30 || b.ModelCompletionRatio("no-such-model") != 1 || b.GroupRation("no-such-group") != 1 {
		t.Fatal("defaults")
	}
}

func TestBookkeeperPricingRefresh(t *testing.T) {
	ctx := testCtx(t)
	group := reqID(t, "group")
	b, _ := newBookkeeper(t, ledger.WithPricingRefresh(20*time.Millisecond))
	if b.GroupRation(group) != 1 {
		t.Fatal("unknown group")
	}
	if _, err := setGroupRatio(ctx, group, "0.5"); err != nil {
		t.Fatal(err)
	}
	// Reads after the interval start a reload; poll until the new ratio shows.
	deadline := time.Now().Add(20 * time.Second)
	for b.GroupRation(group) != 0.5 {
		if time.Now().After(deadline) {
			t.Fatal("the new group ratio never showed")
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, not synchronising
	}
}

func TestBookkeeperHeldFlow(t *testing.T) {
	b, errs := newBookkeeper(t)
	user, token := newUser(t, 50_000)
	channel := nextID()
	id := reqID(t, "bk-held")
	// one-api's request-id middleware: context.WithValue(ctx, helper.RequestIdKey, id), a plain string key.
	ctx := context.WithValue(testCtx(t), ledger.OneAPIRequestIDKey, id) //nolint:staticcheck // one-api's own key
	ctx = ledger.WithRequestInfo(ctx, ledger.RequestInfo{Model: "gpt-4o", Group: "vip"})

	pre, err := b.PreConsumeQuota(ctx, 1000, int(user), int(token))
	if err != nil || pre != 1000 {
		t.Fatalf("pre-consume: %d %v", pre, err)
	}
	wantBalances(t, user, 49_000, 1000, 0, 0)

	// The relay's request ends (its context is cancelled) before it settles: the settlement still happens.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	b.Consume(cctx, &ledger.ConsumeLog{UserId: int(user), ChannelId: int(channel), PromptTokens: 100, CompletionTokens: 50,
		ModelName: "gpt-4o", TokenId: int(token), Quota: 700, PreConsumedQuota: pre})
	if e := errs.list(); len(e) != 0 {
		t.Fatalf("errors: %v", e)
	}
	wantBalances(t, user, 49_300, 0, 700, 1)
	h := mustHold(t)(relay.GetHold(ctx, id))
	if h.Status != ledger.StatusSettled || *h.Charged != 700 || h.Model != "gpt-4o" || h.Group != "vip" || *h.ChannelID != channel {
		t.Fatalf("hold: %+v", h)
	}
	// A repeated Consume is a replay; a refund after it is an error, reported to the handler.
	b.Consume(ctx, &ledger.ConsumeLog{UserId: int(user), ChannelId: int(channel), PromptTokens: 100, CompletionTokens: 50,
		ModelName: "gpt-4o", TokenId: int(token), Quota: 700, PreConsumedQuota: pre})
	b.RefundQuota(ctx, pre, int(token))
	if e := errs.list(); len(e) != 1 || !errors.Is(e[0], ledger.ErrHoldAlreadySettled) {
		t.Fatalf("errors: %v", e)
	}
	wantBalances(t, user, 49_300, 0, 700, 1)
}

func TestBookkeeperTrustedUser(t *testing.T) {
	b, _ := newBookkeeper(t)
	user, token := newUser(t, 1_000_000_000)
	channel := nextID()
	ctx := ledger.WithRequestID(testCtx(t), reqID(t, "bk-trusted"))
	pre, err := b.PreConsumeQuota(ctx, 1000, int(user), int(token))
	if err != nil || pre != 0 {
		t.Fatalf("pre-consume of a trusted user: %d %v (want 0)", pre, err)
	}
	wantBalances(t, user, 1_000_000_000, 0, 0, 0)
	h, err := b.TryConsume(ctx, &ledger.ConsumeLog{UserId: int(user), ChannelId: int(channel), ModelName: "gpt-4o",
		TokenId: int(token), PromptTokens: 10, CompletionTokens: 10, Quota: 300})
	if err != nil || !h.Trusted || *h.Charged != 300 {
		t.Fatalf("consume: %+v %v", h, err)
	}
	wantBalances(t, user, 1_000_000_000-300, 0, 300, 1)
}

func TestBookkeeperRefundAndRefusals(t *testing.T) {
	b, _ := newBookkeeper(t)
	user, token := newUser(t, 5000)
	id := reqID(t, "bk-refund")
	ctx := ledger.WithRequestID(testCtx(t), id)

	pre, err := b.PreConsumeQuota(ctx, 2000, int(user), int(token))
	if err != nil || pre != 2000 {
		t.Fatalf("pre-consume: %d %v", pre, err)
	}
	if err := b.TryRefundQuota(ctx, pre, int(token)); err != nil {
		t.Fatal(err)
	}
	if err := b.TryRefundQuota(ctx, pre, int(token)); err != nil {
		t.Fatalf("repeated refund: %v", err)
	}
	wantBalances(t, user, 5000, 0, 0, 0)
	h := mustHold(t)(relay.GetHold(ctx, id))
	if h.Status != ledger.StatusRefunded || h.Model != "unknown" {
		t.Fatalf("hold: %+v", h)
	}

	// Refusals, each with its own request id.
	_, err = b.PreConsumeQuota(ledger.WithRequestID(ctx, reqID(t, "bk-big")), 6000, int(user), int(token))
	wantErr(t, err, ledger.ErrInsufficientUserQuota)
	_, err = b.PreConsumeQuota(ledger.WithRequestID(ctx, reqID(t, "bk-tok")), 10, int(user), int(nextID()))
	wantErr(t, err, ledger.ErrTokenNotFound)
	_, err = b.PreConsumeQuota(context.Background(), 10, int(user), int(token))
	if !errors.Is(err, ledger.ErrNoRequestID) {
		t.Fatalf("no request id: %v", err)
	}
	// Nothing was held for a refused request: refunding it is not an error.
	if err := b.TryRefundQuota(ledger.WithRequestID(ctx, reqID(t, "bk-big2")), 0, int(token)); err != nil {
		t.Fatal(err)
	}
}

func TestBookkeeperConsumeWithoutHold(t *testing.T) {
	b, _ := newBookkeeper(t)
	user, token := newUser(t, 5000)
	channel := nextID()
	id := reqID(t, "bk-post")
	ctx := ledger.WithRequestID(testCtx(t), id)
	h, err := b.TryConsume(ctx, &ledger.ConsumeLog{UserId: int(user), ChannelId: int(channel), ModelName: "dall-e-3",
		TokenId: int(token), Quota: 1200})
	if err != nil || h.Status != ledger.StatusSettled || h.Amount != 0 || *h.Charged != 1200 || h.ExpiresAt != nil || h.Model != "dall-e-3" {
		t.Fatalf("consumption: %+v %v", h, err)
	}
	wantBalances(t, user, 3800, 0, 1200, 1)
}

func TestFundingFlows(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 50_000)
	channel := nextID()

	// Held, settled below the pre-consumed amount: new-api's delta is relative to the pre-consumed amount.
	f := relay.NewFunding(ctx, ledger.FundingRequest{RequestID: reqID(t, "fs-1"), UserID: user, TokenID: token,
		Model: "gpt-4o", PromptTokens: 100, MaxTokens: 400})
	if f.Source() != "ledger" {
		t.Fatal(f.Source())
	}
	if err := f.PreConsume(1000); err != nil {
		t.Fatal(err)
	}
	if !f.NeedsRefund() || f.GetPreConsumedQuota() != 1000 || f.Hold().Amount != 1000 {
		t.Fatalf("after pre-consume: %+v", f.Hold())
	}
	wantBalances(t, user, 49_000, 1000, 0, 0)
	f.SetChannel(channel)
	f.SetUsage(100, 80)
	if err := f.Settle(-300); err != nil {
		t.Fatal(err)
	}
	if h := f.Hold(); h.Status != ledger.StatusSettled || *h.Charged != 700 {
		t.Fatalf("settled: %+v", h)
	}
	if err := f.Refund(); err != nil || f.NeedsRefund() {
		t.Fatalf("refund after settle: %v", err)
	}
	wantBalances(t, user, 49_300, 0, 700, 1)

	// Settled above: usage past the estimate is charged.
	f = relay.NewFunding(ctx, ledger.FundingRequest{RequestID: reqID(t, "fs-2"), UserID: user, TokenID: token, Model: "gpt-4o", ChannelID: channel})
	if err := f.PreConsume(500); err != nil {
		t.Fatal(err)
	}
	if err := f.Settle(250); err != nil || *f.Hold().Charged != 750 {
		t.Fatalf("settle +250: %+v %v", f.Hold(), err)
	}
	wantBalances(t, user, 48_550, 0, 1450, 2)

	// Refunded after a failed upstream call.
	f = relay.NewFunding(ctx, ledger.FundingRequest{RequestID: reqID(t, "fs-3"), UserID: user, TokenID: token, Model: "gpt-4o", ChannelID: channel})
	if err := f.PreConsume(2000); err != nil {
		t.Fatal(err)
	}
	if err := f.Refund(); err != nil || f.Hold().Status != ledger.StatusRefunded || f.NeedsRefund() {
		t.Fatalf("refund: %+v %v", f.Hold(), err)
	}
	wantBalances(t, user, 48_550, 0, 1450, 2)

	// Without a hold, Settle posts a consumption of the delta.
	f = relay.NewFunding(ctx, ledger.FundingRequest{RequestID: reqID(t, "fs-4"), UserID: user, TokenID: token, Model: "gpt-4o", ChannelID: channel})
	if err := f.Refund(); err != nil {
		t.Fatalf("refund of nothing: %v", err)
	}
	if err := f.Settle(50); err != nil || *f.Hold().Charged != 50 || f.Hold().Amount != 0 {
		t.Fatalf("settle without a hold: %+v %v", f.Hold(), err)
	}
	wantBalances(t, user, 48_500, 0, 1500, 3)

	// Refused.
	f = relay.NewFunding(ctx, ledger.FundingRequest{RequestID: reqID(t, "fs-5"), UserID: user, TokenID: token, Model: "gpt-4o", ChannelID: channel})
	wantErr(t, f.PreConsume(1_000_000), ledger.ErrInsufficientUserQuota)
	if f.NeedsRefund() {
		t.Fatal("nothing was held")
	}
	// No channel to settle on.
	f = relay.NewFunding(ctx, ledger.FundingRequest{RequestID: reqID(t, "fs-6"), UserID: user, TokenID: token, Model: "gpt-4o"})
	if err := f.Settle(1); err == nil {
		t.Fatal("settle without a channel")
	}
}

func TestConcurrentHoldsNeverOversell(t *testing.T) {
	const amount, funded, callers = 1000, 10, 50
	ctx := testCtx(t)
	user, token := newUser(t, amount*funded)
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make([]error, callers)
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			_, errs[i] = relay.Hold(ctx, ledger.HoldRequest{RequestID: reqID(t, "race"), UserID: user, TokenID: token,
				Model: "gpt-4o", Amount: i64(amount)})
		}(i)
	}
	close(start)
	wg.Wait()
	ok, refused := 0, 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, ledger.ErrInsufficientUserQuota):
			refused++
		default:
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != funded || refused != callers-funded {
		t.Fatalf("%d holds succeeded and %d were refused, want %d and %d", ok, refused, funded, callers-funded)
	}
	wantBalances(t, user, 0, amount*funded, 0, 0)
}

// one-api's controller.Relay retries a failed upstream call on another channel under the same request id, after
// relayHelper refunded the first attempt's pre-consumed quota.
func TestBookkeeperRelayRetryUnderTheSameRequestID(t *testing.T) {
	b, errs := newBookkeeper(t)
	user, token := newUser(t, 50_000)
	channel := nextID()
	id := reqID(t, "bk-retry")
	ctx := ledger.WithRequestID(testCtx(t), id)

	pre, err := b.PreConsumeQuota(ctx, 1000, int(user), int(token))
	if err != nil || pre != 1000 {
		t.Fatalf("first attempt: %d %v", pre, err)
	}
	b.RefundQuota(ctx, pre, int(token)) // the first channel failed
	pre, err = b.PreConsumeQuota(ctx, 1000, int(user), int(token))
	if err != nil || pre != 1000 {
		t.Fatalf("second attempt: %d %v", pre, err)
	}
	wantBalances(t, user, 49_000, 1000, 0, 0)
	b.Consume(ctx, &ledger.ConsumeLog{UserId: int(user), ChannelId: int(channel), TokenId: int(token), ModelName: "gpt-4o", Quota: 700, PreConsumedQuota: pre})
	if e := errs.list(); len(e) != 0 {
		t.Fatalf("errors: %v", e)
	}
	wantBalances(t, user, 49_300, 0, 700, 1)
	if h := mustHold(t)(relay.GetHold(ctx, id)); h.Status != ledger.StatusRefunded {
		t.Fatalf("first attempt: %+v", h)
	}
	if h := mustHold(t)(relay.GetHold(ctx, id+":2")); h.Status != ledger.StatusSettled || *h.Charged != 700 {
		t.Fatalf("second attempt: %+v", h)
	}

	// A trusted user's failed attempt is not refunded by one-api (it pre-consumed 0): the retry reuses the open hold.
	rich, richToken := newUser(t, 1_000_000_000)
	id2 := reqID(t, "bk-retry-trusted")
	ctx2 := ledger.WithRequestID(testCtx(t), id2)
	for i := 0; i < 2; i++ {
		if pre, err := b.PreConsumeQuota(ctx2, 1000, int(rich), int(richToken)); err != nil || pre != 0 {
			t.Fatalf("trusted attempt %d: %d %v", i, pre, err)
		}
	}
	if _, err := b.TryConsume(ctx2, &ledger.ConsumeLog{UserId: int(rich), ChannelId: int(channel), TokenId: int(richToken), Quota: 50}); err != nil {
		t.Fatal(err)
	}
	wantBalances(t, rich, 1_000_000_000-50, 0, 50, 1)
}

func TestFundingRetryUnderTheSameRequestID(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 50_000)
	channel := nextID()
	id := reqID(t, "fs-retry")
	r := ledger.FundingRequest{RequestID: id, UserID: user, TokenID: token, Model: "gpt-4o", ChannelID: channel}
	first := relay.NewFunding(ctx, r)
	if err := first.PreConsume(1000); err != nil {
		t.Fatal(err)
	}
	if err := first.Refund(); err != nil {
		t.Fatal(err)
	}
	second := relay.NewFunding(ctx, r)
	if err := second.PreConsume(1000); err != nil {
		t.Fatal(err)
	}
	if got := second.Hold().RequestID; got != id+":2" {
		t.Fatalf("the retry's ledger id is %q", got)
	}
	if err := second.Settle(-100); err != nil {
		t.Fatal(err)
	}
	wantBalances(t, user, 49_100, 0, 900, 1)
}
