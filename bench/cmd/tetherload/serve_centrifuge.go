package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/prometheus/client_golang/prometheus"
)

// centrifugeServer is centrifugal/centrifuge set up as its README's minimal
// server: a Node with the default memory broker, OnConnecting granting an
// anonymous credential, OnConnect letting the client subscribe (here to
// the bench channel only), and NewWebsocketHandler on /sub.
//
// Heartbeat: the websocket handler's PingPongConfig, PingInterval =
// interval and PongTimeout = timeout-interval; centrifuge's pings are
// application messages ({} in JSON) that the client answers with {}, and a
// client that has not answered the last ping PongTimeout after it is
// disconnected with DisconnectNoPong: that is a heartbeat death. Pongs are
// not observable: centrifuge handles them inside the client and offers no
// hook, so heartbeat_pongs stays 0 and last_pong_ns is 0. Queue: centrifuge
// bounds each client's queue in bytes (Config.ClientQueueMaxSize, 1 MiB by
// default, the same byte bound tether has), not in messages, so -queue does
// not apply; hub_evictions counts clients disconnected as slow
// (DisconnectSlow, queue full) or for a failed write (DisconnectWriteError,
// mostly the handler's 1 s write timeout). Publish: node.Publish, which
// goes through the memory broker to the hub's subscribers.
//
// Accepts are counted in OnConnect, when the client has sent its connect
// command, and ends in the client's OnDisconnect, which centrifuge calls
// only for connected clients: an upgrade whose client never connects is in
// neither. OnDisconnect, and so the end's time in /events, comes after
// centrifuge has closed the transport, which waits up to 5 s (its
// closeFrameWait) for the client's close frame: a peer that reads nothing
// any more is reported dead that long after centrifuge dropped it from its
// hub. That is when an application using centrifuge learns of it.
//
// centrifuge-go answers pings only when the connect reply announces a ping
// interval, in whole seconds: below a 1 s interval its clients never answer
// and are all dropped as no pong. serve warns of that, and of a PongTimeout
// centrifuge does not check (see newCentrifugeServer).
type centrifugeServer struct {
	log  *serveLog
	node *centrifuge.Node
	ws   http.Handler

	lastEnd atomic.Int64 // Unix ns of the latest OnDisconnect, for close
}

// centrifugeRemoteKey carries the peer's address from the HTTP request to
// OnConnect, through the client's context.
type centrifugeRemoteKey struct{}

const centrifugeChannel = "bench"

func newCentrifugeServer(cfg serveConfig, log *serveLog, stderr io.Writer) (serveImpl, error) {
	node, err := centrifuge.New(centrifuge.Config{
		LogLevel: centrifuge.LogLevelNone,
		// A registry of its own, not Prometheus's global one that every node
		// of the process (the tests make several) would share.
		Metrics: centrifuge.MetricsConfig{RegistererGatherer: prometheus.NewRegistry()},
	})
	if err != nil {
		return nil, err
	}
	s := &centrifugeServer{log: log, node: node}
	node.OnConnecting(func(context.Context, centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: ""}}, nil
	})
	node.OnConnect(func(client *centrifuge.Client) {
		remote, _ := client.Context().Value(centrifugeRemoteKey{}).(string)
		rec := log.accept(remote)
		client.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			if e.Channel != centrifugeChannel {
				cb(centrifuge.SubscribeReply{}, centrifuge.ErrorPermissionDenied)
				return
			}
			cb(centrifuge.SubscribeReply{}, nil)
		})
		client.OnDisconnect(func(e centrifuge.DisconnectEvent) {
			switch e.Code {
			case centrifuge.DisconnectSlow.Code, centrifuge.DisconnectWriteError.Code:
				log.evict(1)
			}
			log.end(rec, e.Code == centrifuge.DisconnectNoPong.Code)
			s.lastEnd.Store(time.Now().UnixNano())
		})
	})
	if err := node.Run(); err != nil {
		_ = node.Shutdown(context.Background())
		return nil, err
	}
	pp := centrifuge.PingPongConfig{PingInterval: cfg.interval, PongTimeout: cfg.timeout - cfg.interval}
	if pp.PongTimeout > pp.PingInterval {
		// Each ping pushes the pending pong check back by PongTimeout: with
		// PongTimeout > PingInterval the check never runs and no silent
		// client is ever dropped (centrifuge warns from PongTimeout ==
		// PingInterval on, as with -timeout 2*interval, the default: the
		// check then runs, because its time is taken a few nanoseconds
		// before the next ping's).
		fmt.Fprintf(stderr, "tetherload serve: centrifuge: pong timeout %v (timeout-interval) is not below the ping interval %v: centrifuge will not drop silent clients\n",
			pp.PongTimeout, pp.PingInterval)
	}
	if pp.PingInterval < time.Second {
		// The connect reply tells the client the ping interval in whole
		// seconds; centrifuge-go answers pings only when it is above 0.
		fmt.Fprintf(stderr, "tetherload serve: centrifuge: ping interval %v is below 1s: centrifuge-go clients will not answer pings and will be dropped\n",
			pp.PingInterval)
	}
	s.ws = centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{PingPongConfig: pp})
	return s, nil
}

func (s *centrifugeServer) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /sub", func(w http.ResponseWriter, r *http.Request) {
		s.ws.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), centrifugeRemoteKey{}, r.RemoteAddr)))
	})
}

func (s *centrifugeServer) publish(_ string, msg []byte) error {
	_, err := s.node.Publish(centrifugeChannel, msg)
	return err
}

func (s *centrifugeServer) fill(st *Stats) {
	st.HubConns = int64(s.node.Hub().NumSubscribers(centrifugeChannel))
}

// close is the node's Shutdown: it disconnects every client, waiting for
// their close handshakes (up to 5 s each for a dead peer, in parallel),
// and stops the node's goroutines, but one: when a channel loses its last
// subscriber, centrifuge queues a job that sleeps a second before
// unsubscribing the node from the broker, and Shutdown does not wait for
// it. close waits for it: a second after the last client ended, which was
// after its channels were left.
func (s *centrifugeServer) close(ctx context.Context) error {
	if err := s.node.Shutdown(ctx); err != nil {
		return err
	}
	if last := s.lastEnd.Load(); last != 0 {
		t := time.NewTimer(time.Until(time.Unix(0, last).Add(time.Second + 100*time.Millisecond)))
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
