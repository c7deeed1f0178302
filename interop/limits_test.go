package interop_test

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/tether-ws/tether"
	"golang.org/x/time/rate"
)

// pingEvery sends WebSocket pings from p every d until the returned stop
// is called, and counts the pongs that come back.
func pingEvery(p *gorillaPeer, d time.Duration) (pongs *atomic.Int32, stop func()) {
	pongs = new(atomic.Int32)
	p.ws.SetPongHandler(func(string) error {
		pongs.Add(1)
		return nil
	})
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(d)
		defer tick.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
				if p.ws.WriteControl(websocket.PingMessage, []byte("hi"), time.Now().Add(time.Second)) != nil {
					return
				}
			}
		}
	}()
	return pongs, func() { close(quit); <-done }
}

// closeCode waits for the gorilla peer's read to fail and returns the
// close frame it got.
func closeCode(t testing.TB, p *gorillaPeer) *websocket.CloseError {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(3 * time.Second):
		t.Fatal("the conn is still open")
	}
	var ce *websocket.CloseError
	if !errors.As(p.err, &ce) {
		t.Fatalf("the conn ended with %v, not a close frame", p.err)
	}
	return ce
}

// A client may keep itself alive with WebSocket pings of its own instead
// of answering the hub's (PROTOCOL.md, section 9): a gorilla client that
// never answers a ping but pings every 100 ms (the limit is 10/s) stays,
// and gets a pong for each. Pinging faster than the limit closes the conn
// with 1008 and ErrProtocolViolation.
func TestGorillaOwnPings(t *testing.T) {
	s := newServer(t)
	p := dialGorilla(t, s.url("pinger"), true)
	pongs, stopPinger := pingEvery(p, 100*time.Millisecond)
	defer stopPinger()
	s.conn("pinger", 1, time.Second)
	time.Sleep(alive)
	if rec := s.record("pinger", 1); !rec.ended.IsZero() {
		t.Fatalf("a client pinging every 100 ms was dropped: %v", rec.reason)
	}
	if n := pongs.Load(); n < int32(alive/(100*time.Millisecond))-2 {
		t.Errorf("%d pongs to the client's pings in %v", n, alive)
	}

	flood := dialGorilla(t, s.url("flood"), false)
	_, stopFlood := pingEvery(flood, 5*time.Millisecond)
	defer stopFlood()
	rec := s.ended("flood", 1, 3*time.Second)
	if !errors.Is(rec.reason, tether.ErrProtocolViolation) {
		t.Errorf("ping flood: the conn ended with %v, want ErrProtocolViolation", rec.reason)
	}
	if ce := closeCode(t, flood); ce.Code != websocket.ClosePolicyViolation {
		t.Errorf("ping flood: close %d %q, want 1008", ce.Code, ce.Text)
	}
	t.Logf("ping flood at 200/s closed after %v", rec.ended.Sub(rec.connected).Round(time.Millisecond))
	// The pinger, still pinging, is untouched.
	if rec := s.record("pinger", 1); !rec.ended.IsZero() {
		t.Errorf("the pinger's conn ended during the flood: %v", rec.reason)
	}
}

// A raw peer's bad input gets the README's answers: invalid UTF-8 in a
// text message closes with 1007 (ErrProtocolViolation), a message over
// the size limit with 1009 (ErrMessageTooBig).
func TestGorillaRawBadInput(t *testing.T) {
	s := newServer(t)
	p := dialGorilla(t, s.url("utf8"), false)
	if err := p.ws.WriteMessage(websocket.TextMessage, []byte("ok\xff\xfe")); err != nil {
		t.Fatal(err)
	}
	rec := s.ended("utf8", 1, 2*time.Second)
	if !errors.Is(rec.reason, tether.ErrProtocolViolation) {
		t.Errorf("invalid UTF-8: ended with %v, want ErrProtocolViolation", rec.reason)
	}
	if ce := closeCode(t, p); ce.Code != websocket.CloseInvalidFramePayloadData {
		t.Errorf("invalid UTF-8: close %d %q, want 1007", ce.Code, ce.Text)
	}
	if len(rec.messages) != 0 {
		t.Errorf("the application got %q", rec.messages)
	}

	p = dialGorilla(t, s.url("big"), false)
	if err := p.ws.WriteMessage(websocket.BinaryMessage, make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	s.message("big", 1, string(make([]byte, 64<<10)), 2*time.Second) // 64 KiB is allowed
	if err := p.ws.WriteMessage(websocket.BinaryMessage, make([]byte, 64<<10+1)); err != nil {
		t.Fatal(err)
	}
	rec = s.ended("big", 1, 2*time.Second)
	if !errors.Is(rec.reason, tether.ErrMessageTooBig) {
		t.Errorf("too big: ended with %v, want ErrMessageTooBig", rec.reason)
	}
	if ce := closeCode(t, p); ce.Code != websocket.CloseMessageTooBig {
		t.Errorf("too big: close %d %q, want 1009", ce.Code, ce.Text)
	}
}

// A v1 client that sends past the rate limit has the extra messages
// refused with rate_limited, and, as it goes on (more than 10 refused in a
// burst), is closed with 4429 and a retry_ms hint (PROTOCOL.md, section 7).
func TestGorillaRateLimit(t *testing.T) {
	s := newServer(t, tether.WithRateLimit(rate.Limit(50), 20))
	p := dialGorilla(t, s.url("greedy"), false, tether.Subprotocol)
	if w := p.expect("welcome"); w.Limits == nil || w.Limits.MsgsPerS != 50 || w.Limits.Burst != 20 {
		t.Fatalf("welcome %s: want limits 50/s, burst 20", w)
	}

	// 25 pings in one message: the burst of 20 is answered, the other 5
	// (a token may have come back meanwhile) refused, each in order.
	p.writeText(strings.Repeat(`{"op":"ping","ts":7}`+"\n", 25))
	var pongs, limited int
	for pongs+limited < 25 {
		w := p.line()
		if w.Op == "pong" {
			pongs++
		} else if w.Code == "rate_limited" && w.ID == "" {
			limited++
		} else {
			t.Fatalf("unexpected %s", w)
		}
	}
	if pongs < 20 || pongs > 21 {
		t.Errorf("%d pongs and %d rate_limited errors for 25 pings with a burst of 20", pongs, limited)
	}
	if rec := s.record("greedy", 1); !rec.ended.IsZero() {
		t.Fatalf("closed after %d refusals: %v", limited, rec.reason)
	}

	// 40 more at once: past 10 refusals in a burst, the conn is closed.
	// What was queued for it is dropped so that the close comes next.
	p.writeText(strings.Repeat(`{"op":"ping","ts":8}`+"\n", 40))
	ce := closeCode(t, p)
	if ce.Code != int(tether.StatusRateLimited) || !strings.Contains(ce.Text, "retry_ms=") {
		t.Fatalf("the conn ended with %v, want close 4429 with a retry_ms hint", p.err)
	}
	rec := s.ended("greedy", 1, time.Second)
	if !errors.Is(rec.reason, tether.ErrRateLimited) {
		t.Errorf("the hub ended the conn with %v, want ErrRateLimited", rec.reason)
	}
	if st := s.Hub().Stats(); st.RateLimited < 11 {
		t.Errorf("the hub counted %d messages over the rate limit, want at least 5 + 6", st.RateLimited)
	}
	t.Logf("25 pings: %d pongs, %d rate_limited; 40 more: close %d %q", pongs, limited, ce.Code, ce.Text)
}
