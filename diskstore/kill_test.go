package diskstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// TestKill9 runs a hub over the store in another process, kills it with
// SIGKILL while two publishers publish, starts it again on the same file
// and address, twice, and checks that the subscribers, which reconnect by
// themselves, got every acknowledged publication once, in order, in the
// topic's one epoch, without a resync: they resumed from the file. And
// that direct messages kept for a user who was away survive the kills and
// reach the user once.
//
// One publisher speaks the protocol over a bare WebSocket, so that the
// test knows which publications were acknowledged; the other is a
// tether.Client, whose Publish does not wait for the ack: of its
// publications the test checks that every one arrives, in order.
//
// A publication that was in flight at a kill (sent, not acknowledged) is
// sent again by either publisher on its next conn, with the same id, as
// PROTOCOL.md asks. The hub remembers ids in the store (the history is an
// adapter.Deduper, dedupe.go): if the dead hub had committed the
// publication, its id went to disk with it, and the new hub acks the
// repeat without publishing it again. So each publication arrives exactly
// once; TestKill9ResentPublication shows the repeat of a committed one
// every time.
func TestKill9(t *testing.T) {
	const (
		n     = 300 // publications per publisher
		subs  = 3
		kills = 2
	)
	start := time.Now()
	path := tempPath(t)
	proc := startHelper(t, path, "127.0.0.1:0")
	addr := proc.addr

	// Direct messages for a user who is away: kept in the store.
	proc.sendToUser(t, "away", `{"dm":1}`)
	proc.sendToUser(t, "away", `{"dm":2}`)

	subscribers := make([]*subscriber, subs)
	for i := range subscribers {
		subscribers[i] = newSubscriber(t, proc.url(fmt.Sprintf("sub%d", i)), "raw", "client")
	}

	stop := make(chan struct{})
	var bg sync.WaitGroup
	t.Cleanup(func() {
		close(stop)
		bg.Wait()
	})

	// The tether.Client publisher, publishing "client" 1 to n, paced to
	// last about as long as the raw one.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pubClient, err := tether.Dial(ctx, proc.url("pub-client"), fastBackoff)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pubClient.Close() })
	var clientPublished atomic.Int64
	bg.Go(func() {
		for i := 1; i <= n; {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			err := pubClient.Publish(context.Background(), "client", fmt.Appendf(nil, `{"n":%d}`, i))
			if err != nil {
				continue // ErrQueueFull while the hub is away: again later
			}
			clientPublished.Store(int64(i))
			i++
		}
	})

	// The killer: once the raw publisher has had k*n/(kills+1) acks, it
	// kills the hub, whatever is in flight.
	var acked atomic.Int64
	var dups atomic.Int64 // repeats acked without a publication, by the processes killed
	procs := make(chan *helperProc, 1)
	killed := make(chan struct{}, 1)
	procs <- proc
	bg.Go(func() {
		for k := 1; k <= kills; k++ {
			var p *helperProc
			select {
			case p = <-procs:
			case <-stop:
				return
			}
			for acked.Load() < int64(k*n/(kills+1)) {
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
			dups.Add(max(p.duplicates(), 0))
			p.kill()
			killed <- struct{}{}
		}
	})

	// The raw publisher, "raw" 1 to n, each once acknowledged; after a
	// lost conn it waits for the kill, starts the hub again, and sends
	// the unacknowledged publication again.
	raw := newRawPublisher(proc.url("pub-raw"))
	raw.connect(t)
	defer raw.close()
	attempts := make([]int, n+1)
	restarts := 0
	for i := 1; i <= n; i++ {
		attempts[i]++
		for !raw.publish(t, "raw", i) {
			select {
			case <-killed:
			case <-time.After(10 * time.Second):
				t.Fatal("the raw publisher lost its conn, and no kill came")
			}
			restarts++
			proc = startHelper(t, path, addr)
			if restarts < kills {
				procs <- proc
			}
			raw.close()
			raw.connect(t)
			attempts[i]++
		}
		acked.Store(int64(i))
	}
	if restarts != kills {
		t.Fatalf("%d restarts, want %d", restarts, kills)
	}
	for deadline := time.Now().Add(30 * time.Second); clientPublished.Load() < n; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the client publisher published %d in 30 s, want %d", clientPublished.Load(), n)
		}
	}
	for _, s := range subscribers {
		s.awaitDistinct(t, "raw", n, 30*time.Second)
		s.awaitDistinct(t, "client", n, 30*time.Second)
	}
	time.Sleep(300 * time.Millisecond) // for any late repeat

	// What each subscriber got.
	resent := 0
	for i := 1; i <= n; i++ {
		if attempts[i] > 1 {
			resent++
		}
	}
	var ref map[string][]tether.Message // subscriber 0's, by topic
	for si, s := range subscribers {
		s.mu.Lock()
		resyncs := slices.Clone(s.resyncs)
		s.mu.Unlock()
		if len(resyncs) > 0 {
			t.Errorf("subscriber %d resynced %v: it should have resumed", si, resyncs)
		}
		for _, topic := range []string{"raw", "client"} {
			msgs := s.messages(topic)
			// One epoch, seqs 1, 2, 3... : the topic's history went on
			// across the kills.
			for j, m := range msgs {
				if m.Position.Epoch != msgs[0].Position.Epoch || m.Position.Seq != uint64(j+1) {
					t.Errorf("subscriber %d, %s: message %d at %+v after %+v: want one epoch and consecutive seqs from 1", si, topic, j, m.Position, msgs[0].Position)
					break
				}
			}
			// The data: 1 to n in order, each once, publications sent
			// again after a kill too.
			count := make(map[int]int)
			next := 1
			for _, m := range msgs {
				var v int
				if _, err := fmt.Sscanf(string(m.Data), `{"n":%d}`, &v); err != nil || v < 1 || v > n {
					t.Fatalf("subscriber %d, %s: unexpected data %q", si, topic, m.Data)
				}
				count[v]++
				if count[v] == 1 {
					if v != next {
						t.Errorf("subscriber %d, %s: %d arrived first where %d was due", si, topic, v, next)
					}
					next = v + 1
				}
			}
			for v := 1; v <= n; v++ {
				switch {
				case count[v] == 0:
					t.Errorf("subscriber %d, %s: publication %d lost", si, topic, v)
				case count[v] > 1:
					t.Errorf("subscriber %d, %s: publication %d arrived %d times (sent %d times by the raw publisher): "+
						"the new hub did not know its id", si, topic, v, count[v], attempts[v])
				}
			}
			// Every subscriber got the same stream.
			if si == 0 {
				if ref == nil {
					ref = make(map[string][]tether.Message)
				}
				ref[topic] = msgs
			} else if !sameStream(ref[topic], msgs) {
				t.Errorf("subscriber %d, %s: %d messages, other than subscriber 0's %d", si, topic, len(msgs), len(ref[topic]))
			}
		}
	}

	// The user who was away connects after the kills: the direct messages
	// kept before them arrive, once.
	away := newAwayUser(t, proc.url("away"))
	away.await(t, 2)
	time.Sleep(200 * time.Millisecond)
	if got := away.all(); !slices.Equal(got, []string{`{"dm":1}`, `{"dm":2}`}) {
		t.Errorf("the user who was away got %q, want the 2 direct messages once, in order", got)
	}
	away.cl.Close()
	again := newAwayUser(t, proc.url("away"))
	time.Sleep(300 * time.Millisecond)
	if got := again.all(); len(got) != 0 {
		t.Errorf("the user's next conn got %q, want nothing: the messages were taken", got)
	}

	dups.Add(max(proc.duplicates(), 0))
	proc.stop(t)
	t.Logf("%d kills in %v; %d subscribers × 2 topics × %d publications; raw publications sent again after a kill: %d; "+
		"repeats the new hubs acked without publishing them (committed before the kill): %d; each arrived once",
		kills, time.Since(start).Round(time.Millisecond), subs, n, resent, dups.Load())
}

