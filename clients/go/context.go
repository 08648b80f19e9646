package ledger

import (
	"context"
	"time"
)

type ctxKey int

const (
	requestIDKey ctxKey = iota
	requestInfoKey
)

// OneAPIRequestIDKey is the context key under which one-api's request-id middleware stores the request id
// (common/helper.RequestIdKey, a plain string). helper.SetRequestID puts it in the request's context with
// context.WithValue(ctx, "X-Oneapi-Request-Id", id), and the middleware also does c.Set with it on the
// *gin.Context, whose Value method looks string keys up in c.Keys: either context works.
const OneAPIRequestIDKey = "X-Oneapi-Request-Id"

// one-api's gin context keys (common/ctxkey) read as fallbacks for the model and group of a hold.
const (
	oneAPIRequestModelKey = "request_model"
	oneAPIOriginalModel   = "original_model"
	oneAPIGroupKey        = "group"
)

// WithRequestID returns a context carrying the relay's request id. The Bookkeeper uses it as the ledger's
// request_id, the idempotency key of the request's hold, settlement or consumption.
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey, id)
}

// RequestIDFrom returns the request id the Bookkeeper would use: the one set by WithRequestID, else one-api's
// (OneAPIRequestIDKey), else "".
func RequestIDFrom(ctx context.Context) string {
	if ctx == nil {
		return ""
	}
	if id, ok := ctx.Value(requestIDKey).(string); ok && id != "" {
		return id
	}
	if id, ok := ctx.Value(OneAPIRequestIDKey).(string); ok && id != "" {
		return id
	}
	return ""
}

// RequestInfo describes a request for the Bookkeeper, whose one-api signatures carry no model or group.
type RequestInfo struct {
	Model string
	Group string
}

// WithRequestInfo returns a context carrying the request's model and group, which the Bookkeeper records on the
// hold. Without it, one-api's gin keys "request_model" (or "original_model") and "group" are read when ctx is the
// *gin.Context; otherwise the model is "unknown" and the group "default". The amounts are explicit either way,
// so this only affects what the audit trail and the per-model usage report show.
func WithRequestInfo(ctx context.Context, info RequestInfo) context.Context {
	return context.WithValue(ctx, requestInfoKey, info)
}

func requestInfoFrom(ctx context.Context) RequestInfo {
	info, _ := ctx.Value(requestInfoKey).(RequestInfo)
	if info.Model == "" {
		if m, ok := ctx.Value(oneAPIRequestModelKey).(string); ok && m != "" {
			info.Model = m
		} else if m, ok := ctx.Value(oneAPIOriginalModel).(string); ok && m != "" {
			info.Model = m
		}
	}
	if info.Group == "" {
		if g, ok := ctx.Value(oneAPIGroupKey).(string); ok && g != "" {
			info.Group = g
		}
	}
	if info.Model == "" {
		info.Model = "unknown"
	}
	return info
}

// detached keeps a context's values but not its cancellation or deadline (Go 1.21's context.WithoutCancel,
// written out for Go 1.19). Settlements and refunds run on it: the relay calls them after the client may have
// gone, and a settlement dropped because the client hung up would leave the hold to expire uncharged.
type detached struct{ parent context.Context }

func (d detached) Deadline() (time.Time, bool)       { return time.Time{}, false }
func (d detached) Done() <-chan struct{}             { return nil }
func (d detached) Err() error                        { return nil }
func (d detached) Value(key interface{}) interface{} { return d.parent.Value(key) }

func detach(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	if ctx == nil {
		ctx = context.Background()
	}
	return context.WithTimeout(detached{ctx}, timeout)
}
