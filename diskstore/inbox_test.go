package diskstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
)

// These tests are those of adapter/inbox_test.go for the memory inbox,
// run against the store, then those about the file.

// newInbox is a store's inbox with the bounds of
// adapter.NewMemoryInbox(messages, maxAge, total), in a file of its own.
func newInbox(t testing.TB, messages int, maxAge time.Duration, total int) adapter.Inbox {
	t.Helper()
	return open(t, tempPath(t), diskstore.WithInbox(messages, maxAge, total)).Inbox()
}

// pending returns the user's pending messages as strings, with the epoch.
func pending(t testing.TB, ib adapter.Inbox, user string) (string, []string) {
	t.Helper()
	epoch, entries, err := ib.Pending(context.Background(), user)
	if err != nil {
		t.Fatalf("Pending(%q): %v", user, err)
	}
	if (epoch == "") != (len(entries) == 0) {
		t.Fatalf("Pending(%q) = %q, %d entries: an epoch goes with entries", user, epoch, len(entries))
	}
	var out []string
	for i, e := range entries {
		if i > 0 && e.Seq != entries[i-1].Seq+1 {
			t.Fatalf("Pending(%q): seq %d after %d", user, e.Seq, entries[i-1].Seq)
		}
		out = append(out, string(e.Data))
	}
	return epoch, out
}

func TestInbox(t *testing.T) {
	ctx := context.Background()
	ib := newInbox(t, 3, 0, 1<<20)
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
	epoch, entries, _ := ib.Pending(ctx, "ann")
	if epoch != last.Epoch || len(entries) != 3 || string(entries[0].Data) != "1" || entries[0].Seq != 1 || entries[2].Seq != 3 {
		t.Fatalf("Pending = %q, %v; want the three in order", epoch, entries)
	}
	// An acknowledgement of another epoch changes nothing; of this one,
	// drops what it covers and makes room.
	ib.Ack(ctx, "ann", adapter.Position{Epoch: "other", Seq: 3})
	if _, got := pending(t, ib, "ann"); len(got) != 3 {
		t.Fatalf("an Ack of another epoch dropped messages: %v left", got)
	}
	if err := ib.Ack(ctx, "ann", adapter.Position{Epoch: epoch, Seq: 2}); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := ib.Pending(ctx, "ann"); len(got) != 1 || got[0].Seq != 3 {
		t.Fatalf("after Ack of seq 2, Pending = %v, want seq 3 alone", got)
	}
	// An acknowledgement of what is gone already changes nothing.
	if err := ib.Ack(ctx, "ann", adapter.Position{Epoch: epoch, Seq: 1}); err != nil {
		t.Fatal(err)
	}
	if pos, err := ib.Append(ctx, "ann", []byte("4")); err != nil || pos != (adapter.Position{Epoch: epoch, Seq: 4}) {
		t.Fatalf("Append after the Ack = %v, %v; want seq 4 in the same epoch", pos, err)
	}
	// Emptied, the inbox is forgotten: the next message starts an epoch.
	ib.Ack(ctx, "ann", adapter.Position{Epoch: epoch, Seq: 4})
	if e, got := pending(t, ib, "ann"); e != "" || len(got) != 0 {
		t.Fatalf("after acknowledging everything Pending = %q, %v", e, got)
	}
	if pos, _ := ib.Append(ctx, "ann", []byte("5")); pos.Seq != 1 || pos.Epoch == epoch {
		t.Fatalf("first Append after emptying = %v, want seq 1 of a new epoch", pos)
	}
	// An acknowledgement beyond the last seq drops everything.
	e, _ := pending(t, ib, "bob")
	ib.Ack(ctx, "bob", adapter.Position{Epoch: e, Seq: 1000})
	if e, got := pending(t, ib, "bob"); e != "" || len(got) != 0 {
		t.Fatalf("after an Ack past the last seq Pending = %q, %v", e, got)
	}
}

