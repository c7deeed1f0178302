package adapter_test

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tether-ws/tether/adapter"
)

// appendAll appends each of msgs to topic and returns the position of the
// last one.
func appendAll(t *testing.T, h adapter.History, topic string, msgs ...string) adapter.Position {
	t.Helper()
	var pos adapter.Position
	for _, m := range msgs {
		var err error
		if pos, err = h.Append(context.Background(), topic, []byte(m)); err != nil {
			t.Fatalf("Append(%q, %q): %v", topic, m, err)
		}
	}
	return pos
}

// since calls h.Since and returns the entries' data as strings, so that
// tests compare them in one line.
func since(t *testing.T, h adapter.History, topic string, pos adapter.Position) (data []string, last adapter.Position, ok bool) {
	t.Helper()
	entries, last, ok, err := h.Since(context.Background(), topic, pos)
	if err != nil {
		t.Fatalf("Since(%q, %+v): %v", topic, pos, err)
	}
	want := pos.Seq + 1
	for _, e := range entries {
		if e.Seq != want {
			t.Fatalf("Since(%q, %+v): entry seq %d, want %d", topic, pos, e.Seq, want)
		}
		want++
		data = append(data, string(e.Data))
	}
	if ok && len(entries) > 0 && entries[len(entries)-1].Seq != last.Seq {
		t.Fatalf("Since(%q, %+v): last entry seq %d, last position %d", topic, pos, entries[len(entries)-1].Seq, last.Seq)
	}
	return data, last, ok
}

func TestMemoryHistoryAppendSeqs(t *testing.T) {
	h := adapter.NewMemoryHistory(10, time.Minute)
	ctx := context.Background()
	var epoch string
	for i, m := range []string{"a", "b", "c"} {
		pos, err := h.Append(ctx, "t", []byte(m))
		if err != nil {
			t.Fatal(err)
		}
		if pos.Seq != uint64(i+1) {
			t.Errorf("Append %d: seq %d, want %d", i, pos.Seq, i+1)
		}
		if pos.Epoch == "" || (epoch != "" && pos.Epoch != epoch) {
			t.Errorf("Append %d: epoch %q, want non-empty and unchanged from %q", i, pos.Epoch, epoch)
		}
		epoch = pos.Epoch
	}
	if other := appendAll(t, h, "u", "x"); other.Seq != 1 || other.Epoch == epoch {
		t.Errorf("other topic: %+v, want seq 1 and an epoch other than %q", other, epoch)
	}
}

func TestMemoryHistorySince(t *testing.T) {
	h := adapter.NewMemoryHistory(3, time.Minute)
	appendAll(t, h, "t", "a", "b", "c", "d", "e") // keeps c, d, e
	_, cur, _ := since(t, h, "t", adapter.Position{})

	tests := []struct {
		name string
		pos  adapter.Position
		want []string
		ok   bool
	}{
		{"gap held", adapter.Position{Epoch: cur.Epoch, Seq: 3}, []string{"d", "e"}, true},
		{"gap exactly held", adapter.Position{Epoch: cur.Epoch, Seq: 2}, []string{"c", "d", "e"}, true},
		{"at last", adapter.Position{Epoch: cur.Epoch, Seq: 5}, nil, true},
		{"gap fell out of the ring", adapter.Position{Epoch: cur.Epoch, Seq: 1}, nil, false},
		{"from the start, fell out", adapter.Position{Epoch: cur.Epoch, Seq: 0}, nil, false},
		{"beyond last", adapter.Position{Epoch: cur.Epoch, Seq: 6}, nil, false},
		{"wrong epoch", adapter.Position{Epoch: cur.Epoch + "x", Seq: 4}, nil, false},
		{"no epoch", adapter.Position{Seq: 5}, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, last, ok := since(t, h, "t", tt.pos)
			if ok != tt.ok || !slices.Equal(got, tt.want) {
				t.Errorf("Since(%+v) = %q, ok %v; want %q, ok %v", tt.pos, got, ok, tt.want, tt.ok)
			}
			if last != cur {
				t.Errorf("Since(%+v): last %+v, want %+v", tt.pos, last, cur)
			}
		})
	}
}

// TestMemoryHistorySinceCopies checks that the caller may modify the
// entries it gets without changing what is kept.
func TestMemoryHistorySinceCopies(t *testing.T) {
	h := adapter.NewMemoryHistory(3, 0)
	pos := appendAll(t, h, "t", "a", "b")
	entries, _, _, _ := h.Since(context.Background(), "t", adapter.Position{Epoch: pos.Epoch})
	entries[0] = adapter.HistoryEntry{Seq: 99, Data: []byte("z")}
	if got, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch}); !ok || !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("after modifying a result: %q, ok %v; want [a b]", got, ok)
	}
}

