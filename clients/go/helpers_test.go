package ledger_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func i64(n int64) *int64 { return &n }

// newUser funds a fresh user with amount (nothing if 0) and registers a fresh unlimited token of it.
func newUser(t testing.TB, amount int64) (userID, tokenID int64) {
	t.Helper()
	ctx := testCtx(t)
	userID, tokenID = nextID(), nextID()
	if amount > 0 {
		if _, err := admin.Topup(ctx, ledger.TopupRequest{UserID: userID, Amount: amount, Reference: reqID(t, "fund")}); err != nil {
			t.Fatalf("topup: %v", err)
		}
	}
	if _, err := relay.PutToken(ctx, tokenID, ledger.TokenRequest{UserID: userID, Unlimited: true}); err != nil {
		t.Fatalf("put token: %v", err)
	}
	return userID, tokenID
}

func num(t testing.TB, n json.Number) int64 {
	t.Helper()
	v, err := n.Int64()
	if err != nil {
		t.Fatalf("not an int64: %q", n)
	}
	return v
}

// balances returns the user's available, held, used and request_count.
func balances(t testing.TB, userID int64) [4]int64 {
	t.Helper()
	u, err := relay.GetUser(testCtx(t), userID)
	if err != nil {
		t.Fatalf("get user: %v", err)
	}
	return [4]int64{num(t, u.Available), num(t, u.Held), num(t, u.Used), num(t, u.RequestCount)}
}

func wantBalances(t testing.TB, userID int64, available, held, used, count int64) {
	t.Helper()
	got := balances(t, userID)
	want := [4]int64{available, held, used, count}
	if got != want {
		t.Fatalf("user %d: [available held used request_count] = %v, want %v", userID, got, want)
	}
}

func wantErr(t testing.TB, err, target error) *ledger.Problem {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v, want %v", err, target)
	}
	var p *ledger.Problem
	if !errors.As(err, &p) {
		t.Fatalf("error %T is not a *ledger.Problem", err)
	}
	return p
}

func countKinds(h *ledger.Hold) map[string]int {
	m := map[string]int{}
	for _, e := range h.Entries {
		m[e.Kind]++
	}
	return m
}

// mustHold(t)(relay.Hold(...)) fails the test on an error.
func mustHold(t testing.TB) func(*ledger.Hold, error) *ledger.Hold {
	return func(h *ledger.Hold, err error) *ledger.Hold {
		t.Helper()
		if err != nil {
			t.Fatalf("%v", err)
		}
		if h == nil {
			t.Fatal("nil hold")
		}
		return h
	}
}

// setGroupRatio calls PUT /v1/pricing/groups/{group} with the admin key (not a relay call, so not in the client).
func setGroupRatio(ctx context.Context, group, ratio string) (int, error) {
	body := strings.NewReader(`{"group_ratio": "` + ratio + `"}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, baseURL+"/v1/pricing/groups/"+url.PathEscape(group), body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	if resp.StatusCode != 200 && resp.StatusCode != 201 {
		return resp.StatusCode, fmt.Errorf("PUT pricing group: %d", resp.StatusCode)
	}
	return resp.StatusCode, nil
}
