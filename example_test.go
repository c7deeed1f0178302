package tether_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/tether-ws/tether"
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
// peer carries its close code.
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
	switch {
	case errors.Is(reason, tether.ErrHeartbeatTimeout):
		fmt.Println("peer died")
	case websocket.CloseStatus(reason) != -1:
		fmt.Println("peer closed with", websocket.CloseStatus(reason))
	}
	// Output: peer closed with StatusGoingAway
}
