package main

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// gorillaServer is the design most Go WebSocket servers start from: the hub
// of gorilla/websocket's chat example (examples/chat), written for the
// benchmark. One hub goroutine owns the set of clients and serialises
// register, unregister and broadcast through channels; each client has a
// readPump and a writePump goroutine and a buffered send channel.
//
// Heartbeat: writePump pings every interval (a ticker per conn); readPump
// sets the read deadline to now+timeout at start and on every pong, so a
// silent peer's read fails with a timeout about timeout after its last
// pong: that timeout is a heartbeat death. Queue: send has -queue slots, and
// the hub drops (closes send of) a client whose channel is full, as the
// example does: hub_evictions counts those, and conns whose write timed out
// (writeWait). Publish: a send on the hub's unbuffered broadcast channel,
// which returns once the hub goroutine has taken the message, before it has
// been queued for every client.
type gorillaServer struct {
	log      *serveLog
	upgrader websocket.Upgrader
	interval time.Duration
	timeout  time.Duration
	queue    int

	clients    map[*gorillaPeer]bool // owned by run
	register   chan *gorillaPeer
	unregister chan *gorillaPeer
	broadcast  chan []byte
	quit       chan struct{} // closed by close: run drops every client and returns
	done       chan struct{} // closed when run has returned
	registered atomic.Int64  // len(clients), for /stats

	handlers serveGate      // upgrade handlers under way
	pumps    sync.WaitGroup // every readPump and writePump

	// Every client whose pumps run, registered or not: the hub forgets a
	// client it drops, whose writePump may then be stuck for writeWait in a
	// write to a peer that does not read, and close must drop it too.
	peersMu sync.Mutex
	peers   map[*gorillaPeer]struct{}
}

// gorillaPeer is one client of the hub.
type gorillaPeer struct {
	srv     *gorillaServer
	conn    *websocket.Conn
	send    chan []byte
	rec     *serveConn
	evicted atomic.Bool // counted in hub_evictions already
}

const (
	// gorillaWriteWait is the example's time allowed to write a message (or
	// a ping) to the peer.
	gorillaWriteWait = 10 * time.Second
	// gorillaMaxMessageSize is the example's read limit; load clients send
	// nothing.
	gorillaMaxMessageSize = 512
)

func newGorillaServer(cfg serveConfig, log *serveLog, _ io.Writer) (serveImpl, error) {
	s := &gorillaServer{
		log: log,
		// The example's buffer sizes.
		upgrader:   websocket.Upgrader{ReadBufferSize: 1024, WriteBufferSize: 1024},
		interval:   cfg.interval,
		timeout:    cfg.timeout,
		queue:      cfg.queue,
		clients:    make(map[*gorillaPeer]bool),
		register:   make(chan *gorillaPeer),
		unregister: make(chan *gorillaPeer),
		broadcast:  make(chan []byte),
		quit:       make(chan struct{}),
		done:       make(chan struct{}),
		peers:      make(map[*gorillaPeer]struct{}),
	}
	go s.run()
	return s, nil
}

func (s *gorillaServer) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /sub", s.serveWs)
}

// run is the example's Hub.run, plus a way out for shutdown.
func (s *gorillaServer) run() {
	defer close(s.done)
	for {
		select {
		case c := <-s.register:
			s.clients[c] = true
			s.registered.Add(1)
		case c := <-s.unregister:
			if _, ok := s.clients[c]; ok {
				delete(s.clients, c)
				close(c.send)
				s.registered.Add(-1)
			}
		case msg := <-s.broadcast:
			for c := range s.clients {
				select {
				case c.send <- msg:
				default:
					close(c.send)
					delete(s.clients, c)
					s.registered.Add(-1)
					c.evict()
				}
			}
		case <-s.quit:
			for c := range s.clients {
				// close(send) wakes writePump, which may be idle until its
				// next ping; Close fails its reads and writes at once.
				close(c.send)
				_ = c.conn.Close()
				delete(s.clients, c)
			}
			s.registered.Store(0)
			return
		}
	}
}

func (s *gorillaServer) publish(_ string, msg []byte) error {
	select {
	case s.broadcast <- msg:
		return nil
	case <-s.done:
		return errServeClosed
	}
}

