// Command echo is a WebSocket echo server with heartbeats: every message a
// client sends comes back to it, and a client that goes silent is pinged and,
// if it stays silent, dropped. It logs every connect and disconnect with the
// reason and the measured round-trip time.
//
//	go run ./examples/echo -addr 127.0.0.1:8080 -interval 5s -timeout 10s
//
// Then open http://127.0.0.1:8080/ in a browser, or connect any WebSocket
// client to ws://127.0.0.1:8080/ws.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	interval := flag.Duration("interval", 15*time.Second, "ping a client after this much silence")
	timeout := flag.Duration("timeout", 30*time.Second, "drop a client after this much silence")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := func() error {
		if *interval <= 0 || *timeout <= *interval {
			return fmt.Errorf("need 0 < -interval < -timeout, got %v and %v", *interval, *timeout)
		}
		ln, err := net.Listen("tcp", *addr)
		if err != nil {
			return err
		}
		return serve(ctx, ln, *interval, *timeout, log)
	}()
	if err != nil {
		log.Error("echo", "err", err)
		os.Exit(1)
	}
}

// serve runs the echo server on ln until ctx ends, then closes every conn
// with 1001 (going away) and returns.
func serve(ctx context.Context, ln net.Listener, interval, timeout time.Duration, log *slog.Logger) error {
	var conns sync.Map // *tether.Conn -> struct{}, for a graceful shutdown
	opts := []tether.ServerOption{
		tether.WithHeartbeat(interval, timeout),
		tether.OnMessage(func(c *tether.Conn, m tether.Message) {
			if err := c.Send(context.Background(), m.Data); err != nil {
				log.Warn("echo", "remote", c.RemoteAddr(), "err", err)
			}
		}),
		tether.WithObserver(tether.Observer{
			Disconnect: func(c *tether.Conn, reason error) {
				conns.Delete(c)
				log.Info("disconnect", "remote", c.RemoteAddr(), "reason", reason, "rtt", c.RTT())
			},
			Suspect: func(c *tether.Conn) {
				log.Info("suspect", "remote", c.RemoteAddr(), "silent", time.Since(c.LastSeen()).Round(time.Millisecond))
			},
		}),
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := tether.Accept(w, r, opts...)
		if err != nil {
			log.Warn("accept", "remote", r.RemoteAddr, "err", err)
			return
		}
		conns.Store(c, struct{}{})
		log.Info("connect", "remote", c.RemoteAddr())
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write([]byte(page))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("listening", "addr", "http://"+ln.Addr().String()+"/", "interval", interval, "timeout", timeout)

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	// Hijacked conns outlive http.Server.Shutdown: close them ourselves.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(shutdownCtx)
	<-errc // Serve has returned
	conns.Range(func(k, _ any) bool {
		c := k.(*tether.Conn)
		c.Close(websocket.StatusGoingAway, "server shutting down")
		<-c.Done()
		return true
	})
	return err
}

const page = `<!doctype html>
<title>tether echo</title>
<p>State: <b id="state">connecting</b></p>
<form id="f"><input id="msg" autofocus placeholder="say something"> <button>send</button></form>
<pre id="log"></pre>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
const log = (s) => document.getElementById("log").textContent += s + "\n";
ws.onopen = () => document.getElementById("state").textContent = "open";
ws.onclose = (e) => document.getElementById("state").textContent = "closed (" + e.code + ")";
ws.onmessage = (e) => log("echo: " + e.data);
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  const m = document.getElementById("msg");
  ws.send(m.value); m.value = "";
};
</script>
`
