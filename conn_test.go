package tether_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

func TestHealthyPeerStaysConnected(t *testing.T) {
	const interval, timeout = 20 * time.Millisecond, 60 * time.Millisecond
	srv := newServer(t, tether.WithHeartbeat(interval, timeout))
	p := dialPeer(t, srv.url(), peerOpts{})
	c := srv.next(t)

	time.Sleep(15 * timeout) // many intervals of silence
	if err := c.Err(); err != nil {
		t.Fatalf("healthy idle peer dropped: %v", err)
	}
	if n := p.pingCount(); n < 5 {
		t.Fatalf("peer got %d pings in %v, want several", n, 15*timeout)
	}
	rtt := c.RTT()
	if rtt <= 0 || rtt > timeout {
		t.Fatalf("RTT %v not plausible for loopback", rtt)
	}
	if c.State() != tether.Healthy {
		t.Fatalf("state %v, want healthy", c.State())
	}
}

func TestZombieDetected(t *testing.T) {
	const interval, timeout = 20 * time.Millisecond, 60 * time.Millisecond
	srv := newServer(t, tether.WithHeartbeat(interval, timeout))
	dialPeer(t, srv.url(), peerOpts{noPong: true})
	c := srv.next(t)
	waitDone(t, c, 5*time.Second)
	if !errors.Is(c.Err(), tether.ErrHeartbeatTimeout) {
		t.Fatalf("Err = %v, want ErrHeartbeatTimeout", c.Err())
	}
	silent := time.Since(c.LastSeen())
	if silent < timeout {
		t.Fatalf("dropped after %v of silence, before the timeout %v", silent, timeout)
	}
}

func TestSendDelivers(t *testing.T) {
	srv := newServer(t)
	p := dialPeer(t, srv.url(), peerOpts{})
	c := srv.next(t)
	for i := range 100 {
		if err := c.Send(context.Background(), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 100 {
		select {
		case m := <-p.msgs:
			if m[0] != byte(i) {
				t.Fatalf("message %d arrived as %d", i, m[0])
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d never arrived", i)
		}
	}
}
