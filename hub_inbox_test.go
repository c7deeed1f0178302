package tether_test

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

func inboxHub(t *testing.T, inbox adapter.Inbox, extra ...tether.HubOption) *hubServer {
	return newHubServer(t, append([]tether.HubOption{tether.WithInbox(inbox), tether.WithAuth(func(r *http.Request) (string, error) {
		return r.URL.Query().Get("user"), nil
	})}, extra...)...)
}

// TestHubInbox: direct messages to a user are numbered in the user's
// inbox, replayed to every new v1 conn of the user until acknowledged,
// before the messages sent later, and dropped once acknowledged.
func TestHubInbox(t *testing.T) {
	inbox := adapter.NewMemoryInbox(100, 0, 1<<20)
	s := inboxHub(t, inbox)

	// Sent while ann has no conn: kept.
	for i := 1; i <= 3; i++ {
		if err := s.hub.SendToUser("ann", []byte(strconv.Itoa(i))); err != nil {
			t.Fatalf("SendToUser %d: %v", i, err)
		}
	}
	a := dialClient(t, s.url()+"?user=ann", clientOpts{})
	a.welcome()
	if err := s.hub.SendToUser("ann", []byte("4")); err != nil {
		t.Fatal(err)
	}
	var epoch string
	for i := 1; i <= 4; i++ {
		m := a.expect("msg")
		if m.Topic != "" || m.Seq != uint64(i) || string(m.Data) != strconv.Itoa(i) || m.Epoch == "" || (epoch != "" && m.Epoch != epoch) {
			t.Fatalf("message %d: %s; want seq %d of one inbox epoch, replayed ones first", i, m.line, i)
		}
		epoch = m.Epoch
	}

	// ann's conn goes away having acknowledged up to 2: 3 and 4 come
	// again on the next conn, then 5.
	a.send(`{"op":"received","epoch":"` + epoch + `","seq":2,"id":"r1"}`)
	if m := a.expect("ack"); m.ID != "r1" {
		t.Fatalf("received answered %s", m.line)
	}
	a.Close()
	if err := s.hub.SendToUser("ann", []byte("5")); err != nil {
		t.Fatal(err)
	}
	b := dialClient(t, s.url()+"?user=ann", clientOpts{})
	b.welcome()
	for _, want := range []uint64{3, 4, 5} {
		if m := b.expect("msg"); m.Seq != want || m.Epoch != epoch {
			t.Fatalf("after a reconnect: %s, want seq %d", m.line, want)
		}
	}
	// An acknowledgement of another epoch changes nothing; of this one,
	// empties the inbox.
	b.send(`{"op":"received","epoch":"other","seq":5}`)
	b.send(`{"op":"received","epoch":"` + epoch + `","seq":5,"id":"r2"}`)
	b.expect("ack")
	if e, pending, _ := inbox.Pending(context.Background(), "ann"); len(pending) != 0 {
		t.Fatalf("after received of seq 5 the inbox holds %v (epoch %q)", pending, e)
	}
	c := dialClient(t, s.url()+"?user=ann", clientOpts{})
	c.welcome()
	c.quiet(100 * time.Millisecond)
}

// TestHubInboxZombie: a message queued to a conn that dies before it is
// written (a zombie, dropped here without a close) is not lost: the next
// conn gets it, since no client acknowledged it.
func TestHubInboxZombie(t *testing.T) {
	conns := make(chan *tether.Conn, 1)
	s := inboxHub(t, adapter.NewMemoryInbox(100, 0, 1<<20), tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) { conns <- c }}))
	gate := make(chan struct{}) // never opened: this peer reads nothing
	z := dialClient(t, s.url()+"?user=ann", clientOpts{readGate: gate})
	waitFor(t, 5*time.Second, "ann's conn", func() bool { return s.hub.Online("ann") })
	if err := s.hub.SendToUser("ann", []byte(`"while a zombie"`)); err != nil {
		t.Fatal(err)
	}
	(<-conns).CloseNow() // found dead, as the heartbeat would
	z.Close()
	waitFor(t, 5*time.Second, "ann gone", func() bool { return !s.hub.Online("ann") })
	b := dialClient(t, s.url()+"?user=ann", clientOpts{})
	b.welcome()
	if m := b.expect("msg"); string(m.Data) != `"while a zombie"` || m.Seq != 1 {
		t.Fatalf("the next conn got %s, want the message sent to the zombie", m.line)
	}
}

// TestHubInboxBounds: past its bound the inbox refuses, and SendToUser
// says so; raw peers get live messages only; a received where there is
// no inbox is an error.
func TestHubInboxBounds(t *testing.T) {
	s := inboxHub(t, adapter.NewMemoryInbox(2, 0, 1<<20))
	for i := range 2 {
		if err := s.hub.SendToUser("bob", []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	err := s.hub.SendToUser("bob", []byte("2"))
	if !errors.Is(err, adapter.ErrInboxFull) {
		t.Fatalf("SendToUser past the bound = %v, want ErrInboxFull", err)
	}
	// A raw peer of bob gets nothing replayed, and live messages as they
	// are; anonymous v1 conns have no inbox to acknowledge.
	raw := dialClient(t, s.url()+"?user=carl", clientOpts{raw: true})
	waitFor(t, 5*time.Second, "carl's conn", func() bool { return s.hub.Online("carl") })
	if err := s.hub.SendToUser("carl", []byte(`{"live":true}`)); err != nil {
		t.Fatal(err)
	}
	if got := string(raw.Next(t, 5*time.Second)); got != `{"live":true}` {
		t.Fatalf("the raw peer got %q", got)
	}
	anon := dialClient(t, s.url(), clientOpts{})
	anon.welcome()
	anon.send(`{"op":"received","epoch":"e","seq":1,"id":"x"}`)
	if m := anon.expect("error"); m.Code != "bad_request" || m.ID != "x" {
		t.Fatalf("received without an inbox answered %s", m.line)
	}

	plain := newHubServer(t)
	p := dialClient(t, plain.url(), clientOpts{})
	p.welcome()
	p.send(`{"op":"received","epoch":"e","seq":1,"id":"y"}`)
	if m := p.expect("error"); m.Code != "bad_request" {
		t.Fatalf("received on a hub without inbox answered %s", m.line)
	}
}
