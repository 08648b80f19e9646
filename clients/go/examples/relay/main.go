// Command relay shows how a relay wires the ledger in, with both adapters: one-api's Bookkeeper and new-api's
// FundingSource. It runs one simulated request through each against a running service:
//
//	go run ./examples/relay -url http://127.0.0.1:8080 -key "$RELAY_KEY" -user 42 -token 7 -channel 3
//
// The user must have quota (POST /v1/topups) and the token must be registered (PUT /v1/tokens/7).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strconv"
	"time"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

func main() {
	url := flag.String("url", "http://127.0.0.1:8080", "ledger service URL")
	key := flag.String("key", os.Getenv("LEDGER_RELAY_KEY"), "relay API key (default $LEDGER_RELAY_KEY)")
	user := flag.Int("user", 42, "user id")
	token := flag.Int("token", 7, "token id (registered with PUT /v1/tokens)")
	channel := flag.Int("channel", 3, "upstream channel id")
	flag.Parse()

	// One client per process: it is safe for concurrent use.
	client := ledger.New(*url, *key,
		ledger.WithMaxAttempts(4),
		ledger.WithBackoff(100*time.Millisecond, 5*time.Second),
		ledger.WithTimeout(10*time.Second),
		ledger.WithHTTPClient(&http.Client{}),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if err := oneAPIStyle(ctx, client, *user, *token, *channel); err != nil {
		log.Fatal(err)
	}
	if err := newAPIStyle(ctx, client, int64(*user), int64(*token), int64(*channel)); err != nil {
		log.Fatal(err)
	}
}

// oneAPIStyle is one-api's text relay with the ledger as its Bookkeeper: the request id comes from the context,
// where one-api's request-id middleware has put it (here WithRequestID stands in for it).
func oneAPIStyle(ctx context.Context, client *ledger.Client, user, token, channel int) error {
	bk, err := ledger.NewBookkeeper(ctx, client, ledger.WithPricingRefresh(time.Minute))
	if err != nil {
		return err
	}
	ctx = ledger.WithRequestID(ctx, "example-oneapi-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	ctx = ledger.WithRequestInfo(ctx, ledger.RequestInfo{Model: "gpt-4o", Group: "default"})

	// Before the upstream call: one-api's estimate, with the ledger's ratios.
	ratio := bk.ModelRatio("gpt-4o") * bk.GroupRation("default")
	promptTokens, maxTokens := 120, 400
	estimate := int64(float64(500+promptTokens+maxTokens) * ratio)
	preConsumed, err := bk.PreConsumeQuota(ctx, estimate, user, token)
	if errors.Is(err, ledger.ErrInsufficientUserQuota) {
		return fmt.Errorf("user quota is not enough: %w", err) // one-api answers 403 insufficient_user_quota
	}
	if err != nil {
		return err
	}
	fmt.Printf("one-api: pre-consumed %d of an estimate of %d (0: trusted)\n", preConsumed, estimate)

	upstreamOK, completionTokens := true, 80 // the upstream call
	if !upstreamOK {
		bk.RefundQuota(ctx, preConsumed, token)
		return nil
	}
	completionRatio := bk.ModelCompletionRatio("gpt-4o")
	quota := int64((float64(promptTokens) + float64(completionTokens)*completionRatio) * ratio)
	h, err := bk.TryConsume(ctx, &ledger.ConsumeLog{
		UserId: user, ChannelId: channel, TokenId: token, ModelName: "gpt-4o",
		PromptTokens: promptTokens, CompletionTokens: completionTokens, Quota: quota, PreConsumedQuota: preConsumed,
	})
	if err != nil {
		return err
	}
	fmt.Printf("one-api: request %s %s, charged %d\n", h.RequestID, h.Status, *h.Charged)
	return nil
}

// newAPIStyle is new-api's billing session with the ledger as its FundingSource.
func newAPIStyle(ctx context.Context, client *ledger.Client, user, token, channel int64) error {
	fs := client.NewFunding(ctx, ledger.FundingRequest{
		RequestID: "example-newapi-" + strconv.FormatInt(time.Now().UnixNano(), 36),
		UserID:    user, TokenID: token, ChannelID: channel, Group: "default", Model: "gpt-4o",
		PromptTokens: 120, MaxTokens: 400,
	})
	if err := fs.PreConsume(2550); err != nil {
		return err
	}
	upstreamOK := true
	if !upstreamOK {
		return fs.Refund()
	}
	fs.SetUsage(120, 80)
	actual := 1100
	if err := fs.Settle(actual - fs.GetPreConsumedQuota()); err != nil { // new-api's delta
		return err
	}
	h := fs.Hold()
	fmt.Printf("new-api: request %s %s, charged %d\n", h.RequestID, h.Status, *h.Charged)
	return nil
}