func (s *gorillaServer) fill(st *Stats) {
	st.HubConns = s.registered.Load()
}

// serveWs is the example's handler: upgrade, register, start the pumps.
func (s *gorillaServer) serveWs(w http.ResponseWriter, r *http.Request) {
	if !s.handlers.enter() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	defer s.handlers.leave()
	conn, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade has answered the request
	}
	c := &gorillaPeer{srv: s, conn: conn, send: make(chan []byte, s.queue), rec: s.log.accept(r.RemoteAddr)}
	select {
	case s.register <- c:
	case <-s.done:
		_ = conn.Close()
		s.log.end(c.rec, false)
		return
	}
	s.peersMu.Lock()
	s.peers[c] = struct{}{}
	s.peersMu.Unlock()
	s.pumps.Add(2)
	go c.writePump()
	go c.readPump()
}

// evict counts c in hub_evictions, once.
func (c *gorillaPeer) evict() {
	if c.evicted.CompareAndSwap(false, true) {
		c.srv.log.evict(1)
	}
}

// readPump reads until the conn fails: it is where the heartbeat's read
// deadline fires, so it is where the conn's end is logged.
func (c *gorillaPeer) readPump() {
	s := c.srv
	defer s.pumps.Done()
	defer func() {
		select {
		case s.unregister <- c:
		case <-s.done:
		}
		_ = c.conn.Close()
		s.peersMu.Lock()
		delete(s.peers, c)
		s.peersMu.Unlock()
	}()
	c.conn.SetReadLimit(gorillaMaxMessageSize)
	_ = c.conn.SetReadDeadline(time.Now().Add(s.timeout))
	c.conn.SetPongHandler(func(string) error {
		s.log.pong(c.rec)
		return c.conn.SetReadDeadline(time.Now().Add(s.timeout))
	})
	for {
		if _, _, err := c.conn.ReadMessage(); err != nil {
			// Only the read deadline makes a read time out: writePump's
			// failures close the conn, which fails the read otherwise.
			var ne net.Error
			s.log.end(c.rec, errors.As(err, &ne) && ne.Timeout())
			return
		}
		// Load clients send nothing; the chat example would broadcast here.
	}
}

// writePump sends what the hub queues, several queued messages to a frame
// separated by '\n' as the example does, and the pings.
func (c *gorillaPeer) writePump() {
	s := c.srv
	ticker := time.NewTicker(s.interval)
	defer s.pumps.Done()
	defer func() {
		ticker.Stop()
		_ = c.conn.Close()
	}()
	for {
		select {
		case msg, ok := <-c.send:
			_ = c.conn.SetWriteDeadline(time.Now().Add(gorillaWriteWait))
			if !ok {
				// The hub closed the channel.
				_ = c.conn.WriteMessage(websocket.CloseMessage, []byte{})
				return
			}
			w, err := c.conn.NextWriter(websocket.TextMessage)
			if err != nil {
				c.writeFailed(err)
				return
			}
			_, _ = w.Write(msg)
			// Add the messages queued meanwhile to the same frame.
			for range len(c.send) {
				_, _ = w.Write([]byte{'\n'})
				_, _ = w.Write(<-c.send)
			}
			if err := w.Close(); err != nil {
				c.writeFailed(err)
				return
			}
		case <-ticker.C:
			if err := c.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(gorillaWriteWait)); err != nil {
				c.writeFailed(err)
				return
			}
		}
	}
}

// writeFailed counts a write that timed out as an eviction: the peer is not
// reading, as for a full send channel.
func (c *gorillaPeer) writeFailed(err error) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.evict()
	}
}

// close refuses new conns, stops the hub (which closes its clients' send
// channels and conns), closes the conns of the clients it had dropped
// already, and waits for every pump to return.
func (s *gorillaServer) close(ctx context.Context) error {
	s.handlers.shut()
	// Handlers under way register before the hub stops, or see it stopped.
	err := s.handlers.wait(ctx)
	close(s.quit)
	<-s.done
	s.peersMu.Lock()
	for c := range s.peers {
		_ = c.conn.Close()
	}
	s.peersMu.Unlock()
	done := make(chan struct{})
	go func() {
		s.pumps.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		err = errors.Join(err, ctx.Err())
	}
	return err
}