func TestMemoryHistoryUnknownTopic(t *testing.T) {
	h := adapter.NewMemoryHistory(10, time.Minute)
	got, last, ok := since(t, h, "new", adapter.Position{Epoch: "stale", Seq: 7})
	if ok || got != nil || last.Epoch == "" || last.Seq != 0 {
		t.Fatalf("Since on an unknown topic = %q, %+v, ok %v; want nothing, a fresh epoch at 0, not ok", got, last, ok)
	}
	// The epoch the client got stays valid: it resumes from it.
	if pos := appendAll(t, h, "new", "a"); pos != (adapter.Position{Epoch: last.Epoch, Seq: 1}) {
		t.Errorf("first Append after Since: %+v, want {%s 1}", pos, last.Epoch)
	}
	if got, _, ok := since(t, h, "new", last); !ok || !slices.Equal(got, []string{"a"}) {
		t.Errorf("resume from the epoch Since gave: %q, ok %v; want [a], ok", got, ok)
	}
}

func TestMemoryHistoryNoMessages(t *testing.T) {
	for _, n := range []int{0, -1} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			h := adapter.NewMemoryHistory(n, time.Minute)
			pos := appendAll(t, h, "t", "a", "b")
			if pos.Seq != 2 {
				t.Fatalf("seq %d, want 2: messages are numbered even when none are kept", pos.Seq)
			}
			if _, _, ok := since(t, h, "t", pos); !ok {
				t.Error("Since at last: not ok; want ok, nothing was missed")
			}
			if _, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch, Seq: 1}); ok {
				t.Error("Since with a gap: ok; want not ok, nothing is kept")
			}
		})
	}
}

func TestMemoryHistoryExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := adapter.NewMemoryHistory(10, time.Minute)
		appendAll(t, h, "t", "a", "b")
		time.Sleep(30 * time.Second)
		pos := appendAll(t, h, "t", "c")
		time.Sleep(31 * time.Second) // a and b are 61s old, c 31s

		tests := []struct {
			from uint64
			want []string
			ok   bool
		}{
			{0, nil, false},
			{1, nil, false},
			{2, []string{"c"}, true},
			{3, nil, true},
		}
		for _, tt := range tests {
			got, last, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch, Seq: tt.from})
			if ok != tt.ok || !slices.Equal(got, tt.want) || last != pos {
				t.Errorf("Since(seq %d) = %q, %+v, ok %v; want %q, %+v, ok %v", tt.from, got, last, ok, tt.want, pos, tt.ok)
			}
		}
	})
}

func TestMemoryHistoryNoAgeLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := adapter.NewMemoryHistory(10, 0)
		pos := appendAll(t, h, "t", "a", "b")
		time.Sleep(1000 * time.Hour)
		if got, last, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch}); !ok || !slices.Equal(got, []string{"a", "b"}) || last != pos {
			t.Errorf("after 1000h: %q, %+v, ok %v; want [a b], %+v, ok", got, last, ok, pos)
		}
	})
}

// TestMemoryHistoryIdleTopicForgotten checks that a topic nothing was
// appended to for an hour (more than maxAge) is forgotten, and starts a new
// epoch rather than seq 1 again in the old one.
func TestMemoryHistoryIdleTopicForgotten(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := adapter.NewMemoryHistory(10, time.Minute)
		idle := appendAll(t, h, "idle", "a", "b")
		busy := appendAll(t, h, "busy", "x")
		for range 125 {
			time.Sleep(30 * time.Second)
			busy = appendAll(t, h, "busy", "x") // sweeps, and keeps busy alive
		}
		_, last, ok := since(t, h, "idle", idle)
		if ok || last.Epoch == idle.Epoch || last.Seq != 0 {
			t.Errorf("idle topic: %+v, ok %v; want a new epoch at seq 0, not ok", last, ok)
		}
		if pos := appendAll(t, h, "idle", "c"); pos != (adapter.Position{Epoch: last.Epoch, Seq: 1}) {
			t.Errorf("idle topic's next Append: %+v, want {%s 1}", pos, last.Epoch)
		}
		if _, last, ok := since(t, h, "busy", busy); !ok || last != busy {
			t.Errorf("busy topic: %+v, ok %v; want %+v, ok", last, ok, busy)
		}
	})
}

