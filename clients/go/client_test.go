package ledger_test

import (
	"errors"
	"testing"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

func TestHoldSettleLifecycle(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 50_000)
	channel := nextID()
	id := reqID(t, "lifecycle")

	// gpt-4o: estimate floor((500 + 10 + 90) x 2.5) = 1500, not trusted (50,000 <= 100 x 1500).
	req := ledger.HoldRequest{RequestID: id, UserID: user, TokenID: token, Model: "gpt-4o", PromptTokens: 10, MaxTokens: 90}
	h := mustHold(t)(relay.Hold(ctx, req))
	if h.Status != ledger.StatusOpen || h.Amount != 1500 || h.Trusted || h.Replayed || h.Group != "default" ||
		h.Charged != nil || h.ExpiresAt == nil || h.CreatedAt.IsZero() {
		t.Fatalf("hold: %+v", h)
	}
	wantBalances(t, user, 48_500, 1500, 0, 0)

	again := mustHold(t)(relay.Hold(ctx, req))
	if !again.Replayed || again.Amount != 1500 {
		t.Fatalf("repeated hold: %+v", again)
	}
	wantBalances(t, user, 48_500, 1500, 0, 0)

	// charge ceil((10 + 20 x 4) x 2.5) = 225
	s := ledger.SettleRequest{ChannelID: channel, PromptTokens: 10, CompletionTokens: 20}
	h = mustHold(t)(relay.Settle(ctx, id, s))
	if h.Status != ledger.StatusSettled || h.Charged == nil || *h.Charged != 225 || h.ChannelID == nil ||
		*h.ChannelID != channel || h.Replayed || h.Late {
		t.Fatalf("settle: %+v", h)
	}
	h = mustHold(t)(relay.Settle(ctx, id, s))
	if !h.Replayed || *h.Charged != 225 {
		t.Fatalf("repeated settle: %+v", h)
	}
	wantBalances(t, user, 50_000-225, 0, 225, 1)

	got := mustHold(t)(relay.GetHold(ctx, id))
	if k := countKinds(got); k["hold"] != 1 || k["settle"] != 1 || len(got.Entries) != 2 {
		t.Fatalf("entries: %+v", got.Entries)
	}
	for _, e := range got.Entries {
		if e.RequestID == nil || *e.RequestID != id || e.Hash == "" || len(e.Postings) == 0 {
			t.Fatalf("entry: %+v", e)
		}
	}

	ch, err := relay.GetChannel(ctx, channel)
	if err != nil || num(t, ch.Used) != 225 || num(t, ch.RequestCount) != 1 || ch.ChannelID != channel {
		t.Fatalf("channel: %+v %v", ch, err)
	}
	tok, err := relay.GetToken(ctx, token)
	if err != nil || !tok.Unlimited || tok.Remaining != nil || num(t, tok.Used) != 225 || num(t, tok.Held) != 0 {
		t.Fatalf("token: %+v %v", tok, err)
	}

	// Different body on a settled request; refund of a settled request.
	_, err = relay.Settle(ctx, id, ledger.SettleRequest{ChannelID: channel, PromptTokens: 11, CompletionTokens: 20})
	wantErr(t, err, ledger.ErrHoldAlreadySettled)
	_, err = relay.Refund(ctx, id, ledger.RefundRequest{})
	p := wantErr(t, err, ledger.ErrHoldAlreadySettled)
	if p.Status != 409 || p.Code != "hold_already_settled" || p.Type == "" || p.Title == "" {
		t.Fatalf("problem: %+v", p)
	}
}

