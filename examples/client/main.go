// Command client shows tether's reconnecting Go client at work: it
// connects to a hub, subscribes to a topic, and prints every message and
// every change of connection state.
//
//	go run ./examples/client                              # against a demo hub of its own
//	go run ./examples/client -url ws://host:8080/ws -topic news
//
// Without -url it starts a demo hub that publishes a tick every 200 ms
// and restarts every 3 s, keeping its history across restarts, as a
// deploy would. Watch the client reconnect and resume: each message's seq
// follows the last one's, none missed, none repeated.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

func main() {
	url := flag.String("url", "", "hub to connect to; empty starts a demo hub")
	topic := flag.String("topic", "ticks", "topic to subscribe to")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var wg sync.WaitGroup
	if *url == "" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			log.Error("demo hub", "err", err)
			os.Exit(1)
		}
		*url = "ws://" + ln.Addr().String() + "/ws"
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := demo(ctx, ln, *topic, 200*time.Millisecond, 3*time.Second); err != nil {
				log.Error("demo hub", "err", err)
				stop()
			}
		}()
		fmt.Printf("demo hub on %s: a tick every 200 ms, a restart every 3 s\n", *url)
	}
	err := run(ctx, *url, *topic, os.Stdout)
	stop()
	wg.Wait()
	if err != nil {
		log.Error("client", "err", err)
		os.Exit(1)
	}
}

// run connects to url, subscribes to topic and prints what happens until
// ctx ends.
func run(ctx context.Context, url, topic string, out io.Writer) error {
	var mu sync.Mutex // out is written from the client's goroutines
	printf := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(out, format, args...)
	}
	c, err := tether.Dial(ctx, url,
		tether.WithObserver(tether.Observer{State: func(s tether.State, err error) {
			if err != nil {
				printf("state: %v (%v)\n", s, err)
				return
			}
			printf("state: %v\n", s)
		}}),
		tether.WithObserver(tether.Observer{Resync: func(topic string) {
			printf("resync: %s missed more than the server keeps; reload it\n", topic)
		}}),
		tether.OnMessage(func(_ *tether.Conn, m tether.Message) { printf("direct: %s\n", m.Data) }),
	)
	if err != nil {
		return err
	}
	defer c.Close()

	var last tether.Position
	err = c.Subscribe(ctx, topic, func(m tether.Message) {
		note := ""
		if last.Epoch == m.Position.Epoch && m.Position.Seq != last.Seq+1 {
			note = fmt.Sprintf(" (gap: the last was %d)", last.Seq)
		}
		last = m.Position
		printf("%s #%d %s%s\n", m.Topic, m.Position.Seq, m.Data, note)
	})
	if err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}

// demo serves a hub on ln that publishes to topic every tick and is
// replaced by a new one every restart, with the same history: what
// clients see of a deploy. It returns when ctx ends.
func demo(ctx context.Context, ln net.Listener, topic string, tick, restart time.Duration) error {
	addr := ln.Addr().String()
	history := adapter.NewMemoryHistory(1000, time.Minute)
	n := 0
	for {
		hub, err := tether.NewHub(tether.WithHistory(history))
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: hub}
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ln) }()

		ticker := time.NewTicker(tick)
		end := time.After(restart)
	publishing:
		for {
			select {
			case <-ticker.C:
				n++
				hub.Publish(topic, fmt.Appendf(nil, `{"tick":%d,"at":%q}`, n, time.Now().Format(time.TimeOnly)))
			case <-end:
				break publishing
			case <-ctx.Done():
				break publishing
			}
		}
		ticker.Stop()
		// Going away, as a deploy does: clients get 1001 and a hint of
		// when to come back.
		srv.Close()
		shutdown, cancel := context.WithTimeout(context.Background(), time.Second)
		hub.Shutdown(shutdown)
		cancel()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		if ln, err = net.Listen("tcp", addr); err != nil {
			return err
		}
	}
}