// TestMemoryHistoryManyIdleTopics checks that a topic quiet for longer
// than maxAge keeps its epoch, so that subscribers who missed nothing need
// not resync, and that one idle for an hour gets a new epoch even when
// more topics went idle at once than one call sweeps.
func TestMemoryHistoryManyIdleTopics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := adapter.NewMemoryHistory(10, time.Minute)
		for i := range 300 {
			appendAll(t, h, "filler"+strconv.Itoa(i), "x")
		}
		time.Sleep(10 * time.Second)
		a := appendAll(t, h, "a", "1")
		b := appendAll(t, h, "b", "1")
		time.Sleep(65 * time.Second) // every message has expired
		if got, last, ok := since(t, h, "a", a); !ok || len(got) != 0 || last != a {
			t.Errorf("Since on quiet a at its last seq: %q, %+v, ok %v; want nothing missed at %+v", got, last, ok, a)
		}
		if _, last, ok := since(t, h, "b", adapter.Position{Epoch: b.Epoch}); ok || last != b {
			t.Errorf("Since on quiet b from seq 0: %+v, ok %v; want not ok (expired) at %+v", last, ok, b)
		}
		time.Sleep(time.Hour) // every topic is idle
		if _, last, ok := since(t, h, "a", a); ok || last.Epoch == a.Epoch || last.Seq != 0 {
			t.Errorf("Since on idle a: %+v, ok %v; want a new epoch at 0, not ok", last, ok)
		}
		if pos := appendAll(t, h, "b", "2"); pos.Epoch == b.Epoch || pos.Seq != 1 {
			t.Errorf("Append on idle b: %+v; want a new epoch at 1", pos)
		}
	})
}

