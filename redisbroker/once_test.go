package redisbroker_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

// A client's publication sent again on another node, with the same id (as
// a client does after a reconnect it cannot tell the fate of), is acked
// there and not published twice: the broker remembers ids for every node.
func TestPublishOnceAcrossNodes(t *testing.T) {
	srv, _ := startRedis(t)
	allow := tether.WithClientPublish(func(*tether.Conn, string) bool { return true })
	a := startHub(t, "a", srv.Addr(), allow)
	b := startHub(t, "b", srv.Addr(), allow)
	reader, rec := dialRecorded(t, b.url("reader"))
	subscribe(t, reader, "once", rec)
	ctx := context.Background()

	pub := `{"op":"pub","topic":"once","data":{"n":1},"id":"0123456789abcdef.1"}`
	send := func(n *hubNode) {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		ws, _, err := websocket.Dial(ctx, n.url("pete"), &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		if err := ws.Write(ctx, websocket.MessageText, []byte(pub)); err != nil {
			t.Fatal(err)
		}
		for { // the welcome, then the ack
			_, data, err := ws.Read(ctx)
			if err != nil {
				t.Fatalf("reading the ack from node %s: %v", n.name, err)
			}
			if strings.Contains(string(data), `"op":"ack"`) && strings.Contains(string(data), `"0123456789abcdef.1"`) {
				return
			}
			if strings.Contains(string(data), `"op":"error"`) {
				t.Fatalf("node %s refused the pub: %s", n.name, data)
			}
		}
	}
	send(a)
	send(b) // the same user and id, on the other node
	waitUntil(t, 10*time.Second, "the publication delivered", func() bool { return rec.len() >= 1 })
	time.Sleep(200 * time.Millisecond) // room for a second copy to show
	if got := rec.messages(); len(got) != 1 {
		t.Fatalf("the reader got %d copies, want 1: %v", len(got), got)
	}
	if d := b.hub.Stats().Duplicates; d != 1 {
		t.Errorf("node b counted %d duplicates, want 1", d)
	}

	// Another user's request with the same id is not a repeat.
	pub = strings.Replace(pub, `{"n":1}`, `{"n":2}`, 1)
	ctx2, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx2, b.url("other"), &websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	if err := ws.Write(ctx2, websocket.MessageText, []byte(pub)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "another user's publication", func() bool { return rec.len() == 2 })
}
