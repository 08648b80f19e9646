package ledger_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

// droppingProxy forwards every request to the service. For the first request whose path ends with one of the
// suffixes given, it forwards the request, reads the service's whole answer (so the call was applied), and then
// closes the connection without answering: the client sees a connection error after the ledger charged.
type droppingProxy struct {
	*httptest.Server
	mu      sync.Mutex
	dropped map[string]bool
	bodies  map[string][][]byte // path -> bodies received, in order
}

func newDroppingProxy(t *testing.T, suffixes ...string) *droppingProxy {
	p := &droppingProxy{dropped: map[string]bool{}, bodies: map[string][][]byte{}}
	upstream := &http.Client{}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		req, err := http.NewRequestWithContext(r.Context(), r.Method, baseURL+r.URL.RequestURI(), bytes.NewReader(body))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		req.Header = r.Header.Clone()
		resp, err := upstream.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()

		p.mu.Lock()
		p.bodies[r.URL.Path] = append(p.bodies[r.URL.Path], body)
		drop := false
		for _, s := range suffixes {
			if strings.HasSuffix(r.URL.Path, s) && !p.dropped[s] {
				p.dropped[s], drop = true, true
			}
		}
		p.mu.Unlock()
		if drop {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.Close()
			}
			return
		}
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(answer)
	}))
	t.Cleanup(p.Close)
	return p
}

func (p *droppingProxy) received(path string) [][]byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bodies[path]
}

func wantResentSame(t *testing.T, bodies [][]byte) {
	t.Helper()
	if len(bodies) != 2 {
		t.Fatalf("the proxy received %d requests, want 2 (the dropped one and the retry)", len(bodies))
	}
	if !bytes.Equal(bodies[0], bodies[1]) {
		t.Fatalf("the retry sent another body:\n%s\n%s", bodies[0], bodies[1])
	}
}

func TestRetryAfterDroppedAnswerChargesOnce(t *testing.T) {
	ctx := testCtx(t)
	user, token := newUser(t, 50_000)
	channel := nextID()
	proxy := newDroppingProxy(t, "/v1/holds", "/settle", "/v1/consumptions")
	c := ledger.New(proxy.URL, relayKey, ledger.WithBackoff(time.Millisecond, 10*time.Millisecond))

	id := reqID(t, "dropped")
	h, err := c.Hold(ctx, ledger.HoldRequest{RequestID: id, UserID: user, TokenID: token, Model: "gpt-4o", Amount: i64(1000)})
	if err != nil {
		t.Fatal(err)
	}
	if !h.Replayed || h.Amount != 1000 || h.Status != ledger.StatusOpen {
		t.Fatalf("hold after the dropped answer: %+v (want the replay)", h)
	}
	wantResentSame(t, proxy.received("/v1/holds"))
	wantBalances(t, user, 49_000, 1000, 0, 0)

	h, err = c.Settle(ctx, id, ledger.SettleRequest{ChannelID: channel, PromptTokens: 3, CompletionTokens: 4, Quota: i64(600)})
	if err != nil {
		t.Fatal(err)
	}
	if !h.Replayed || h.Charged == nil || *h.Charged != 600 {
		t.Fatalf("settle after the dropped answer: %+v", h)
	}
	wantResentSame(t, proxy.received("/v1/holds/"+id+"/settle"))
	wantBalances(t, user, 49_400, 0, 600, 1)
	full := mustHold(t)(relay.GetHold(ctx, id))
	if k := countKinds(full); k["hold"] != 1 || k["settle"] != 1 || len(full.Entries) != 2 {
		t.Fatalf("entries: %v", k)
	}

	h, err = c.Consume(ctx, ledger.ConsumptionRequest{RequestID: reqID(t, "dropped-consume"), UserID: user, TokenID: token, ChannelID: channel, Model: "gpt-4o", Quota: i64(400)})
	if err != nil || !h.Replayed {
		t.Fatalf("consumption after the dropped answer: %+v %v", h, err)
	}
	wantResentSame(t, proxy.received("/v1/consumptions"))
	wantBalances(t, user, 49_000, 0, 1000, 2)
	ch, err := relay.GetChannel(ctx, channel)
	if err != nil || num(t, ch.Used) != 1000 || num(t, ch.RequestCount) != 2 {
		t.Fatalf("channel: %+v %v", ch, err)
	}
}

// fakeServer answers with the given responses in turn (the last one repeats) and records what it received.
type fakeServer struct {
	*httptest.Server
	mu     sync.Mutex
	bodies [][]byte
	times  []time.Time
}

type fakeAnswer struct {
	status     int
	retryAfter string
	json       bool
	body       string
}

func newFake(t *testing.T, answers ...fakeAnswer) *fakeServer {
	f := &fakeServer{}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		n := len(f.bodies)
		f.bodies = append(f.bodies, body)
		f.times = append(f.times, time.Now())
		f.mu.Unlock()
		a := answers[len(answers)-1]
		if n < len(answers) {
			a = answers[n]
		}
		if a.retryAfter != "" {
			w.Header().Set("Retry-After", a.retryAfter)
		}
		if a.json {
			ct := "application/json"
			if a.status >= 400 {
				ct = "application/problem+json"
			}
			w.Header().Set("Content-Type", ct)
		} else {
			w.Header().Set("Content-Type", "text/plain")
		}
		w.WriteHeader(a.status)
		_, _ = io.WriteString(w, a.body)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeServer) attempts() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.bodies)
}

