package ledger

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults of the client's options.
const (
	DefaultMaxAttempts = 4
	DefaultBaseBackoff = 100 * time.Millisecond
	DefaultMaxBackoff  = 5 * time.Second
	DefaultTimeout     = 30 * time.Second
	// DefaultMaxRetryAfter caps how long one Retry-After makes the client wait.
	DefaultMaxRetryAfter = 60 * time.Second
)

// Client calls the ledger service. It is safe for concurrent use.
type Client struct {
	baseURL       string
	apiKey        string
	http          *http.Client
	maxAttempts   int
	baseBackoff   time.Duration
	maxBackoff    time.Duration
	maxRetryAfter time.Duration
	timeout       time.Duration
	userAgent     string

	rndMu sync.Mutex
	rnd   *rand.Rand
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sets the *http.Client used for every call (default: a client with its own Transport).
func WithHTTPClient(h *http.Client) Option { return func(c *Client) { c.http = h } }

// WithMaxAttempts sets how many times a call is tried in all (default 4). 1 turns retries off.
func WithMaxAttempts(n int) Option {
	return func(c *Client) {
		if n < 1 {
			n = 1
		}
		c.maxAttempts = n
	}
}

// WithBackoff sets the exponential backoff between attempts: the n-th retry waits a random time in
// [0, min(max, base*2^(n-1))] ("full jitter"). Defaults: 100 ms, 5 s.
func WithBackoff(base, max time.Duration) Option {
	return func(c *Client) { c.baseBackoff, c.maxBackoff = base, max }
}

// WithMaxRetryAfter caps the wait a Retry-After header asks for (default 60 s).
func WithMaxRetryAfter(d time.Duration) Option { return func(c *Client) { c.maxRetryAfter = d } }

// WithTimeout bounds each attempt (default 30 s). The caller's context bounds the whole call, retries included.
func WithTimeout(d time.Duration) Option { return func(c *Client) { c.timeout = d } }

// WithUserAgent sets the User-Agent header.
func WithUserAgent(ua string) Option { return func(c *Client) { c.userAgent = ua } }

// New returns a client for the service at baseURL (for example "http://127.0.0.1:8080"), calling it with apiKey
// (a relay key for the lifecycle calls, an admin key for top-ups and adjustments).
func New(baseURL, apiKey string, opts ...Option) *Client {
	c := &Client{
		baseURL:       strings.TrimRight(baseURL, "/"),
		apiKey:        apiKey,
		maxAttempts:   DefaultMaxAttempts,
		baseBackoff:   DefaultBaseBackoff,
		maxBackoff:    DefaultMaxBackoff,
		maxRetryAfter: DefaultMaxRetryAfter,
		timeout:       DefaultTimeout,
		userAgent:     "ledger-go-client/1",
		rnd:           rand.New(rand.NewSource(time.Now().UnixNano())),
	}
	for _, o := range opts {
		o(c)
	}
	if c.http == nil {
		c.http = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	return c
}

// response is what one successful call gives back.
type response struct {
	status   int
	replayed bool
}

// Whether a request may be sent again after a connection error, when it may have reached the service.
type retryPolicy int

const (
	// idempotent: every /v1 write keyed by request_id or reference, and every GET.
	idempotent retryPolicy = iota
	// notIdempotent: retried only on an answer saying nothing was done (429, 503).
	notIdempotent
)

// do sends one call, with retries, and decodes a 2xx JSON answer into out (when out is not nil).
func (c *Client) do(ctx context.Context, method, path string, in, out interface{}, policy retryPolicy) (response, error) {
	var body []byte
	if in != nil {
		var err error
		// The body is encoded once: every attempt sends exactly these bytes, with the same idempotency key.
		if body, err = json.Marshal(in); err != nil {
			return response{}, fmt.Errorf("ledger: encode %s %s: %w", method, path, err)
		}
	}
	var lastErr error
	for attempt := 1; ; attempt++ {
		resp, retryAfter, retry, err := c.attempt(ctx, method, path, body, out, policy)
		if err == nil {
			return resp, nil
		}
		lastErr = err
		if !retry || attempt >= c.maxAttempts || ctx.Err() != nil {
			return resp, lastErr
		}
		wait := c.backoff(attempt)
		if retryAfter > 0 {
			if retryAfter > c.maxRetryAfter {
				retryAfter = c.maxRetryAfter
			}
			if retryAfter > wait {
				wait = retryAfter
			}
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			// The context ends before the service would take the call again.
			return resp, lastErr
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return resp, lastErr
		case <-t.C:
		}
	}
}

// backoff is the full-jitter wait before retry number n (1-based).
func (c *Client) backoff(n int) time.Duration {
	d := c.baseBackoff
	for i := 1; i < n && d < c.maxBackoff; i++ {
		d *= 2
	}
	if d > c.maxBackoff {
		d = c.maxBackoff
	}
	if d <= 0 {
		return 0
	}
	c.rndMu.Lock()
	j := time.Duration(c.rnd.Int63n(int64(d) + 1))
	c.rndMu.Unlock()
	return j
}

// attempt sends the call once. retry says whether trying again is safe and useful.
func (c *Client) attempt(ctx context.Context, method, path string, body []byte, out interface{}, policy retryPolicy) (resp response, retryAfter time.Duration, retry bool, err error) {
	actx := ctx
	if c.timeout > 0 {
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(actx, method, c.baseURL+path, rd)
	if err != nil {
		return resp, 0, false, fmt.Errorf("ledger: %s %s: %w", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.userAgent)
	if c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	hr, err := c.http.Do(req)
	if err != nil {
		// A connection error: the service may or may not have received the call. Only a call keyed by an
		// idempotency key is sent again; the same body makes the service answer the repeat as a replay.
		if ctx.Err() != nil {
			return resp, 0, false, fmt.Errorf("ledger: %s %s: %w", method, path, err)
		}
		return resp, 0, policy == idempotent, fmt.Errorf("ledger: %s %s: %w", method, path, err)
	}
	defer hr.Body.Close()
	raw, rerr := io.ReadAll(io.LimitReader(hr.Body, 64<<20))
	resp.status = hr.StatusCode
	resp.replayed = strings.EqualFold(hr.Header.Get("Idempotent-Replayed"), "true")
	if rerr != nil {
		// The answer was cut: as a connection error.
		if ctx.Err() != nil {
			return resp, 0, false, fmt.Errorf("ledger: %s %s: reading the answer: %w", method, path, rerr)
		}
		return resp, 0, policy == idempotent, fmt.Errorf("ledger: %s %s: reading the answer: %w", method, path, rerr)
	}
	if hr.StatusCode >= 200 && hr.StatusCode <= 299 {
		if out != nil && hr.StatusCode != http.StatusNoContent {
			if err := json.Unmarshal(raw, out); err != nil {
				return resp, 0, false, fmt.Errorf("ledger: %s %s: decode the answer: %w", method, path, err)
			}
		}
		return resp, 0, false, nil
	}
	p := decodeProblem(hr, raw)
	// 429 and 503 mean that nothing was done: retrying is safe for every call.
	retry = hr.StatusCode == http.StatusTooManyRequests || hr.StatusCode == http.StatusServiceUnavailable
	return resp, p.RetryAfter, retry, p
}

func decodeProblem(hr *http.Response, raw []byte) *Problem {
	p := &Problem{}
	ct := hr.Header.Get("Content-Type")
	if strings.Contains(ct, "json") {
		_ = json.Unmarshal(raw, p)
	}
	if p.Status == 0 {
		p.Status = hr.StatusCode
	}
	if p.Code == "" {
		switch hr.StatusCode {
		case http.StatusServiceUnavailable:
			p.Code = "unavailable"
		case http.StatusTooManyRequests:
			p.Code = "rate_limited"
		case http.StatusUnauthorized:
			p.Code = "unauthorized"
		case http.StatusForbidden:
			p.Code = "forbidden"
		}
		if p.Detail == "" {
			p.Detail = strings.TrimSpace(string(truncate(raw, 200)))
		}
	}
	if s := hr.Header.Get("Retry-After"); s != "" {
		if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n >= 0 {
			p.RetryAfter = time.Duration(n) * time.Second
		} else if t, err := http.ParseTime(s); err == nil {
			if d := time.Until(t); d > 0 {
				p.RetryAfter = d
			}
		}
	}
	return p
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

func idPath(prefix string, id int64) string { return prefix + strconv.FormatInt(id, 10) }

func keyPath(prefix, key, suffix string) string { return prefix + url.PathEscape(key) + suffix }

// Hold reserves a request's estimate before the upstream call (POST /v1/holds). 201 creates it; a repeat with
// the same body answers the request as it is now, with Replayed set.
func (c *Client) Hold(ctx context.Context, r HoldRequest) (*Hold, error) {
	var h Hold
	resp, err := c.do(ctx, http.MethodPost, "/v1/holds", r, &h, idempotent)
	if err != nil {
		return nil, err
	}
	h.Replayed = resp.replayed
	return &h, nil
}

// Settle charges a held request (POST /v1/holds/{request_id}/settle).
func (c *Client) Settle(ctx context.Context, requestID string, r SettleRequest) (*Hold, error) {
	var h Hold
	resp, err := c.do(ctx, http.MethodPost, keyPath("/v1/holds/", requestID, "/settle"), r, &h, idempotent)
	if err != nil {
		return nil, err
	}
	h.Replayed = resp.replayed
	return &h, nil
}

// Refund returns a held request's estimate after a failed upstream call (POST /v1/holds/{request_id}/refund).
func (c *Client) Refund(ctx context.Context, requestID string, r RefundRequest) (*Hold, error) {
	var h Hold
	resp, err := c.do(ctx, http.MethodPost, keyPath("/v1/holds/", requestID, "/refund"), r, &h, idempotent)
	if err != nil {
		return nil, err
	}
	h.Replayed = resp.replayed
	return &h, nil
}

// GetHold reads a request with its entries (GET /v1/holds/{request_id}).
func (c *Client) GetHold(ctx context.Context, requestID string) (*Hold, error) {
	var h Hold
	if _, err := c.do(ctx, http.MethodGet, keyPath("/v1/holds/", requestID, ""), nil, &h, idempotent); err != nil {
		return nil, err
	}
	return &h, nil
}

// Consume records a charge with no hold (POST /v1/consumptions).
func (c *Client) Consume(ctx context.Context, r ConsumptionRequest) (*Hold, error) {
	var h Hold
	resp, err := c.do(ctx, http.MethodPost, "/v1/consumptions", r, &h, idempotent)
	if err != nil {
		return nil, err
	}
	h.Replayed = resp.replayed
	return &h, nil
}

// Batch sends up to 1000 lifecycle operations in one call (POST /v1/batch). Each result is what the single call
// would have answered; decode it with BatchResult.Hold. A refused operation is not an error of Batch.
func (c *Client) Batch(ctx context.Context, ops []BatchOperation, atomic bool) (*BatchResponse, error) {
	type batchBody struct {
		Operations []BatchOperation `json:"operations"`
		Atomic     bool             `json:"atomic,omitempty"`
	}
	var out BatchResponse
	if _, err := c.do(ctx, http.MethodPost, "/v1/batch", batchBody{ops, atomic}, &out, idempotent); err != nil {
		return nil, err
	}
	return &out, nil
}

// Topup credits a user's quota (POST /v1/topups, admin). Reference is the idempotency key.
func (c *Client) Topup(ctx context.Context, r TopupRequest) (*FundingResult, error) {
	var out FundingResult
	resp, err := c.do(ctx, http.MethodPost, "/v1/topups", r, &out, idempotent)
	if err != nil {
		return nil, err
	}
	out.Replayed = resp.replayed
	return &out, nil
}

// Adjust corrects a user's quota by a signed amount (POST /v1/adjustments, admin).
func (c *Client) Adjust(ctx context.Context, r TopupRequest) (*FundingResult, error) {
	var out FundingResult
	resp, err := c.do(ctx, http.MethodPost, "/v1/adjustments", r, &out, idempotent)
	if err != nil {
		return nil, err
	}
	out.Replayed = resp.replayed
	return &out, nil
}

// PutToken registers a token or sets its allowance (PUT /v1/tokens/{id}). Created tells 201 from 200.
func (c *Client) PutToken(ctx context.Context, tokenID int64, r TokenRequest) (*Token, error) {
	var t Token
	resp, err := c.do(ctx, http.MethodPut, idPath("/v1/tokens/", tokenID), r, &t, idempotent)
	if err != nil {
		return nil, err
	}
	t.Created = resp.status == http.StatusCreated
	return &t, nil
}

// GetToken reads a token (GET /v1/tokens/{id}); an unknown token is ErrTokenNotFound.
func (c *Client) GetToken(ctx context.Context, tokenID int64) (*Token, error) {
	var t Token
	if _, err := c.do(ctx, http.MethodGet, idPath("/v1/tokens/", tokenID), nil, &t, idempotent); err != nil {
		return nil, err
	}
	return &t, nil
}

// GetUser reads a user's balances (GET /v1/users/{id}); an unknown user reads as zeros.
func (c *Client) GetUser(ctx context.Context, userID int64) (*User, error) {
	var u User
	if _, err := c.do(ctx, http.MethodGet, idPath("/v1/users/", userID), nil, &u, idempotent); err != nil {
		return nil, err
	}
	return &u, nil
}

// GetChannel reads a channel's usage (GET /v1/channels/{id}); an unknown channel reads as zeros.
func (c *Client) GetChannel(ctx context.Context, channelID int64) (*Channel, error) {
	var ch Channel
	if _, err := c.do(ctx, http.MethodGet, idPath("/v1/channels/", channelID), nil, &ch, idempotent); err != nil {
		return nil, err
	}
	return &ch, nil
}

// Pricing reads the ratios (GET /v1/pricing).
func (c *Client) Pricing(ctx context.Context) (*Pricing, error) {
	var p Pricing
	if _, err := c.do(ctx, http.MethodGet, "/v1/pricing", nil, &p, idempotent); err != nil {
		return nil, err
	}
	return &p, nil
}

// CreateAPIKey creates an API key (POST /v1/api-keys, admin). The call is not idempotent, so it is not sent
// again after a connection error (only after 429 or 503, which mean nothing was created).
func (c *Client) CreateAPIKey(ctx context.Context, name, role string) (*APIKey, error) {
	var k APIKey
	in := map[string]string{"name": name, "role": role}
	if _, err := c.do(ctx, http.MethodPost, "/v1/api-keys", in, &k, notIdempotent); err != nil {
		return nil, err
	}
	return &k, nil
}

// Health calls GET /health once (no retries): nil when the service and its database are up.
func (c *Client) Health(ctx context.Context) error {
	_, _, _, err := c.attempt(ctx, http.MethodGet, "/health", nil, nil, idempotent)
	return err
}

// IsRetryable reports whether err is one the client retries (a 429 or 503 answer); after the client has given up
// it tells the caller that the same call may be sent again later.
func IsRetryable(err error) bool {
	var p *Problem
	if errors.As(err, &p) {
		return p.Status == http.StatusTooManyRequests || p.Status == http.StatusServiceUnavailable
	}
	return false
}
