package tether_test

import (
	"context"
	"errors"
	"testing"

	"github.com/tether-ws/tether"
)

// Limits given later override earlier ones field by field, and a later
// Limits can set the overflow policy back to Disconnect.
func TestLimitsLaterOverride(t *testing.T) {
	ws, c := acceptOne(t,
		tether.WithLimits(tether.Limits{SendQueue: 1, Overflow: tether.DropOldest}),
		tether.WithLimits(tether.Limits{Overflow: tether.Disconnect}), // SendQueue stays 1
	)
	go func() { // reads, so that the close handshake completes
		for {
			if _, _, err := ws.Read(context.Background()); err != nil {
				return
			}
		}
	}()
	var err error
	for range 10_000 {
		if err = c.Send(context.Background(), []byte("x")); err != nil {
			break
		}
	}
	if !errors.Is(err, tether.ErrQueueFull) {
		t.Fatalf("Send past a queue of 1: %v, want ErrQueueFull", err)
	}
	if reason := endOf(t, c); !errors.Is(reason, tether.ErrQueueFull) {
		t.Fatalf("conn ended with %v, want ErrQueueFull under Disconnect", reason)
	}
}