// TestMemoryHistoryConcurrent runs Append and Since from several
// goroutines; run it with -race. Every topic's seqs must be 1 to n with no
// gap or repeat, increasing for each appender, and every replay must
// match what was appended.
func TestMemoryHistoryConcurrent(t *testing.T) {
	const (
		appenders = 8
		readers   = 4
		topics    = 4
		rounds    = 200
	)
	h := adapter.NewMemoryHistory(appenders*rounds, 0)
	ctx := context.Background()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		sent = make(map[string]map[uint64]string) // topic -> seq -> data
		stop = make(chan struct{})
	)
	for i := range topics {
		sent["t"+strconv.Itoa(i)] = make(map[uint64]string)
	}
	for a := range appenders {
		wg.Go(func() {
			prev := make(map[string]adapter.Position)
			for r := range rounds {
				topic := "t" + strconv.Itoa((a+r)%topics)
				data := fmt.Sprintf("%d/%d", a, r)
				pos, err := h.Append(ctx, topic, []byte(data))
				if err != nil {
					t.Error(err)
					return
				}
				if p, seen := prev[topic]; seen && (pos.Epoch != p.Epoch || pos.Seq <= p.Seq) {
					t.Errorf("%s: appender %d got %+v after %+v", topic, a, pos, p)
				}
				prev[topic] = pos
				mu.Lock()
				if old, dup := sent[topic][pos.Seq]; dup {
					t.Errorf("%s: seq %d given to %q and %q", topic, pos.Seq, old, data)
				}
				sent[topic][pos.Seq] = data
				mu.Unlock()
			}
		})
	}
	var readersWG sync.WaitGroup
	for r := range readers {
		readersWG.Go(func() {
			topic := "t" + strconv.Itoa(r%topics)
			_, cur, _, _ := h.Since(ctx, topic, adapter.Position{})
			for {
				select {
				case <-stop:
					return
				default:
				}
				entries, last, ok, err := h.Since(ctx, topic, adapter.Position{Epoch: cur.Epoch})
				if err != nil || !ok || last.Epoch != cur.Epoch || uint64(len(entries)) != last.Seq {
					t.Errorf("%s: Since from 0 = %d entries, %+v, ok %v, %v; want all %d, ok", topic, len(entries), last, ok, err, last.Seq)
					return
				}
				for i, e := range entries {
					if e.Seq != uint64(i+1) {
						t.Errorf("%s: entry %d has seq %d", topic, i, e.Seq)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	readersWG.Wait()

	total := 0
	for topic, bySeq := range sent {
		total += len(bySeq)
		entries, last, ok, err := h.Since(ctx, topic, adapter.Position{Epoch: mustEpoch(t, h, topic)})
		if err != nil || !ok || last.Seq != uint64(len(bySeq)) || len(entries) != len(bySeq) {
			t.Fatalf("%s: %d entries, last %+v, ok %v, %v; want %d", topic, len(entries), last, ok, err, len(bySeq))
		}
		for _, e := range entries {
			if string(e.Data) != bySeq[e.Seq] {
				t.Errorf("%s seq %d: %q, appended %q", topic, e.Seq, e.Data, bySeq[e.Seq])
			}
		}
	}
	if total != appenders*rounds {
		t.Errorf("%d seqs handed out, want %d", total, appenders*rounds)
	}
}

func mustEpoch(t *testing.T, h adapter.History, topic string) string {
	t.Helper()
	_, last, _, err := h.Since(context.Background(), topic, adapter.Position{})
	if err != nil {
		t.Fatal(err)
	}
	return last.Epoch
}

func BenchmarkMemoryHistoryAppend(b *testing.B) {
	for _, topics := range []int{1, 1024} {
		b.Run("topics="+strconv.Itoa(topics), func(b *testing.B) {
			h := adapter.NewMemoryHistory(100, time.Minute)
			names := make([]string, topics)
			for i := range names {
				names[i] = "topic-" + strconv.Itoa(i)
			}
			data := []byte(`{"op":"msg","topic":"room","data":"hello"}`)
			ctx := context.Background()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := h.Append(ctx, names[i%topics], data); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

func ExampleNewMemoryHistory() {
	ctx := context.Background()
	h := adapter.NewMemoryHistory(100, 5*time.Minute)
	h.Append(ctx, "room", []byte("hello"))
	pos, _ := h.Append(ctx, "room", []byte("world"))
	h.Append(ctx, "room", []byte("again"))

	// A client that processed "world" reconnects and resumes from there.
	entries, last, ok, _ := h.Since(ctx, "room", pos)
	for _, e := range entries {
		fmt.Println(e.Seq, string(e.Data))
	}
	fmt.Println(ok, last.Seq)

	// One whose position is from another epoch (say, before a restart)
	// must reload instead.
	_, _, ok, _ = h.Since(ctx, "room", adapter.Position{Epoch: "old", Seq: 2})
	fmt.Println(ok)
	// Output:
	// 3 again
	// true 3
	// false
}

// A topic nobody publishes to, which a subscription made known to the
// history, is forgotten after 10 minutes (a topic with messages keeps its
// epoch for an hour), and at most 8,192 of them are kept, the oldest
// going first: subscriptions to made-up topics cannot fill the history.
// Forgetting one costs its subscribers nothing: the first message of a
// new epoch has seq 1.
func TestMemoryHistoryEmptyTopicsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := adapter.NewMemoryHistory(10, time.Minute)
		ctx := context.Background()
		_, quiet, _, _ := h.Since(ctx, "quiet", adapter.Position{})
		used := appendAll(t, h, "used", "x")
		time.Sleep(11 * time.Minute)
		if _, last, ok := since(t, h, "quiet", quiet); ok || last.Epoch == quiet.Epoch {
			t.Errorf("an empty topic after 11 minutes: %+v, ok %v; want it forgotten (a new epoch)", last, ok)
		}
		if _, last, ok := since(t, h, "used", used); !ok || last != used {
			t.Errorf("a topic with a message after 11 minutes: %+v, ok %v; want %+v", last, ok, used)
		}

		// The cap: the oldest empty topics go, those with messages stay.
		_, first, _, _ := h.Since(ctx, "first", adapter.Position{})
		for i := range 1<<13 + 100 {
			h.Since(ctx, "made-up-"+strconv.Itoa(i), adapter.Position{})
		}
		if _, last, _, _ := h.Since(ctx, "first", first); last.Epoch == first.Epoch {
			t.Error("the oldest empty topic is still kept past the cap of 8,192")
		}
		_, recent, _, _ := h.Since(ctx, "made-up-"+strconv.Itoa(1<<13+99), adapter.Position{})
		if _, last, ok := since(t, h, "made-up-"+strconv.Itoa(1<<13+99), recent); !ok || last != recent {
			t.Errorf("the newest empty topic: %+v, ok %v; want it kept", last, ok)
		}
		if _, last, ok := since(t, h, "used", used); !ok || last != used {
			t.Errorf("a topic with a message after the flood: %+v, ok %v; want %+v", last, ok, used)
		}
		// An empty topic that gets a message is kept like any other.
		pos := appendAll(t, h, "made-up-"+strconv.Itoa(1<<13+99), "y")
		if pos != (adapter.Position{Epoch: recent.Epoch, Seq: 1}) {
			t.Errorf("first message of a known empty topic: %+v, want {%s 1}", pos, recent.Epoch)
		}
	})
}