const holdJSON = `{"request_id":"r","user_id":1,"token_id":1,"group":"default","model":"m","status":"open","amount":5,` +
	`"trusted":false,"charged":null,"channel_id":null,"late":false,"created_at":"2026-12-02T17:56:15.694636Z",` +
	`"expires_at":"2026-12-02T18:06:15.694636Z"}`

func problemJSON(code string, status int) string {
	return `{"type":"urn:ledger:problem:` + code + `","title":"t","status":` + strconv.Itoa(status) + `,"detail":"d","code":"` + code + `"}`
}

func TestRetryAfterIsHonoured(t *testing.T) {
	for _, tc := range []struct {
		name  string
		first fakeAnswer
	}{
		{"503 unavailable", fakeAnswer{503, "1", true, problemJSON("unavailable", 503)}},
		{"429 rate_limited", fakeAnswer{429, "1", true, problemJSON("rate_limited", 429)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.first, fakeAnswer{201, "", true, holdJSON})
			c := ledger.New(f.URL, "k", ledger.WithBackoff(time.Millisecond, 2*time.Millisecond))
			h, err := c.Hold(testCtx(t), ledger.HoldRequest{RequestID: "r", UserID: 1, TokenID: 1, Model: "m", Amount: i64(5)})
			if err != nil || h.Amount != 5 {
				t.Fatalf("%+v %v", h, err)
			}
			if f.attempts() != 2 {
				t.Fatalf("%d attempts", f.attempts())
			}
			if gap := f.times[1].Sub(f.times[0]); gap < time.Second {
				t.Fatalf("retried after %s, before Retry-After: 1", gap)
			}
			if !bytes.Equal(f.bodies[0], f.bodies[1]) {
				t.Fatal("the retry sent another body")
			}
		})
	}
}

func TestNoRetryOnOther4xx(t *testing.T) {
	for _, code := range []struct {
		status int
		code   string
		want   error
	}{
		{409, "idempotency_conflict", ledger.ErrIdempotencyConflict},
		{400, "validation_error", ledger.ErrValidation},
		{403, "insufficient_user_quota", ledger.ErrInsufficientUserQuota},
		{404, "hold_not_found", ledger.ErrHoldNotFound},
	} {
		f := newFake(t, fakeAnswer{code.status, "1", true, problemJSON(code.code, code.status)})
		c := ledger.New(f.URL, "k", ledger.WithBackoff(time.Millisecond, 2*time.Millisecond))
		_, err := c.Settle(testCtx(t), "r", ledger.SettleRequest{ChannelID: 1})
		wantErr(t, err, code.want)
		if f.attempts() != 1 {
			t.Fatalf("%s: %d attempts", code.code, f.attempts())
		}
	}
}

func TestRetriesAreBounded(t *testing.T) {
	// uvicorn's own plain-text 503 is retried as well, and ends as ErrUnavailable.
	f := newFake(t, fakeAnswer{503, "", false, "Service Unavailable"})
	c := ledger.New(f.URL, "k", ledger.WithMaxAttempts(3), ledger.WithBackoff(time.Millisecond, 2*time.Millisecond))
	_, err := c.GetUser(testCtx(t), 1)
	wantErr(t, err, ledger.ErrUnavailable)
	if f.attempts() != 3 {
		t.Fatalf("%d attempts, want 3", f.attempts())
	}
	if !ledger.IsRetryable(err) {
		t.Fatal("a 503 is retryable")
	}

	// Connection refused: bounded too.
	dead := httptest.NewServer(http.NotFoundHandler())
	url := dead.URL
	dead.Close()
	c = ledger.New(url, "k", ledger.WithMaxAttempts(3), ledger.WithBackoff(time.Millisecond, 2*time.Millisecond))
	if _, err := c.GetUser(testCtx(t), 1); err == nil {
		t.Fatal("no error from a closed port")
	}
}

func TestRetryStopsWhenTheContextEnds(t *testing.T) {
	f := newFake(t, fakeAnswer{429, "30", true, problemJSON("rate_limited", 429)})
	c := ledger.New(f.URL, "k")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Hold(ctx, ledger.HoldRequest{RequestID: "r", UserID: 1, TokenID: 1, Model: "m"})
	p := wantErr(t, err, ledger.ErrRateLimited)
	if p.RetryAfter != 30*time.Second {
		t.Fatalf("RetryAfter %s", p.RetryAfter)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("returned after %s", el)
	}
	if f.attempts() != 1 {
		t.Fatalf("%d attempts", f.attempts())
	}

	// Cancelled while waiting out a backoff.
	f = newFake(t, fakeAnswer{503, "", false, "down"})
	c = ledger.New(f.URL, "k", ledger.WithMaxAttempts(1000), ledger.WithBackoff(50*time.Millisecond, 50*time.Millisecond))
	ctx2, cancel2 := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := c.GetUser(ctx2, 1); done <- err }()
	cancel2()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("no error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the call did not stop with its context")
	}
	if !errors.Is(ctx2.Err(), context.Canceled) {
		t.Fatal("context")
	}
}