func TestRefund(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 10_000)
	id := reqID(t, "refund")
	h := mustHold(t)(relay.Hold(ctx, ledger.HoldRequest{RequestID: id, UserID: user, TokenID: token, Model: "gpt-4o", PromptTokens: 1, Amount: i64(2000)}))
	if h.Amount != 2000 {
		t.Fatalf("hold: %+v", h)
	}
	wantBalances(t, user, 8000, 2000, 0, 0)
	reason := "upstream 502"
	h = mustHold(t)(relay.Refund(ctx, id, ledger.RefundRequest{Reason: &reason}))
	if h.Status != ledger.StatusRefunded || h.Replayed {
		t.Fatalf("refund: %+v", h)
	}
	h = mustHold(t)(relay.Refund(ctx, id, ledger.RefundRequest{Reason: &reason}))
	if !h.Replayed {
		t.Fatalf("repeated refund: %+v", h)
	}
	wantBalances(t, user, 10_000, 0, 0, 0)
	_, err := relay.Settle(ctx, id, ledger.SettleRequest{ChannelID: nextID(), PromptTokens: 1, CompletionTokens: 1})
	wantErr(t, err, ledger.ErrHoldAlreadyRefunded)
	_, err = relay.Refund(ctx, id, ledger.RefundRequest{})
	wantErr(t, err, ledger.ErrIdempotencyConflict)
	_, err = relay.Refund(ctx, reqID(t, "unknown"), ledger.RefundRequest{})
	wantErr(t, err, ledger.ErrHoldNotFound)
	_, err = relay.GetHold(ctx, reqID(t, "unknown"))
	wantErr(t, err, ledger.ErrHoldNotFound)
}

func TestConsumption(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 10_000)
	channel := nextID()
	req := ledger.ConsumptionRequest{RequestID: reqID(t, "consume"), UserID: user, TokenID: token, ChannelID: channel,
		Model: "dall-e-3", PromptTokens: 0, CompletionTokens: 0, Quota: i64(4000)}
	h := mustHold(t)(relay.Consume(ctx, req))
	if h.Status != ledger.StatusSettled || h.Amount != 0 || *h.Charged != 4000 || h.ExpiresAt != nil || h.Replayed {
		t.Fatalf("consumption: %+v", h)
	}
	h = mustHold(t)(relay.Consume(ctx, req))
	if !h.Replayed {
		t.Fatalf("repeated consumption: %+v", h)
	}
	wantBalances(t, user, 6000, 0, 4000, 1)

	req.Quota = i64(4001)
	_, err := relay.Consume(ctx, req)
	wantErr(t, err, ledger.ErrIdempotencyConflict)
	// A consumption's request id cannot be held.
	_, err = relay.Hold(ctx, ledger.HoldRequest{RequestID: req.RequestID, UserID: user, TokenID: token, Model: "x"})
	wantErr(t, err, ledger.ErrIdempotencyConflict)
	wantBalances(t, user, 6000, 0, 4000, 1)
}