// TestKill9ResentPublication shows what the hub does with a publication
// that it committed just before it was killed, before its ack reached the
// client: the client sends it again after reconnecting, with the same id
// (PROTOCOL.md "pub"; tether.Client does so, reconnect.go, Client.lost).
// The hub's history, the store, remembers the ids it was given
// (dedupe.go), and the id went to disk in the commit of the publication:
// the new hub acks the repeat and does not publish it again. A kill cannot
// be timed into that window, so the publisher here acts as if the ack had
// been lost: it does not read it. The subscriber gets the message once.
func TestKill9ResentPublication(t *testing.T) {
	path := tempPath(t)
	proc := startHelper(t, path, "127.0.0.1:0")
	sub := newSubscriber(t, proc.url("sub"), "dup")
	raw := newRawPublisher(proc.url("pub"))
	raw.connect(t)
	defer raw.close()
	if !raw.publish(t, "dup", 1) {
		t.Fatal("publication 1 not acknowledged")
	}
	id := raw.send("dup", 2)
	sub.awaitDistinct(t, "dup", 2, 10*time.Second) // so it is in the store
	proc.kill()
	<-raw.failed

	proc = startHelper(t, path, proc.addr)
	raw.close()
	raw.connect(t)
	raw.send("dup", 2) // again, with the same id
	if !raw.awaitAck(t, id) {
		t.Fatal("publication 2, sent again, not acknowledged")
	}
	if !raw.publish(t, "dup", 3) {
		t.Fatal("publication 3 not acknowledged")
	}
	sub.awaitDistinct(t, "dup", 3, 10*time.Second)
	time.Sleep(300 * time.Millisecond)

	var got []string
	for i, m := range sub.messages("dup") {
		got = append(got, string(m.Data))
		if m.Position.Seq != uint64(i+1) {
			t.Errorf("message %d at seq %d: want consecutive seqs, one epoch", i, m.Position.Seq)
		}
	}
	sub.mu.Lock()
	resyncs := slices.Clone(sub.resyncs)
	sub.mu.Unlock()
	if len(resyncs) > 0 {
		t.Errorf("resyncs %v: the subscriber should have resumed", resyncs)
	}
	want := []string{`{"n":1}`, `{"n":2}`, `{"n":3}`}
	if !slices.Equal(got, want) {
		t.Errorf("the subscriber got %q; want %q: publication 2, committed before the kill and sent again after it "+
			"with the same id, must be published once", got, want)
	}
	proc.stop(t)
}

