package ledger

import (
	"context"
	"strconv"
	"sync"
	"time"
)

// DefaultPricingRefresh is how often a PricingCache reloads GET /v1/pricing.
const DefaultPricingRefresh = 60 * time.Second

// PricingCache keeps GET /v1/pricing in memory for interfaces that read ratios synchronously (one-api's
// ModelRatio, GroupRation, ModelCompletionRatio). It is safe for concurrent use. A read after the refresh
// interval returns the cached prices at once and starts one background reload; a failed reload keeps the last
// prices (and is reported to onError). The first load happens in NewPricingCache, so a cache always has prices.
type PricingCache struct {
	c        *Client
	refresh  time.Duration
	timeout  time.Duration
	onError  func(error)
	mu       sync.RWMutex
	pricing  *Pricing
	loadedAt time.Time
	loading  bool
	ratios   map[string]float64 // parsed ratios, keyed "m:"+model, "c:"+model, "g:"+group
	defaults [3]float64         // model, completion, group
}

// NewPricingCache loads the prices once and returns the cache; refresh <= 0 means DefaultPricingRefresh.
func NewPricingCache(ctx context.Context, c *Client, refresh time.Duration, onError func(error)) (*PricingCache, error) {
	if refresh <= 0 {
		refresh = DefaultPricingRefresh
	}
	pc := &PricingCache{c: c, refresh: refresh, timeout: 30 * time.Second, onError: onError}
	if err := pc.Refresh(ctx); err != nil {
		return nil, err
	}
	return pc, nil
}

// Refresh reloads the prices now.
func (pc *PricingCache) Refresh(ctx context.Context) error {
	p, err := pc.c.Pricing(ctx)
	if err != nil {
		return err
	}
	ratios := make(map[string]float64, 2*len(p.Models)+len(p.Groups))
	for name, m := range p.Models {
		if f, err := m.ModelRatio.Float64(); err == nil {
			ratios["m:"+name] = f
		}
		if f, err := m.CompletionRatio.Float64(); err == nil {
			ratios["c:"+name] = f
		}
	}
	for name, g := range p.Groups {
		if f, err := g.GroupRatio.Float64(); err == nil {
			ratios["g:"+name] = f
		}
	}
	defaults := [3]float64{30, 1, 1} // the contract's defaults, should the service omit one
	for i, d := range []Decimal{p.Defaults.ModelRatio, p.Defaults.CompletionRatio, p.Defaults.GroupRatio} {
		if f, err := strconv.ParseFloat(string(d), 64); err == nil {
			defaults[i] = f
		}
	}
	pc.mu.Lock()
	pc.pricing, pc.ratios, pc.defaults, pc.loadedAt = p, ratios, defaults, time.Now()
	pc.mu.Unlock()
	return nil
}

// Pricing returns the cached prices (do not modify them).
func (pc *PricingCache) Pricing() *Pricing {
	pc.maybeRefresh()
	pc.mu.RLock()
	defer pc.mu.RUnlock()
	return pc.pricing
}

func (pc *PricingCache) lookup(key string, def int) float64 {
	pc.maybeRefresh()
	pc.mu.RLock()
	defer pc.mu.RUnlock()
	if f, ok := pc.ratios[key]; ok {
		return f
	}
	return pc.defaults[def]
}

// ModelRatio is the model's ratio, or the default ratio for an unlisted model.
func (pc *PricingCache) ModelRatio(model string) float64 { return pc.lookup("m:"+model, 0) }

// CompletionRatio is the model's completion ratio, or the default.
func (pc *PricingCache) CompletionRatio(model string) float64 { return pc.lookup("c:"+model, 1) }

// GroupRatio is the group's ratio, or the default.
func (pc *PricingCache) GroupRatio(group string) float64 { return pc.lookup("g:"+group, 2) }

func (pc *PricingCache) maybeRefresh() {
	pc.mu.RLock()
	fresh := pc.loading || time.Since(pc.loadedAt) < pc.refresh
	pc.mu.RUnlock()
	if fresh {
		return
	}
	pc.mu.Lock()
	if pc.loading || time.Since(pc.loadedAt) < pc.refresh {
		pc.mu.Unlock()
		return
	}
	pc.loading = true
	pc.mu.Unlock()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), pc.timeout)
		err := pc.Refresh(ctx)
		cancel()
		pc.mu.Lock()
		pc.loading = false
		if err != nil {
			// Try again after another interval, not on every read.
			pc.loadedAt = time.Now()
		}
		pc.mu.Unlock()
		if err != nil && pc.onError != nil {
			pc.onError(err)
		}
	}()
}
