package adapter_test

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/tether-ws/tether/adapter"
)

func TestMemoryInbox(t *testing.T) {
	ctx := context.Background()
	ib := adapter.NewMemoryInbox(3, 0, 1<<20)
	if e, got, err := ib.Pending(ctx, "ann"); e != "" || got != nil || err != nil {
		t.Fatalf("Pending of a user never sent to = %q, %v, %v; want nothing", e, got, err)
	}
	var last adapter.Position
	for i := 1; i <= 3; i++ {
		pos, err := ib.Append(ctx, "ann", []byte(strconv.Itoa(i)))
		if err != nil || pos.Seq != uint64(i) || pos.Epoch == "" || (last.Epoch != "" && pos.Epoch != last.Epoch) {
			t.Fatalf("Append %d = %v, %v; want seq %d in one epoch", i, pos, err, i)
		}
		last = pos
	}
	// The bound: a fourth is refused, never pushing out an unacknowledged one.
	if _, err := ib.Append(ctx, "ann", []byte("4")); !errors.Is(err, adapter.ErrInboxFull) {
		t.Fatalf("Append past the bound = %v, want ErrInboxFull", err)
	}
	// Another user has an inbox of their own.
	if pos, err := ib.Append(ctx, "bob", []byte("b")); err != nil || pos.Seq != 1 || pos.Epoch == last.Epoch {
		t.Fatalf("bob's first Append = %v, %v; want seq 1 in an epoch of his own", pos, err)
	}
	epoch, got, _ := ib.Pending(ctx, "ann")
	if epoch != last.Epoch || len(got) != 3 || string(got[0].Data) != "1" || got[2].Seq != 3 {
		t.Fatalf("Pending = %q, %v; want the three in order", epoch, got)
	}
	// An acknowledgement of another epoch changes nothing; of this one,
	// drops what it covers and makes room.
	ib.Ack(ctx, "ann", adapter.Position{Epoch: "other", Seq: 3})
	if _, got, _ := ib.Pending(ctx, "ann"); len(got) != 3 {
		t.Fatalf("an Ack of another epoch dropped messages: %v left", got)
	}
	ib.Ack(ctx, "ann", adapter.Position{Epoch: epoch, Seq: 2})
	if _, got, _ := ib.Pending(ctx, "ann"); len(got) != 1 || got[0].Seq != 3 {
		t.Fatalf("after Ack of seq 2, Pending = %v, want seq 3 alone", got)
	}
	if pos, err := ib.Append(ctx, "ann", []byte("4")); err != nil || pos != (adapter.Position{Epoch: epoch, Seq: 4}) {
		t.Fatalf("Append after the Ack = %v, %v; want seq 4 in the same epoch", pos, err)
	}
	// Emptied, the inbox is forgotten: the next message starts an epoch.
	ib.Ack(ctx, "ann", adapter.Position{Epoch: epoch, Seq: 4})
	if e, got, _ := ib.Pending(ctx, "ann"); e != "" || len(got) != 0 {
		t.Fatalf("after acknowledging everything Pending = %q, %v", e, got)
	}
	if pos, _ := ib.Append(ctx, "ann", []byte("5")); pos.Seq != 1 || pos.Epoch == epoch {
		t.Fatalf("first Append after emptying = %v, want seq 1 of a new epoch", pos)
	}
}

func TestMemoryInboxBounds(t *testing.T) {
	ctx := context.Background()
	// The total bound: 2 messages of 100 bytes fit in 400, a third not.
	ib := adapter.NewMemoryInbox(10, 0, 400)
	data := make([]byte, 100)
	for i := range 2 {
		if _, err := ib.Append(ctx, "u"+strconv.Itoa(i), data); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
	if _, err := ib.Append(ctx, "u2", data); !errors.Is(err, adapter.ErrInboxFull) {
		t.Fatalf("Append past the total = %v, want ErrInboxFull", err)
	}
	// Nothing kept at all with no room.
	if _, err := adapter.NewMemoryInbox(0, 0, 100).Append(ctx, "u", nil); !errors.Is(err, adapter.ErrInboxFull) {
		t.Fatalf("Append to an inbox that keeps nothing = %v, want ErrInboxFull", err)
	}
	// Expiry: messages older than maxAge are gone, and make room.
	ib = adapter.NewMemoryInbox(1, 20*time.Millisecond, 1<<20)
	if _, err := ib.Append(ctx, "ann", []byte("old")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(60 * time.Millisecond)
	if e, got, _ := ib.Pending(ctx, "ann"); e != "" || len(got) != 0 {
		t.Fatalf("an expired message is still pending: %v", got)
	}
	if _, err := ib.Append(ctx, "ann", []byte("new")); err != nil {
		t.Fatalf("Append once the old one expired: %v", err)
	}
}
