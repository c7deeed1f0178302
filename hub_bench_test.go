package tether_test

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether"
)

// BenchmarkPublish publishes 64-byte messages to one topic with n protocol
// v1 subscribers over loopback. The subscribers are raw TCP sockets that
// discard what they read, so that the allocations counted are the
// server's: encoding once, history, queueing to every subscriber and the
// writers. allocs/op must not grow with n.
func BenchmarkPublish(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			var hub *tether.Hub
			s := newHubServer(b,
				tether.WithLimits(tether.Limits{SendQueue: 1 << 16, SendQueueBytes: 64 << 20}),
				OnConnectSubscribe(&hub, "bench"),
			)
			hub = s.hub
			for range n {
				dialDiscard(b, s.URL)
			}
			waitFor(b, 10*time.Second, "subscribers registered", func() bool { return hub.Len() == n })
			msg := []byte(`{"t":1732467891234567890,"i":123,"p":"xxxxxxxxxxxxxxxxxxxxxxxxx"}`)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if err := hub.Publish("bench", msg); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/delivery")
			waitFor(b, 30*time.Second, "queues drained", func() bool { return hub.Stats().QueuedBytes == 0 })
			if st := hub.Stats(); st.Evictions != 0 || st.Conns != n {
				b.Fatalf("stats after the run: %+v", st)
			}
		})
	}
}

// OnConnectSubscribe subscribes every new conn of *hub to topic.
func OnConnectSubscribe(hub **tether.Hub, topic string) tether.HubOption {
	return tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		if err := (*hub).Subscribe(c, topic); err != nil {
			panic(err)
		}
	}})
}

// dialDiscard opens a protocol v1 WebSocket on a raw TCP conn and reads
// and discards everything the server sends, allocating nothing per frame.
// It answers no ping: benchmarks use the default 15 s heartbeat.
func dialDiscard(b testing.TB, httpURL string) {
	b.Helper()
	host := strings.TrimPrefix(httpURL, "http://")
	conn, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		b.Fatalf("dial: %v", err)
	}
	nonce := make([]byte, 16)
	rand.Read(nonce)
	req := fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n\r\n",
		host, base64.StdEncoding.EncodeToString(nonce), tether.Subprotocol)
	if _, err := conn.Write([]byte(req)); err != nil {
		b.Fatalf("write upgrade request: %v", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		b.Fatalf("upgrade: %v %v", resp, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(io.Discard, br)
	}()
	b.Cleanup(func() {
		conn.Close()
		<-done
	})
}