func TestInboxBounds(t *testing.T) {
	ctx := context.Background()
	// The total bound: 2 messages of 100 bytes fit in 400, a third not.
	ib := newInbox(t, 10, 0, 400)
	data := make([]byte, 100)
	for i := range 2 {
		if _, err := ib.Append(ctx, "u"+strconv.Itoa(i), data); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
	if _, err := ib.Append(ctx, "u2", data); !errors.Is(err, adapter.ErrInboxFull) || err.Error() == adapter.ErrInboxFull.Error() {
		t.Fatalf("Append past the total = %v, want ErrInboxFull with a reason", err)
	}
	if e, got := pending(t, ib, "u2"); e != "" || got != nil {
		t.Fatalf("the refused user has %q %q pending", e, got)
	}
	// An acknowledgement makes room.
	e, _ := pending(t, ib, "u0")
	ib.Ack(ctx, "u0", adapter.Position{Epoch: e, Seq: 1})
	if _, err := ib.Append(ctx, "u2", data); err != nil {
		t.Fatalf("Append once an Ack made room: %v", err)
	}
	// A message bigger than the total is refused at once.
	if _, err := ib.Append(ctx, "u3", make([]byte, 400)); !errors.Is(err, adapter.ErrInboxFull) {
		t.Fatalf("Append of a message over the total = %v, want ErrInboxFull", err)
	}
	// Nothing kept at all with no room.
	for _, b := range [][2]int{{0, 100}, {10, 0}, {-1, 100}} {
		ib := newInbox(t, b[0], 0, b[1])
		if _, err := ib.Append(ctx, "u", nil); !errors.Is(err, adapter.ErrInboxFull) {
			t.Fatalf("Append to an inbox of %v that keeps nothing = %v, want ErrInboxFull", b, err)
		}
	}
}

func TestInboxExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		// Messages older than maxAge are gone, and make room.
		ib := newInbox(t, 1, 20*time.Millisecond, 1<<20)
		pos, err := ib.Append(ctx, "ann", []byte("old"))
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(60 * time.Millisecond)
		if e, got := pending(t, ib, "ann"); e != "" || len(got) != 0 {
			t.Fatalf("an expired message is still pending: %v", got)
		}
		next, err := ib.Append(ctx, "ann", []byte("new"))
		if err != nil {
			t.Fatalf("Append once the old one expired: %v", err)
		}
		if next.Seq != 1 || next.Epoch == pos.Epoch {
			t.Errorf("Append once the inbox expired = %v, want seq 1 of a new epoch", next)
		}
		// Some expired, some not: the expired are the oldest.
		ib = newInbox(t, 10, time.Minute, 1<<20)
		for _, m := range []string{"a", "b"} {
			ib.Append(ctx, "bob", []byte(m))
		}
		time.Sleep(40 * time.Second)
		ib.Append(ctx, "bob", []byte("c"))
		time.Sleep(30 * time.Second)
		if _, got := pending(t, ib, "bob"); !slices.Equal(got, []string{"c"}) {
			t.Errorf("Pending after a and b expired = %q, want [c]", got)
		}
		// The total bound counts no expired message.
		ib = newInbox(t, 10, time.Minute, 400)
		data := make([]byte, 100)
		ib.Append(ctx, "u0", data)
		ib.Append(ctx, "u1", data)
		time.Sleep(2 * time.Minute)
		if _, err := ib.Append(ctx, "u2", data); err != nil {
			t.Errorf("Append once the others expired: %v", err)
		}
	})
}

