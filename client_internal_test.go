package tether

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func TestCloseHint(t *testing.T) {
	for _, tc := range []struct {
		reason string
		want   time.Duration
	}{
		{"retry_ms=1500", 1500 * time.Millisecond},
		{"going away; retry_ms=20 please", 20 * time.Millisecond},
		{"retry_ms=", 0},
		{"retry_ms=-5", 0},
		{"retry_ms=0", 0},
		{"retry_ms=x1", 0},
		{"no hint", 0},
		{"retry_ms=99999999999999999999999", 0},     // not an int64
		{"retry_ms=9223372036854775807", time.Hour}, // capped: no server silences its clients for days
		{"retry_ms=86400000", time.Hour},
	} {
		err := &CloseError{Code: websocket.StatusGoingAway, Reason: tc.reason}
		if got := closeHint(err); got != tc.want {
			t.Errorf("closeHint(%q) = %v, want %v", tc.reason, got, tc.want)
		}
	}
	if got := closeHint(errors.New("retry_ms=5")); got != 0 {
		t.Errorf("a hint outside a close error counted: %v", got)
	}
}

// FuzzCloseHint: whatever the server puts in a close reason, the hint is
// never negative, and a well-formed one is read exactly.
func FuzzCloseHint(f *testing.F) {
	for _, s := range []string{"retry_ms=1500", "x retry_ms=7 y", "retry_ms=", "retry_ms=-1", "retry_ms=1e3", "retry_ms=00012", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, reason string) {
		got := closeHint(&CloseError{Code: websocket.StatusGoingAway, Reason: reason})
		if got < 0 {
			t.Fatalf("closeHint(%q) = %v", reason, got)
		}
		_, after, ok := strings.Cut(reason, "retry_ms=")
		if !ok {
			if got != 0 {
				t.Fatalf("closeHint(%q) = %v without a hint", reason, got)
			}
			return
		}
		digits := after[:len(after)-len(strings.TrimLeft(after, "0123456789"))]
		if n, err := strconv.ParseInt(digits, 10, 64); err == nil && n > 0 && got != min(time.Duration(min(n, 1<<40))*time.Millisecond, time.Hour) {
			t.Fatalf("closeHint(%q) = %v, want %d ms capped at 1 h", reason, got, n)
		}
		if got > time.Hour {
			t.Fatalf("closeHint(%q) = %v, over the 1 h cap", reason, got)
		}
	})
}

func TestHandshakeErrors(t *testing.T) {
	cause := errors.New("failed to WebSocket dial")
	for _, tc := range []struct {
		code       int
		retryAfter string
		terminal   bool
		after      time.Duration
	}{
		{401, "", true, 0},
		{403, "", true, 0},
		{404, "", true, 0},
		{400, "", true, 0},
		{408, "", false, 0},
		{429, "3", false, 3 * time.Second},
		{503, "2", false, 2 * time.Second},
		{503, "soon", false, 0},
		{503, "999999999999", false, time.Hour},
		{502, "", false, 0},
	} {
		resp := &http.Response{StatusCode: tc.code, Header: http.Header{}}
		if tc.retryAfter != "" {
			resp.Header.Set("Retry-After", tc.retryAfter)
		}
		err := handshakeError("ws://x", resp, cause)
		if terminal(err) != tc.terminal {
			t.Errorf("HTTP %d: terminal = %v, want %v (%v)", tc.code, terminal(err), tc.terminal, err)
		}
		if got := retryAfter(errors.Join(errors.New("other"), err)); got != tc.after {
			t.Errorf("HTTP %d Retry-After %q: %v, want %v", tc.code, tc.retryAfter, got, tc.after)
		}
	}
}
