package tether_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// An echo handler with a heartbeat suited to mobile clients: a client that
// vanishes without a FIN is dropped after 10 s of silence.
func ExampleAccept() {
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := tether.Accept(w, r,
			tether.HeartbeatMobile,
			tether.OnMessage(func(c *tether.Conn, m tether.Message) {
				c.Send(context.Background(), m.Data) // echo
			}),
		)
		if err != nil {
			log.Print(err) // Accept has already answered the request
		}
	})
	srv := httptest.NewServer(handler)
	defer srv.Close()

	ctx := context.Background()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer ws.CloseNow()
	ws.Write(ctx, websocket.MessageText, []byte("hello"))
	_, reply, _ := ws.Read(ctx)
	fmt.Println(string(reply))
	ws.Close(websocket.StatusNormalClosure, "")
	// Output: hello
}

// Wrap adds a heartbeat to a conn made with coder/websocket directly. Here
// the peer never answers pings, so it is dropped after the timeout.
func ExampleWrap() {
	wrapped := make(chan *tether.Conn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		c, err := tether.Wrap(ws, tether.WithHeartbeat(20*time.Millisecond, 60*time.Millisecond))
		if err != nil {
			ws.CloseNow()
			return
		}
		wrapped <- c
	}))
	defer srv.Close()

	ctx := context.Background()
	zombie, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), &websocket.DialOptions{
		OnPingReceived: func(context.Context, []byte) bool { return false }, // never pongs
	})
	if err != nil {
		log.Fatal(err)
	}
	defer zombie.CloseNow()
	go zombie.Read(ctx) // keeps reading, so only the missing pongs give it away

	c := <-wrapped
	<-c.Done()
	fmt.Println(errors.Is(c.Err(), tether.ErrHeartbeatTimeout))
	// Output: true
}

// Reasons for the end of a conn are tested with errors.Is; a close by the
// peer is a *CloseError with its code and reason, and every reason reads
// well as it is.
func ExampleConn_Err() {
	ended := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tether.Accept(w, r, tether.WithObserver(tether.Observer{
			Disconnect: func(_ *tether.Conn, reason error) { ended <- reason },
		}))
	}))
	defer srv.Close()

	ws, _, err := websocket.Dial(context.Background(), "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		log.Fatal(err)
	}
	go ws.Read(context.Background())
	ws.Close(websocket.StatusGoingAway, "app closed")

	reason := <-ended
	var ce *tether.CloseError
	switch {
	case errors.Is(reason, tether.ErrHeartbeatTimeout):
		fmt.Println("peer died")
	case errors.As(reason, &ce):
		fmt.Println(ce.Code, ce.Reason)
	}
	fmt.Println(reason)
	// Output:
	// StatusGoingAway app closed
	// tether: peer closed the connection: going away (1001): app closed
}

// A hub behind an existing mux: clients speaking protocol v1 subscribe to
// rooms, and the application publishes to them.
func ExampleHub() {
	hub, err := tether.NewHub(
		tether.HeartbeatInternet,
		tether.WithAuth(func(r *http.Request) (string, error) {
			user := r.URL.Query().Get("user") // use a real token in production
			if user == "" {
				return "", errors.New("no user")
			}
			return user, nil
		}),
	)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/ws", hub)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	defer hub.Close()

	// A protocol v1 client, as the browser client would be.
	ctx := context.Background()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?user=ann",
		&websocket.DialOptions{Subprotocols: []string{tether.Subprotocol}})
	if err != nil {
		log.Fatal(err)
	}
	defer ws.CloseNow()
	// One WebSocket message may carry several protocol messages, one per
	// line: read returns the next line.
	var lines []string
	read := func() string {
		for len(lines) == 0 {
			_, data, err := ws.Read(ctx)
			if err != nil {
				log.Fatal(err)
			}
			lines = strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
		}
		line := lines[0]
		lines = lines[1:]
		return line
	}
	read() // the welcome
	ws.Write(ctx, websocket.MessageText, []byte(`{"op":"sub","topic":"room:42","id":"1"}`))
	ack := read() // with the topic's position: live messages follow it
	fmt.Println(ack[:strings.Index(ack, `,"epoch"`)] + ",...}")
	fmt.Println(read()) // who was in the room
	fmt.Println(read()) // ann's own arrival, announced to the room

	hub.Publish("room:42", []byte(`{"text":"hello"}`))
	m := read()
	fmt.Println(m[:strings.Index(m, `"epoch"`)] + "...")
	// Output:
	// {"op":"ack","id":"1",...}
	// {"op":"presence","topic":"room:42","count":0,"snapshot":true,"joins":[]}
	// {"op":"presence","topic":"room:42","count":1,"joins":[{"user":"ann"}],"leaves":[]}
	// {"op":"msg","topic":"room:42",...
}

