package ledger

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"
)

// MaxRequestAttempts bounds how many ledger request ids one relay request id may use (see holdAttempt).
const MaxRequestAttempts = 32

// attemptID is the ledger request_id of attempt n (1-based) of a relay request: the relay's id itself, then
// "<id>:2", "<id>:3", ...
func attemptID(base string, n int) string {
	if n <= 1 {
		return base
	}
	return base + ":" + strconv.Itoa(n)
}

// holdAttempt holds for the relay request base, under the first attempt id that is not used up.
//
// Relays retry a failed upstream call on another channel within one client request, under the same request id:
// one-api's controller.Relay calls relayHelper again after the first attempt refunded its pre-consumed quota. The
// ledger would answer a second hold under that id as a replay of the refunded one, and the settlement after it as
// hold_already_refunded. So an id whose hold is refunded, expired or settled, or was held with another body
// (idempotency_conflict), is skipped for the next attempt id. An open hold with the same body is a repeat of the
// same attempt and is used as it is.
func holdAttempt(ctx context.Context, c *Client, r HoldRequest) (*Hold, int, error) {
	base := r.RequestID
	for n := 1; n <= MaxRequestAttempts; n++ {
		r.RequestID = attemptID(base, n)
		h, err := c.Hold(ctx, r)
		if errors.Is(err, ErrIdempotencyConflict) {
			continue
		}
		if err != nil {
			return nil, n, err
		}
		if h.Replayed && h.Status != StatusOpen {
			continue
		}
		return h, n, nil
	}
	return nil, MaxRequestAttempts, errors.New("ledger: request " + base + " has used up its attempt ids")
}

// attempts remembers, per relay request id, the attempt the Bookkeeper's last hold used, so that Consume and
// RefundQuota address it. Entries go when the request is settled or refunded, or after maxAge.
type attempts struct {
	mu        sync.Mutex
	m         map[string]attemptEntry
	maxAge    time.Duration
	lastSweep time.Time
}

type attemptEntry struct {
	n  int
	at time.Time
}

func newAttempts(maxAge time.Duration) *attempts {
	return &attempts{m: map[string]attemptEntry{}, maxAge: maxAge, lastSweep: time.Now()}
}

func (a *attempts) set(base string, n int) {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.m[base] = attemptEntry{n, now}
	if now.Sub(a.lastSweep) > a.maxAge/10 {
		for k, e := range a.m {
			if now.Sub(e.at) > a.maxAge {
				delete(a.m, k)
			}
		}
		a.lastSweep = now
	}
}

// get returns the attempt of base, 1 when none is remembered.
func (a *attempts) get(base string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e, ok := a.m[base]; ok {
		return e.n
	}
	return 1
}

func (a *attempts) forget(base string) {
	a.mu.Lock()
	delete(a.m, base)
	a.mu.Unlock()
}

func (a *attempts) size() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.m)
}
