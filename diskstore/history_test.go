package diskstore_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
)

// These tests are those of adapter/history_test.go for the memory
// history, run against the store: it must behave the same. Those about
// the file (reopen, caps, locks) follow.

// appendAll appends each of msgs to topic and returns the position of the
// last one.
func appendAll(t testing.TB, h adapter.History, topic string, msgs ...string) adapter.Position {
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
func since(t testing.TB, h adapter.History, topic string, pos adapter.Position) (data []string, last adapter.Position, ok bool) {
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

func TestHistoryAppendSeqs(t *testing.T) {
	h := newHistory(t, 10, time.Minute)
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

func TestHistorySince(t *testing.T) {
	h := newHistory(t, 3, time.Minute)
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

// TestHistoryBytes checks that data is kept byte for byte: any bytes,
// empty data, and a large message.
func TestHistoryBytes(t *testing.T) {
	h := newHistory(t, 10, time.Minute)
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i * 7)
	}
	msgs := []string{string(all), "", "\x01\x00", string(big)}
	pos := appendAll(t, h, "t", msgs...)
	got, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch})
	if !ok || !slices.Equal(got, msgs) {
		t.Errorf("Since from 0: ok %v, %d messages; want the 4 appended, byte for byte", ok, len(got))
	}
}

// TestHistorySinceCopies checks that the caller may modify the entries it
// gets without changing what is kept.
func TestHistorySinceCopies(t *testing.T) {
	h := newHistory(t, 3, 0)
	pos := appendAll(t, h, "t", "a", "b")
	entries, _, _, _ := h.Since(context.Background(), "t", adapter.Position{Epoch: pos.Epoch})
	entries[0].Data[0] = 'z'
	entries[1] = adapter.HistoryEntry{Seq: 99, Data: []byte("z")}
	if got, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch}); !ok || !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("after modifying a result: %q, ok %v; want [a b]", got, ok)
	}
}

func TestHistoryUnknownTopic(t *testing.T) {
	h := newHistory(t, 10, time.Minute)
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

func TestHistoryNoMessages(t *testing.T) {
	for _, n := range []int{0, -1} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			h := newHistory(t, n, time.Minute)
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

func TestHistoryExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHistory(t, 10, time.Minute)
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

func TestHistoryNoAgeLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHistory(t, 10, 0)
		pos := appendAll(t, h, "t", "a", "b")
		time.Sleep(1000 * time.Hour)
		if got, last, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch}); !ok || !slices.Equal(got, []string{"a", "b"}) || last != pos {
			t.Errorf("after 1000h: %q, %+v, ok %v; want [a b], %+v, ok", got, last, ok, pos)
		}
	})
}