func TestBatch(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 10_000)
	channel := nextID()
	a, b, c := reqID(t, "batch-a"), reqID(t, "batch-b"), reqID(t, "batch-c")
	ops := []ledger.BatchOperation{
		ledger.HoldOp(ledger.HoldRequest{RequestID: a, UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(1000)}),
		ledger.SettleOp(a, ledger.SettleRequest{ChannelID: channel, PromptTokens: 5, CompletionTokens: 5, Quota: i64(600)}),
		ledger.HoldOp(ledger.HoldRequest{RequestID: b, UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(1000)}),
		ledger.RefundOp(b, ledger.RefundRequest{}),
		ledger.ConsumeOp(ledger.ConsumptionRequest{RequestID: c, UserID: user, TokenID: token, ChannelID: channel, Model: "gpt-4o", Quota: i64(100)}),
		ledger.SettleOp(reqID(t, "batch-missing"), ledger.SettleRequest{ChannelID: channel}),
		ledger.HoldOp(ledger.HoldRequest{RequestID: reqID(t, "batch-big"), UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(1_000_000)}),
	}
	res, err := relay.Batch(ctx, ops, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Results) != len(ops) {
		t.Fatalf("%d results", len(res.Results))
	}
	wantStatus := []int{201, 200, 201, 200, 201, 404, 403}
	for i, r := range res.Results {
		if r.Status != wantStatus[i] {
			t.Fatalf("result %d: status %d, want %d: %s", i, r.Status, wantStatus[i], r.Body)
		}
	}
	if h, err := res.Results[1].Hold(); err != nil || h.Status != ledger.StatusSettled || *h.Charged != 600 {
		t.Fatalf("settle result: %+v %v", h, err)
	}
	if _, err := res.Results[5].Hold(); !errors.Is(err, ledger.ErrHoldNotFound) {
		t.Fatalf("missing settle: %v", err)
	}
	if _, err := res.Results[6].Hold(); !errors.Is(err, ledger.ErrInsufficientUserQuota) {
		t.Fatalf("big hold: %v", err)
	}
	wantBalances(t, user, 10_000-700, 0, 700, 2)

	// Atomic: one refusal and nothing is applied.
	d := reqID(t, "batch-d")
	res, err = relay.Batch(ctx, []ledger.BatchOperation{
		ledger.HoldOp(ledger.HoldRequest{RequestID: d, UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(10)}),
		ledger.HoldOp(ledger.HoldRequest{RequestID: reqID(t, "batch-e"), UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(1_000_000)}),
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := res.Results[0].Hold(); !errors.Is(err, ledger.ErrBatchAborted) {
		t.Fatalf("atomic result 0: %v", err)
	}
	if _, err := relay.GetHold(ctx, d); !errors.Is(err, ledger.ErrHoldNotFound) {
		t.Fatalf("aborted hold exists: %v", err)
	}
	// A malformed batch is refused whole.
	_, err = relay.Batch(ctx, nil, false)
	wantErr(t, err, ledger.ErrValidation)
}

func TestTopupsAndAdjustments(t *testing.T) {
	ctx := testCtx(t)
	user := nextID()
	ref := reqID(t, "topup")
	note := "invoice 17"
	r, err := admin.Topup(ctx, ledger.TopupRequest{UserID: user, Amount: 5000, Reference: ref, Note: &note})
	if err != nil || r.Replayed || r.Entry.Kind != "topup" || r.Entry.Reference == nil || *r.Entry.Reference != ref ||
		num(t, r.User.Available) != 5000 || len(r.Entry.Postings) != 2 {
		t.Fatalf("topup: %+v %v", r, err)
	}
	r, err = admin.Topup(ctx, ledger.TopupRequest{UserID: user, Amount: 5000, Reference: ref, Note: &note})
	if err != nil || !r.Replayed {
		t.Fatalf("repeated topup: %+v %v", r, err)
	}
	_, err = admin.Topup(ctx, ledger.TopupRequest{UserID: user, Amount: 5001, Reference: ref, Note: &note})
	wantErr(t, err, ledger.ErrIdempotencyConflict)
	_, err = admin.Topup(ctx, ledger.TopupRequest{UserID: user, Amount: 0, Reference: reqID(t, "zero")})
	p := wantErr(t, err, ledger.ErrValidation)
	if p.Status != 400 || p.Detail == "" {
		t.Fatalf("validation problem: %+v", p)
	}
	// A relay key may not fund users.
	_, err = relay.Topup(ctx, ledger.TopupRequest{UserID: user, Amount: 1, Reference: reqID(t, "relay")})
	wantErr(t, err, ledger.ErrForbidden)

	r, err = admin.Adjust(ctx, ledger.TopupRequest{UserID: user, Amount: -1500, Reference: reqID(t, "adjust")})
	if err != nil || r.Entry.Kind != "adjustment" || num(t, r.User.Available) != 3500 {
		t.Fatalf("adjustment: %+v %v", r, err)
	}
	_, err = admin.Adjust(ctx, ledger.TopupRequest{UserID: user, Amount: 0, Reference: reqID(t, "adjust0")})
	wantErr(t, err, ledger.ErrValidation)
	wantBalances(t, user, 3500, 0, 0, 0)
}

func TestTokens(t *testing.T) {
	ctx := testCtx(t)
	user, other, token := nextID(), nextID(), nextID()
	tk, err := relay.PutToken(ctx, token, ledger.TokenRequest{UserID: user, Remaining: i64(3000)})
	if err != nil || !tk.Created || tk.Unlimited || tk.Remaining == nil || num(t, *tk.Remaining) != 3000 || tk.UserID != user {
		t.Fatalf("token: %+v %v", tk, err)
	}
	tk, err = relay.PutToken(ctx, token, ledger.TokenRequest{UserID: user, Remaining: i64(2000)})
	if err != nil || tk.Created || num(t, *tk.Remaining) != 2000 {
		t.Fatalf("updated token: %+v %v", tk, err)
	}
	_, err = relay.PutToken(ctx, token, ledger.TokenRequest{UserID: other, Unlimited: true})
	wantErr(t, err, ledger.ErrTokenUserMismatch)
	_, err = relay.PutToken(ctx, token, ledger.TokenRequest{UserID: user})
	wantErr(t, err, ledger.ErrValidation)
	_, err = relay.GetToken(ctx, nextID())
	wantErr(t, err, ledger.ErrTokenNotFound)

	// The token's allowance bounds holds: 2000 remaining.
	if _, err := admin.Topup(ctx, ledger.TopupRequest{UserID: user, Amount: 100_000, Reference: reqID(t, "fund")}); err != nil {
		t.Fatal(err)
	}
	_, err = relay.Hold(ctx, ledger.HoldRequest{RequestID: reqID(t, "tok"), UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(2500)})
	wantErr(t, err, ledger.ErrInsufficientTokenQuota)
	h := mustHold(t)(relay.Hold(ctx, ledger.HoldRequest{RequestID: reqID(t, "tok2"), UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(1500)}))
	if h.Amount != 1500 {
		t.Fatalf("hold: %+v", h)
	}
	tk, err = relay.GetToken(ctx, token)
	if err != nil || num(t, *tk.Remaining) != 500 || num(t, tk.Held) != 1500 {
		t.Fatalf("token after hold: %+v %v", tk, err)
	}
}

func TestUnknownUserAndChannelReadAsZeros(t *testing.T) {
	ctx := testCtx(t)
	u, err := relay.GetUser(ctx, nextID())
	if err != nil || num(t, u.Available) != 0 || num(t, u.RequestCount) != 0 {
		t.Fatalf("user: %+v %v", u, err)
	}
	c, err := relay.GetChannel(ctx, nextID())
	if err != nil || num(t, c.Used) != 0 {
		t.Fatalf("channel: %+v %v", c, err)
	}
}

func TestPricing(t *testing.T) {
	p, err := relay.Pricing(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	m, ok := p.Models["gpt-4o-mini"]
	if !ok || m.ModelRatio != "0.075" || m.CompletionRatio != "4" || m.ModelPrice != nil {
		t.Fatalf("gpt-4o-mini: %+v", m)
	}
	if p.Groups["default"].GroupRatio != "1" || p.Defaults.ModelRatio != "30" || p.Defaults.CompletionRatio != "1" {
		t.Fatalf("pricing: %+v", p)
	}
	if r, ok := m.ModelRatio.Rat(); !ok || r.String() != "3/40" {
		t.Fatalf("exact ratio: %v", r)
	}
}

func TestHoldRefusals(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 1000)
	otherUser, _ := newUser(t, 0)
	hold := func(u, tok, amount int64) error {
		_, err := relay.Hold(ctx, ledger.HoldRequest{RequestID: reqID(t, "refusal"), UserID: u, TokenID: tok, Model: "gpt-4o", Amount: &amount})
		return err
	}
	p := wantErr(t, hold(user, token, 1001), ledger.ErrInsufficientUserQuota)
	if p.Status != 403 {
		t.Fatalf("status %d", p.Status)
	}
	wantErr(t, hold(user, nextID(), 10), ledger.ErrTokenNotFound)
	wantErr(t, hold(otherUser, token, 10), ledger.ErrTokenUserMismatch)
	wantErr(t, hold(0, token, 10), ledger.ErrValidation)
	_, err := relay.Hold(ctx, ledger.HoldRequest{RequestID: "bad id with spaces", UserID: user, TokenID: token, Model: "gpt-4o"})
	wantErr(t, err, ledger.ErrValidation)

	id := reqID(t, "conflict")
	mustHold(t)(relay.Hold(ctx, ledger.HoldRequest{RequestID: id, UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(10)}))
	_, err = relay.Hold(ctx, ledger.HoldRequest{RequestID: id, UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(11)})
	wantErr(t, err, ledger.ErrIdempotencyConflict)
	wantBalances(t, user, 990, 10, 0, 0)

	_, err = ledger.New(baseURL, "lsk_not-a-key").GetUser(ctx, user)
	wantErr(t, err, ledger.ErrUnauthorized)
	_, err = relay.CreateAPIKey(ctx, "nope", "relay")
	wantErr(t, err, ledger.ErrForbidden)
}
