package ledger_test

import (
	"encoding/json"
	"errors"
	"math/big"
	"testing"

	ledger "github.com/quota-ledger/ledger-service/clients/go"
)

func TestDecimalKeepsDigits(t *testing.T) {
	var v struct {
		A ledger.Decimal  `json:"a"`
		B ledger.Decimal  `json:"b"`
		C *ledger.Decimal `json:"c"`
	}
	if err := json.Unmarshal([]byte(`{"a": 0.075, "b": "0.1000000000000000000001", "c": null}`), &v); err != nil {
		t.Fatal(err)
	}
	if v.A != "0.075" || v.B != "0.1000000000000000000001" || v.C != nil {
		t.Fatalf("%+v", v)
	}
	out, err := json.Marshal(v.A)
	if err != nil || string(out) != `"0.075"` {
		t.Fatalf("%s %v", out, err)
	}
	if f, err := v.A.Float64(); err != nil || f != 0.075 {
		t.Fatalf("%v %v", f, err)
	}
}

func TestSumsPastInt64(t *testing.T) {
	var u ledger.User
	if err := json.Unmarshal([]byte(`{"user_id": 1, "available": 99999999999999999999, "held": 0, "used": -5, "request_count": 1}`), &u); err != nil {
		t.Fatal(err)
	}
	if _, err := u.Available.Int64(); err == nil {
		t.Fatal("a sum past 2^63-1 read as an int64")
	}
	n, ok := new(big.Int).SetString(u.Available.String(), 10)
	if !ok || n.String() != "99999999999999999999" {
		t.Fatalf("big: %v", n)
	}
	if v, err := u.Used.Int64(); err != nil || v != -5 {
		t.Fatalf("used %v %v", v, err)
	}
}

func TestBatchResultProblem(t *testing.T) {
	r := ledger.BatchResult{Status: 409, Body: json.RawMessage(`{"type":"urn:ledger:problem:hold_already_refunded","title":"t","status":409,"detail":"d","code":"hold_already_refunded"}`)}
	_, err := r.Hold()
	if !errors.Is(err, ledger.ErrHoldAlreadyRefunded) || errors.Is(err, ledger.ErrHoldAlreadySettled) {
		t.Fatalf("%v", err)
	}
	var p *ledger.Problem
	if !errors.As(err, &p) || p.Status != 409 || p.Detail != "d" {
		t.Fatalf("%+v", p)
	}
}
