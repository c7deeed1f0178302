package redisbroker_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/redisbroker"
	"github.com/tether-ws/tether/redisbroker/internal/redistest"
)

// Two hubs, as two processes would have, share a Redis: a publication on
// one reaches a subscriber of the other, and a user on one is online for
// both.
func ExampleNew() {
	dir, _ := os.MkdirTemp("", "redis")
	defer os.RemoveAll(dir)
	srv, err := redistest.Launch(dir) // stands for your Redis
	if err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Stop()

	var hubs [2]*tether.Hub
	for i := range hubs {
		rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
		defer rdb.Close() // after the hub's Shutdown: defers run last first
		linked := make(chan struct{}, 1)
		hub, err := tether.NewHub(
			tether.WithBroker(redisbroker.New(rdb)),
			tether.WithObserver(tether.Observer{Broker: func(err error) {
				if err == nil {
					select {
					case linked <- struct{}{}:
					default:
					}
				}
			}}),
		)
		if err != nil {
			fmt.Println(err)
			return
		}
		defer hub.Shutdown(context.Background())
		<-linked
		hubs[i] = hub
	}

	got := make(chan string, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	peer := httptest.NewServer(hubs[1]) // your http.Server
	defer peer.Close()
	client, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(peer.URL, "http"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer client.Close()
	client.Subscribe(ctx, "news", func(m tether.Message) { got <- string(m.Data) })

	hubs[0].Publish("news", []byte(`"from the other node"`))
	fmt.Println(<-got)
	// Output: "from the other node"
}