// Shutdown with net/http: the server stops accepting and closes its own
// connections, and the hub closes the WebSocket conns it took over, each
// with 1001 and a hint of when to come back. net/http runs the hook in a
// goroutine of its own and does not wait for it: wait for it yourself.
func ExampleHub_Shutdown() {
	hub, err := tether.NewHub()
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Addr: "127.0.0.1:0", Handler: hub}
	hubDone := make(chan struct{})
	srv.RegisterOnShutdown(func() {
		defer close(hubDone)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := hub.Shutdown(ctx); err != nil {
			log.Print(err) // the deadline passed: the rest were dropped
		}
	})
	// go srv.ListenAndServe() ... and on SIGTERM:
	srv.Shutdown(context.Background())
	<-hubDone
	fmt.Println(hub.Len(), errors.Is(hub.Publish("news", []byte(`1`)), tether.ErrHubClosed))
	// Output: 0 true
}

// A client that stays connected: after every reconnect it subscribes
// again from the last message it received, so that it misses nothing.
func ExampleDial() {
	hub, err := tether.NewHub()
	if err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()

	ctx := context.Background()
	client, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"),
		tether.WithObserver(tether.Observer{State: func(s tether.State, err error) { fmt.Println("state:", s) }}),
	)
	if err != nil {
		log.Fatal(err)
	}
	got := make(chan tether.Message, 1)
	if err := client.Subscribe(ctx, "news", func(m tether.Message) { got <- m }); err != nil {
		log.Fatal(err)
	}
	hub.Publish("news", []byte(`{"headline":"tether ships"}`))
	m := <-got
	fmt.Printf("%s #%d %s\n", m.Topic, m.Position.Seq, m.Data)
	client.Close()
	// Output:
	// state: connected
	// news #1 {"headline":"tether ships"}
	// state: closed
}

// A dashboard that shows a topic's current value at once, with no HTTP
// endpoint of its own for it: the topic's last message comes first, then
// the live ones.
func ExampleClient_SubscribeLatest() {
	hub, err := tether.NewHub()
	if err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()
	hub.Publish("price:eur", []byte(`{"bid":1.0839}`))
	hub.Publish("price:eur", []byte(`{"bid":1.0842}`)) // published before the client came

	ctx := context.Background()
	client, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	got := make(chan tether.Message, 2)
	if err := client.SubscribeLatest(ctx, "price:eur", func(m tether.Message) { got <- m }); err != nil {
		log.Fatal(err)
	}
	m := <-got
	fmt.Printf("current #%d %s\n", m.Position.Seq, m.Data)
	hub.Publish("price:eur", []byte(`{"bid":1.0845}`))
	m = <-got
	fmt.Printf("live #%d %s\n", m.Position.Seq, m.Data)
	// Output:
	// current #2 {"bid":1.0842}
	// live #3 {"bid":1.0845}
}

// Every event hook is a field of Observer, and WithObserver may be given
// more than once: here the application's hooks pick a raw peer's topic and
// report its end, beside a second observer that counts connects.
func ExampleWithObserver() {
	var hub *tether.Hub
	var connects atomic.Int64
	subscribed, gone := make(chan struct{}), make(chan error, 1)
	hub, err := tether.NewHub(
		tether.WithLimits(tether.Limits{SendQueue: 64, Overflow: tether.DropOldest}),
		tether.WithObserver(tether.Observer{
			// A raw peer does not subscribe by itself: the server picks.
			Connect: func(c *tether.Conn) {
				hub.Subscribe(c, "news")
				close(subscribed)
			},
			Disconnect: func(c *tether.Conn, reason error) { gone <- reason },
		}),
		tether.WithObserver(tether.Observer{Connect: func(*tether.Conn) { connects.Add(1) }}),
	)
	if err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()

	ctx := context.Background()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		log.Fatal(err)
	}
	<-subscribed
	if err := hub.Publish("news", []byte(`{"headline":"extra!"}`)); err != nil {
		log.Fatal(err)
	}
	_, data, err := ws.Read(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(data), connects.Load())
	go ws.Read(ctx) // for the close handshake
	ws.Close(websocket.StatusNormalClosure, "bye")
	fmt.Println("gone:", <-gone)
	// Output:
	// {"headline":"extra!"} 1
	// gone: tether: client closed the connection: normal closure (1000): bye
}