// sameStream reports whether a and b are the same messages.
func sameStream(a, b []tether.Message) bool {
	return slices.EqualFunc(a, b, func(x, y tether.Message) bool {
		return x.Position == y.Position && string(x.Data) == string(y.Data)
	})
}

// awayUser is a client of a user who receives direct messages.
type awayUser struct {
	cl   *tether.Client
	mu   sync.Mutex
	msgs []string
}

func newAwayUser(t *testing.T, url string) *awayUser {
	t.Helper()
	u := &awayUser{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := tether.Dial(ctx, url, fastBackoff, tether.OnMessage(func(_ *tether.Conn, m tether.Message) {
		u.mu.Lock()
		u.msgs = append(u.msgs, string(m.Data))
		u.mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	u.cl = cl
	return u
}

func (u *awayUser) all() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.msgs)
}

func (u *awayUser) await(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(u.all()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the user got %q in 10 s, want %d messages", u.all(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestKill9Inbox kills the process with SIGKILL while users' messages are
// appended to the store's Inbox, each call answered once Append returned,
// and starts it again on the same file: every message whose Append
// returned is still pending, in order, at its seq, in the user's epoch
// from before the kill, and the seqs go on from there.
func TestKill9Inbox(t *testing.T) {
	const users = 4
	path := tempPath(t)
	proc := startHelper(t, path, "127.0.0.1:0")
	// No keep-alive: the test leaves no conn behind.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	// appendMsg appends data for user, and reports the position, or false
	// when the process did not answer.
	appendMsg := func(addr, user, data string) (adapter.Position, bool) {
		resp, err := client.Get("http://" + addr + "/inbox?" + url.Values{"user": {user}, "data": {data}}.Encode())
		if err != nil {
			return adapter.Position{}, false
		}
		defer resp.Body.Close()
		var pos adapter.Position
		if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&pos) != nil {
			return adapter.Position{}, false
		}
		return pos, true
	}

	// Each user's messages 1, 2, 3... until the kill.
	acked := make([][]adapter.Position, users)
	var wg sync.WaitGroup
	var total atomic.Int64
	for u := range users {
		wg.Go(func() {
			for i := 1; ; i++ {
				pos, ok := appendMsg(proc.addr, fmt.Sprint("user", u), fmt.Sprint(i))
				if !ok {
					return
				}
				acked[u] = append(acked[u], pos)
				total.Add(1)
			}
		})
	}
	for deadline := time.Now().Add(20 * time.Second); total.Load() < 200; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d appends in 20 s", total.Load())
		}
	}
	proc.kill()
	wg.Wait()
	proc = startHelper(t, path, proc.addr)

	for u := range users {
		user := fmt.Sprint("user", u)
		resp, err := client.Get("http://" + proc.addr + "/pending?user=" + user)
		if err != nil {
			t.Fatal(err)
		}
		var got inboxPending
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		a := acked[u]
		if len(a) == 0 {
			t.Fatalf("%s: no append answered before the kill", user)
		}
		// The acknowledged ones, and maybe the one in flight, committed
		// but not answered.
		if n := len(got.Entries); n != len(a) && n != len(a)+1 {
			t.Errorf("%s: %d messages pending after the kill, %d appends answered before it", user, n, len(a))
		}
		if got.Epoch != a[0].Epoch {
			t.Errorf("%s: epoch %q after the kill, %q before", user, got.Epoch, a[0].Epoch)
		}
		for i, e := range got.Entries {
			if e.Seq != uint64(i+1) || string(e.Data) != fmt.Sprint(i+1) || (i < len(a) && a[i].Seq != e.Seq) {
				t.Errorf("%s: entry %d is seq %d %q, want seq %d %q", user, i, e.Seq, e.Data, i+1, fmt.Sprint(i+1))
				break
			}
		}
		pos, ok := appendMsg(proc.addr, user, "after")
		if !ok || pos != (adapter.Position{Epoch: a[0].Epoch, Seq: uint64(len(got.Entries) + 1)}) {
			t.Errorf("%s: Append after the kill = %v, %v; want seq %d in the same epoch", user, pos, ok, len(got.Entries)+1)
		}
	}
	proc.stop(t)
	t.Logf("%d appends answered before the kill, by %d users", total.Load(), users)
}
