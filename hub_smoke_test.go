package tether_test

import (
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

func TestHubSmoke(t *testing.T) {
	s := newHubServer(t, tether.WithHeartbeat(50*time.Millisecond, 200*time.Millisecond))
	c := dialClient(t, s.url(), clientOpts{})
	w := c.welcome()
	if w.Heartbeat.IntervalMS != 50 || w.Heartbeat.TimeoutMS != 200 {
		t.Fatalf("welcome %s", w.line)
	}
	c.subscribe("room")
	if err := s.hub.Publish("room", []byte(`{"a":1}`)); err != nil {
		t.Fatal(err)
	}
	m := c.expect("msg")
	t.Log(m.line)
	c.send(`{"op":"sub","topic":"room","since":{"epoch":"` + m.Epoch + `","seq":0},"id":"x"}`)
	t.Log(c.expect("ack").line)
	c.send(`{"op":"ping","ts":5}`)
	t.Log(c.expect("pong").line)
	t.Logf("%+v", s.hub.Stats())
}