// TestHistoryIdleTopicForgotten checks that a topic nothing was appended
// to for an hour (more than maxAge) is forgotten, and starts a new epoch
// rather than seq 1 again in the old one.
func TestHistoryIdleTopicForgotten(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHistory(t, 10, time.Minute)
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

// TestHistoryManyIdleTopics checks that a topic quiet for longer than
// maxAge keeps its epoch, so that subscribers who missed nothing need not
// resync, and that one idle for an hour gets a new epoch even when more
// topics went idle at once than one call sweeps.
func TestHistoryManyIdleTopics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHistory(t, 10, time.Minute)
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

// TestHistoryConcurrent runs Append and Since from several goroutines;
// run it with -race. Every topic's seqs must be 1 to n with no gap or
// repeat, increasing for each appender, and every replay must match what
// was appended.
func TestHistoryConcurrent(t *testing.T) {
	const (
		appenders = 8
		readers   = 4
		topics    = 4
		rounds    = 100
	)
	h := newHistory(t, appenders*rounds, 0)
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
		_, cur, _, _ := h.Since(ctx, topic, adapter.Position{})
		entries, last, ok, err := h.Since(ctx, topic, adapter.Position{Epoch: cur.Epoch})
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

// A topic nobody publishes to, which a subscription made known to the
// history, is forgotten after 10 minutes (a topic with messages keeps its
// epoch for an hour), and at most so many of them are kept (8,192 by
// default, 100 here), the oldest going first.
func TestHistoryEmptyTopicsBounded(t *testing.T) {
	const cap = 100
	synctest.Test(t, func(t *testing.T) {
		h := newHistory(t, 10, time.Minute, diskstore.WithCaps(1<<20, cap))
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
		for i := range cap + 10 {
			h.Since(ctx, "made-up-"+strconv.Itoa(i), adapter.Position{})
		}
		if _, last, _, _ := h.Since(ctx, "first", first); last.Epoch == first.Epoch {
			t.Error("the oldest empty topic is still kept past the cap")
		}
		newest := "made-up-" + strconv.Itoa(cap+9)
		_, recent, _, _ := h.Since(ctx, newest, adapter.Position{})
		if _, last, ok := since(t, h, newest, recent); !ok || last != recent {
			t.Errorf("the newest empty topic: %+v, ok %v; want it kept", last, ok)
		}
		if _, last, ok := since(t, h, "used", used); !ok || last != used {
			t.Errorf("a topic with a message after the flood: %+v, ok %v; want %+v", last, ok, used)
		}
		// An empty topic that gets a message is kept like any other.
		if pos := appendAll(t, h, newest, "y"); pos != (adapter.Position{Epoch: recent.Epoch, Seq: 1}) {
			t.Errorf("first message of a known empty topic: %+v, want {%s 1}", pos, recent.Epoch)
		}
	})
}

// TestHistoryTopicsBounded checks the cap on records (2^20 by default, 50
// here): past it, the topic appended to least recently is forgotten.
func TestHistoryTopicsBounded(t *testing.T) {
	const cap = 50
	h := newHistory(t, 10, time.Minute, diskstore.WithCaps(cap, cap))
	first := appendAll(t, h, "t0", "x")
	for i := 1; i < cap; i++ {
		appendAll(t, h, "t"+strconv.Itoa(i), "x")
	}
	again := appendAll(t, h, "t0", "y") // now the most recent
	if again.Epoch != first.Epoch || again.Seq != 2 {
		t.Fatalf("t0 at the cap: %+v, want {%s 2}", again, first.Epoch)
	}
	one := appendAll(t, h, "t1", "y") // t1 was next to go: now it is not
	appendAll(t, h, "over", "x")      // pushes out t2, the least recent
	if _, last, ok := since(t, h, "t0", again); !ok || last != again {
		t.Errorf("t0: %+v, ok %v; want kept at %+v", last, ok, again)
	}
	if _, last, ok := since(t, h, "t1", one); !ok || last != one {
		t.Errorf("t1: %+v, ok %v; want kept at %+v", last, ok, one)
	}
	if _, last, ok := since(t, h, "t2", adapter.Position{Seq: 1}); ok || last.Seq != 0 {
		t.Errorf("t2, the least recent: %+v, ok %v; want forgotten", last, ok)
	}
}

// TestHistoryReopen checks what the store is for: a topic's messages and
// epoch survive Close and Open, so a client resumes.
func TestHistoryReopen(t *testing.T) {
	path := tempPath(t)
	st, err := diskstore.Open(path, diskstore.WithHistory(3, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	h := st.History()
	appendAll(t, h, "t", "a", "b")
	pos := appendAll(t, h, "t", "c", "d", "e") // keeps c, d, e
	_, empty, _, _ := h.Since(context.Background(), "empty", adapter.Position{})
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := h.Since(context.Background(), "t", pos); !errors.Is(err, diskstore.ErrClosed) {
		t.Errorf("Since after Close: %v, want ErrClosed", err)
	}
	if _, err := h.Append(context.Background(), "t", nil); !errors.Is(err, diskstore.ErrClosed) {
		t.Errorf("Append after Close: %v, want ErrClosed", err)
	}

	h = open(t, path, diskstore.WithHistory(3, time.Hour)).History()
	if got, last, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch, Seq: 2}); !ok || !slices.Equal(got, []string{"c", "d", "e"}) || last != pos {
		t.Errorf("after reopening, Since seq 2 = %q, %+v, ok %v; want [c d e], %+v, ok", got, last, ok, pos)
	}
	if _, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch, Seq: 1}); ok {
		t.Error("after reopening, Since seq 1: ok; want not ok, b was trimmed")
	}
	if _, last, ok := since(t, h, "empty", empty); !ok || last != empty {
		t.Errorf("after reopening, the empty topic: %+v, ok %v; want its epoch kept, %+v", last, ok, empty)
	}
	if next := appendAll(t, h, "t", "f"); next != (adapter.Position{Epoch: pos.Epoch, Seq: 6}) {
		t.Errorf("Append after reopening: %+v, want {%s 6}", next, pos.Epoch)
	}
}

// TestHistoryReopenSmallerBound checks that a store reopened with a
// smaller bound honours it at once, whatever the file still holds.
func TestHistoryReopenSmallerBound(t *testing.T) {
	path := tempPath(t)
	st, err := diskstore.Open(path, diskstore.WithHistory(100, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	var pos adapter.Position
	for i := range 100 {
		pos = appendAll(t, st.History(), "t", strconv.Itoa(i))
	}
	st.Close()
	h := open(t, path, diskstore.WithHistory(5, time.Hour)).History()
	if _, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch, Seq: 94}); ok {
		t.Error("6 missed with a bound of 5: ok; want not ok")
	}
	if got, _, ok := since(t, h, "t", adapter.Position{Epoch: pos.Epoch, Seq: 95}); !ok || !slices.Equal(got, []string{"95", "96", "97", "98", "99"}) {
		t.Errorf("5 missed with a bound of 5: %q, ok %v", got, ok)
	}
}

// TestHistoryFileReplaced checks that a client's position in a file that
// is gone (deleted, or another file in its place) is unknown: it resyncs.
func TestHistoryFileReplaced(t *testing.T) {
	path := tempPath(t)
	st, err := diskstore.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	pos := appendAll(t, st.History(), "t", "a", "b")
	st.Close()
	other := open(t, tempPath(t)).History()
	appendAll(t, other, "t", "x", "y", "z")
	if _, last, ok := since(t, other, "t", pos); ok || last.Epoch == pos.Epoch {
		t.Errorf("a position from another file: %+v, ok %v; want not ok, another epoch", last, ok)
	}
}

// TestHistoryClientTopicNames checks that any topic name is its own key,
// including names that are prefixes of others or hold NUL bytes.
func TestHistoryClientTopicNames(t *testing.T) {
	h := newHistory(t, 10, time.Minute)
	names := []string{"a", "a\x00", "a\x00b", "ab", "", "\xff\xff"}
	for i, n := range names {
		appendAll(t, h, n, strconv.Itoa(i))
	}
	for i, n := range names {
		_, cur, _, _ := h.Since(context.Background(), n, adapter.Position{})
		if got, _, ok := since(t, h, n, adapter.Position{Epoch: cur.Epoch}); !ok || !slices.Equal(got, []string{strconv.Itoa(i)}) {
			t.Errorf("topic %q: %q, ok %v; want [%d]", n, got, ok, i)
		}
	}
}