// TestInboxBytes checks that data is kept byte for byte, for any user ID.
func TestInboxBytes(t *testing.T) {
	ib := newInbox(t, 10, time.Minute, 1<<20)
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	users := []string{"", "u", "u\x00", "\xff"}
	for _, user := range users {
		for _, m := range []string{string(all), "", user} {
			if _, err := ib.Append(context.Background(), user, []byte(m)); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, user := range users {
		if _, got := pending(t, ib, user); !slices.Equal(got, []string{string(all), "", user}) {
			t.Errorf("user %q: %d messages, want the 3 appended, byte for byte", user, len(got))
		}
	}
}

// TestInboxConcurrent appends, reads and acknowledges for many users at
// once: each user's seqs are 1, 2, 3... in one epoch.
func TestInboxConcurrent(t *testing.T) {
	ib := newInbox(t, 1000, time.Minute, 1<<24)
	ctx := context.Background()
	var wg sync.WaitGroup
	for u := range 16 {
		wg.Go(func() {
			user := fmt.Sprint("user", u)
			var epoch string
			for i := 1; i <= 30; i++ {
				pos, err := ib.Append(ctx, user, []byte(strconv.Itoa(i)))
				if err != nil || pos.Seq != uint64(i) || (epoch != "" && pos.Epoch != epoch) {
					t.Errorf("%s: Append %d = %v, %v", user, i, pos, err)
					return
				}
				epoch = pos.Epoch
				if i%10 == 0 {
					if err := ib.Ack(ctx, user, adapter.Position{Epoch: epoch, Seq: uint64(i - 5)}); err != nil {
						t.Error(err)
					}
				}
			}
			if e, got := pending(t, ib, user); e != epoch || len(got) != 5 || got[0] != "26" {
				t.Errorf("%s: Pending = %q %q, want 26 to 30", user, e, got)
			}
		})
	}
	wg.Wait()
}

// TestInboxReopen checks that a user's inbox survives a Close and an
// Open: the same epoch, the messages still pending, the seqs going on.
func TestInboxReopen(t *testing.T) {
	ctx := context.Background()
	path := tempPath(t)
	st, err := diskstore.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var last adapter.Position
	for _, m := range []string{"a", "b", "c"} {
		if last, err = st.Inbox().Append(ctx, "ann", []byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	st.Inbox().Ack(ctx, "ann", adapter.Position{Epoch: last.Epoch, Seq: 1})
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Inbox().Append(ctx, "ann", []byte("x")); !errors.Is(err, diskstore.ErrClosed) {
		t.Errorf("Append after Close: %v, want ErrClosed", err)
	}

	ib := open(t, path).Inbox()
	if e, got := pending(t, ib, "ann"); e != last.Epoch || !slices.Equal(got, []string{"b", "c"}) {
		t.Fatalf("after a reopen Pending = %q %q, want %q [b c]", e, got, last.Epoch)
	}
	if pos, err := ib.Append(ctx, "ann", []byte("d")); err != nil || pos != (adapter.Position{Epoch: last.Epoch, Seq: 4}) {
		t.Fatalf("Append after a reopen = %v, %v; want seq 4 in the same epoch", pos, err)
	}
}

// TestHubInboxRestart gives the store's inbox to a hub (tether.WithInbox):
// direct messages sent while the user is away survive a restart of the
// hub and its store, reach the user's next conn with their inbox epoch
// and seq, and once acknowledged (received) are not sent again.
func TestHubInboxRestart(t *testing.T) {
	path := tempPath(t)
	serve := func() (*diskstore.Store, *tether.Hub, string, func()) {
		st, err := diskstore.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		hub, err := tether.NewHub(append(helperHubOptions(st), tether.WithInbox(st.Inbox()))...)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: hub}
		served := make(chan struct{})
		go func() {
			defer close(served)
			srv.Serve(ln)
		}()
		stop := func() {
			srv.Close()
			hub.Close()
			<-served
			if err := st.Close(); err != nil {
				t.Error(err)
			}
		}
		return st, hub, "ws://" + ln.Addr().String() + "/ws?user=ann", stop
	}

	st, hub, _, stop := serve()
	for i := 1; i <= 2; i++ {
		if err := hub.SendToUser("ann", fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := pending(t, st.Inbox(), "ann")
	stop()

	st, _, wsURL, stop := serve()
	defer stop()
	conn := newRawPublisher(wsURL)
	conn.connect(t)
	type msg struct {
		Op, Epoch string
		Seq       uint64
		Data      json.RawMessage
	}
	var got []msg
	for len(got) < 2 {
		select {
		case l := <-conn.lines:
			var m msg
			if err := json.Unmarshal([]byte(l), &m); err != nil {
				t.Fatalf("%q: %v", l, err)
			}
			if m.Op == "msg" {
				got = append(got, m)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("after the restart the user got %v in 10 s, want 2 messages", got)
		}
	}
	for i, m := range got {
		if m.Epoch != before || m.Seq != uint64(i+1) || string(m.Data) != fmt.Sprintf(`{"n":%d}`, i+1) {
			t.Errorf("message %d: %+v, want {\"n\":%d} at seq %d of the epoch %q from before the restart", i, m, i+1, i+1, before)
		}
	}
	received := fmt.Sprintf(`{"op":"received","epoch":%q,"seq":2,"id":"r1"}`, before)
	if err := conn.conn.Write(context.Background(), websocket.MessageText, []byte(received)); err != nil {
		t.Fatal(err)
	}
	if !conn.awaitAck(t, "r1") {
		t.Fatal("received: no ack")
	}
	conn.close()
	if e, left := pending(t, st.Inbox(), "ann"); e != "" || len(left) != 0 {
		t.Errorf("after received: %q %q pending, want nothing", e, left)
	}
}
