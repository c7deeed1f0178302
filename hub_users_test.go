package tether_test

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// TestHubUserOperations: DisconnectUser, SubscribeUser and
// UnsubscribeUser on a hub alone act on every conn of the user, raw and
// v1 alike, and on no one else's; bad arguments are errors that change
// nothing.
func TestHubUserOperations(t *testing.T) {
	s := newHubServer(t, tether.WithAuth(func(r *http.Request) (string, error) {
		return r.URL.Query().Get("user"), nil
	}))
	raw := dialClient(t, s.url()+"?user=ann", clientOpts{raw: true})
	v1 := dialClient(t, s.url()+"?user=ann", clientOpts{})
	v1.welcome()
	bob := dialClient(t, s.url()+"?user=bob", clientOpts{raw: true})
	waitFor(t, 5*time.Second, "three conns", func() bool { return s.hub.Len() == 3 })

	if err := s.hub.SubscribeUser("ann", ""); err == nil {
		t.Errorf("SubscribeUser with an empty topic: no error")
	}
	if err := s.hub.SubscribeUser("ann", "news"); err != nil {
		t.Fatalf("SubscribeUser: %v", err)
	}
	if err := s.hub.Publish("news", []byte(`"first"`)); err != nil {
		t.Fatal(err)
	}
	if got := string(raw.Next(t, 5*time.Second)); got != `"first"` {
		t.Errorf("ann's raw conn got %q, want the publication", got)
	}
	if m := v1.expect("msg"); m.Topic != "news" || string(m.Data) != `"first"` {
		t.Errorf("ann's v1 conn got %s, want the publication", m.line)
	}
	if err := s.hub.UnsubscribeUser("ann", "news"); err != nil {
		t.Fatalf("UnsubscribeUser: %v", err)
	}
	if err := s.hub.Publish("news", []byte(`"second"`)); err != nil {
		t.Fatal(err)
	}
	if err := s.hub.Broadcast([]byte(`"all"`)); err != nil {
		t.Fatal(err)
	}
	// The broadcast follows the second publication in each queue: what
	// comes first is the broadcast, never "second".
	if got := string(raw.Next(t, 5*time.Second)); got != `"all"` {
		t.Errorf("ann's raw conn got %q after UnsubscribeUser, want the broadcast", got)
	}
	if m := v1.expect("msg"); m.Topic != "" || string(m.Data) != `"all"` {
		t.Errorf("ann's v1 conn got %s after UnsubscribeUser, want the broadcast", m.line)
	}
	if got := string(bob.Next(t, 5*time.Second)); got != `"all"` {
		t.Errorf("bob got %q, want only the broadcast", got)
	}

	if _, err := s.hub.DisconnectUser("ann", 999, "bad code"); err == nil {
		t.Errorf("DisconnectUser with code 999: no error")
	}
	n, err := s.hub.DisconnectUser("ann", 4001, "signed out")
	if err != nil || n != 2 {
		t.Fatalf("DisconnectUser = %d, %v; want 2, nil", n, err)
	}
	for _, c := range []*client{raw, v1} {
		err := c.ReadErr(t, 5*time.Second)
		var ce websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != 4001 || ce.Reason != "signed out" {
			t.Errorf("ann's conn ended with %v, want close 4001 \"signed out\"", err)
		}
	}
	waitFor(t, 5*time.Second, "bob alone", func() bool { return s.hub.Len() == 1 })
	if n, err := s.hub.DisconnectUser("ann", 4001, "again"); n != 0 || err != nil {
		t.Errorf("DisconnectUser of a user with no conn = %d, %v; want 0, nil", n, err)
	}
	if !s.hub.Online("bob") || s.hub.Online("ann") {
		t.Errorf("Online: bob %v, ann %v; want true, false", s.hub.Online("bob"), s.hub.Online("ann"))
	}
}