// Presence per topic: rooms list their members up to 2 here (100 by
// default), streams only count them. A client sees what its topic sends.
func ExampleWithPresence() {
	hub, err := tether.NewHub(
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }),
		tether.WithPresence(func(topic string) tether.PresencePolicy {
			if strings.HasPrefix(topic, "stream:") {
				return tether.PresencePolicy{List: -1} // counts only
			}
			return tether.PresencePolicy{List: 2}
		}),
	)
	if err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()

	ctx := context.Background()
	join := func(user string) *tether.Client {
		c, err := tether.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"?user="+user)
		if err != nil {
			log.Fatal(err)
		}
		for _, topic := range []string{"room:1", "stream:1"} {
			if err := c.Subscribe(ctx, topic, func(tether.Message) {}); err != nil {
				log.Fatal(err)
			}
		}
		return c
	}
	// show waits until ann's client has been told of n users on topic.
	show := func(c *tether.Client, topic string, n int) {
		for {
			members, count := c.Presence(topic)
			if count == n {
				var users []string
				for _, m := range members {
					users = append(users, m.UserID)
				}
				fmt.Printf("%s: %d present, listed %v\n", topic, count, users)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	ann := join("ann")
	defer ann.Close()
	bob := join("bob")
	defer bob.Close()
	show(ann, "room:1", 2)
	show(ann, "stream:1", 2)
	cat := join("cat")
	defer cat.Close()
	show(ann, "room:1", 3)
	fmt.Println("hub:", hub.PresenceCount("room:1"), "in room:1")
	// Output:
	// room:1: 2 present, listed [ann bob]
	// stream:1: 2 present, listed []
	// room:1: 3 present, listed []
	// hub: 3 in room:1
}

// Bytes and text keep their type end to end: a raw peer gets the bytes in
// a binary message, a Client a Message with Binary set.
func ExampleHub_PublishBinary() {
	var hub *tether.Hub
	subscribed := make(chan struct{})
	hub, err := tether.NewHub(tether.WithObserver(tether.Observer{Connect: func(c *tether.Conn) {
		if c.Subprotocol() == "" {
			hub.Subscribe(c, "cam:1") // a raw peer: the server picks its topics
			close(subscribed)
		}
	}}))
	if err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()
	url := "ws" + strings.TrimPrefix(srv.URL, "http")

	ctx := context.Background()
	got := make(chan tether.Message, 2)
	c, err := tether.Dial(ctx, url)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	if err := c.Subscribe(ctx, "cam:1", func(m tether.Message) { got <- m }); err != nil {
		log.Fatal(err)
	}
	raw, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer raw.CloseNow()
	<-subscribed

	hub.PublishBinary("cam:1", []byte{0xff, 0xd8, 0x00})
	hub.Publish("cam:1", []byte("frame 2 follows"))
	for range 2 {
		m := <-got
		fmt.Printf("client: binary=%v % x\n", m.Binary, m.Data)
	}
	for range 2 {
		typ, data, err := raw.Read(ctx)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("raw peer: %v % x\n", typ, data)
	}
	// Output:
	// client: binary=true ff d8 00
	// client: binary=false 66 72 61 6d 65 20 32 20 66 6f 6c 6c 6f 77 73
	// raw peer: MessageBinary ff d8 00
	// raw peer: MessageText 66 72 61 6d 65 20 32 20 66 6f 6c 6c 6f 77 73
}

// A user's inbox: what the server sends to the user while the user is away
// (or while the user's conn is dying unnoticed) waits until a client of the
// user has handed it to the application; the client acknowledges it, and
// drops a replay of what it had.
func ExampleClient_inbox() {
	hub, err := tether.NewHub(
		tether.WithInbox(adapter.NewMemoryInbox(1000, 24*time.Hour, 64<<20)),
		tether.WithAuth(func(r *http.Request) (string, error) { return r.URL.Query().Get("user"), nil }), // for the example only
	)
	if err != nil {
		log.Fatal(err)
	}
	srv := httptest.NewServer(hub)
	defer srv.Close()
	defer hub.Close()

	// Sent while ann has no conn: kept in her inbox.
	hub.SendToUser("ann", []byte(`{"text":"while you were away"}`))
	hub.SendToUser("ann", []byte(`{"text":"and this too"}`))

	got := make(chan tether.Message, 2)
	client, err := tether.Dial(context.Background(), "ws"+strings.TrimPrefix(srv.URL, "http")+"?user=ann",
		tether.OnMessage(func(_ *tether.Conn, m tether.Message) { got <- m }),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	for range 2 {
		m := <-got
		fmt.Printf("#%d %s\n", m.Position.Seq, m.Data)
	}
	// Output:
	// #1 {"text":"while you were away"}
	// #2 {"text":"and this too"}
}
