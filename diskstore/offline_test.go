package diskstore_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
)

// These tests are those of adapter/offline_test.go for the memory offline
// store, run against the store, then those about the file.

// store stores each of msgs for user and fails the test on an error.
func store(t testing.TB, s adapter.OfflineStore, user string, msgs ...string) {
	t.Helper()
	for _, m := range msgs {
		if err := s.Store(context.Background(), user, []byte(m)); err != nil {
			t.Fatalf("Store(%q, %d bytes): %v", user, len(m), err)
		}
	}
}

// take takes user's messages as strings.
func take(t testing.TB, s adapter.OfflineStore, user string) []string {
	t.Helper()
	msgs, err := s.Take(context.Background(), user)
	if err != nil {
		t.Fatalf("Take(%q): %v", user, err)
	}
	if msgs != nil && len(msgs) == 0 {
		t.Fatalf("Take(%q): empty non-nil slice, want nil", user)
	}
	var out []string
	for _, m := range msgs {
		out = append(out, string(m))
	}
	return out
}

func TestOfflineBounds(t *testing.T) {
	tests := []struct {
		name            string
		messages, bytes int
		store           []string
		want            []string
	}{
		{"order kept", 10, 100, []string{"a", "b", "c"}, []string{"a", "b", "c"}},
		{"count drops oldest", 2, 100, []string{"a", "b", "c"}, []string{"b", "c"}},
		{"bytes drop oldest", 10, 10, []string{"aaaa", "bbbb", "cccc"}, []string{"bbbb", "cccc"}},
		{"bytes drop several", 10, 10, []string{"a", "b", "c", "dddddddddd"}, []string{"dddddddddd"}},
		{"exactly at the bounds", 3, 6, []string{"aa", "bb", "cc"}, []string{"aa", "bb", "cc"}},
		{"empty messages count", 2, 10, []string{"", "", "x"}, []string{"", "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newOffline(t, tt.messages, tt.bytes, time.Minute, 1<<20)
			store(t, s, "u", tt.store...)
			store(t, s, "other", "o") // users are independent
			if got := take(t, s, "u"); !slices.Equal(got, tt.want) {
				t.Errorf("Take = %q, want %q", got, tt.want)
			}
			if got := take(t, s, "u"); got != nil {
				t.Errorf("second Take = %q, want nil", got)
			}
			if got := take(t, s, "other"); !slices.Equal(got, []string{"o"}) {
				t.Errorf("other user's Take = %q, want [o]", got)
			}
		})
	}
}

func TestOfflineTakeUnknown(t *testing.T) {
	s := newOffline(t, 10, 100, time.Minute, 1<<20)
	msgs, err := s.Take(context.Background(), "nobody")
	if msgs != nil || err != nil {
		t.Errorf("Take on an unknown user = %q, %v; want nil, nil", msgs, err)
	}
}

// TestOfflineBytes checks that data is kept byte for byte, for any user
// ID, the empty one included.
func TestOfflineBytes(t *testing.T) {
	s := newOffline(t, 10, 1<<20, time.Minute, 1<<22)
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	for _, user := range []string{"", "u", "u\x00", "\xff"} {
		store(t, s, user, string(all), "", user)
	}
	for _, user := range []string{"", "u", "u\x00", "\xff"} {
		if got := take(t, s, user); !slices.Equal(got, []string{string(all), "", user}) {
			t.Errorf("user %q: %d messages, want the 3 stored, byte for byte", user, len(got))
		}
	}
}

func TestOfflineOversize(t *testing.T) {
	tests := []struct {
		name              string
		bytes, totalBytes int
		data              string
	}{
		{"over the per-user bound", 4, 1 << 20, "abcde"},
		{"over the total bound", 1000, 500, strings.Repeat("x", 501)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newOffline(t, 10, tt.bytes, time.Minute, tt.totalBytes)
			store(t, s, "u", "a")
			err := s.Store(context.Background(), "u", []byte(tt.data))
			if !errors.Is(err, adapter.ErrOfflineFull) || err.Error() == adapter.ErrOfflineFull.Error() {
				t.Errorf("Store of %d bytes: %v; want ErrOfflineFull with a reason", len(tt.data), err)
			}
			if got := take(t, s, "u"); !slices.Equal(got, []string{"a"}) {
				t.Errorf("after a refused message: %q, want [a] untouched", got)
			}
		})
	}
}

// TestOfflineTotal checks that the total bound refuses a new message
// rather than push out another user's, and accepts it again once room is
// made.
func TestOfflineTotal(t *testing.T) {
	ctx := context.Background()
	msg := strings.Repeat("x", 1000)
	s := newOffline(t, 10, 1500, time.Minute, 2500)
	store(t, s, "u1", msg)
	store(t, s, "u2", msg)
	err := s.Store(ctx, "u3", []byte(msg))
	if !errors.Is(err, adapter.ErrOfflineFull) {
		t.Fatalf("Store over the total bound: %v, want ErrOfflineFull", err)
	}
	// u2 replacing its own message fits: the oldest goes first.
	if err := s.Store(ctx, "u2", []byte(msg+"!")); err != nil {
		t.Errorf("Store replacing the user's own message: %v", err)
	}
	if got := take(t, s, "u1"); len(got) != 1 {
		t.Fatalf("u1 has %d messages, want 1", len(got))
	}
	if err := s.Store(ctx, "u3", []byte(msg)); err != nil {
		t.Errorf("Store after a Take made room: %v", err)
	}
	if got := take(t, s, "u2"); !slices.Equal(got, []string{msg + "!"}) {
		t.Errorf("u2 has %d messages, want its newest only", len(got))
	}
}

func TestOfflineKeepsNothing(t *testing.T) {
	for _, b := range [][3]int{{0, 100, 1000}, {10, 0, 1000}, {10, 100, 0}, {-1, 100, 1000}} {
		t.Run(fmt.Sprint(b), func(t *testing.T) {
			s := newOffline(t, b[0], b[1], time.Minute, b[2])
			if err := s.Store(context.Background(), "u", []byte("a")); !errors.Is(err, adapter.ErrOfflineFull) {
				t.Errorf("Store: %v, want ErrOfflineFull", err)
			}
			if got := take(t, s, "u"); got != nil {
				t.Errorf("Take = %q, want nil", got)
			}
		})
	}
}

func TestOfflineExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newOffline(t, 10, 100, time.Minute, 1<<20)
		store(t, s, "u", "a")
		store(t, s, "gone", "g")
		time.Sleep(30 * time.Second)
		store(t, s, "u", "b")
		time.Sleep(31 * time.Second) // a and g are 61s old, b 31s
		if got := take(t, s, "u"); !slices.Equal(got, []string{"b"}) {
			t.Errorf("Take = %q, want [b]", got)
		}
		if got := take(t, s, "gone"); got != nil {
			t.Errorf("Take of only expired messages = %q, want nil", got)
		}
	})
}

// TestOfflineExpiryMakesRoom checks that expired messages do not count
// against the bounds.
func TestOfflineExpiryMakesRoom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		msg := strings.Repeat("x", 1000)
		s := newOffline(t, 2, 1500, time.Minute, 3000)
		store(t, s, "u1", msg)
		store(t, s, "u2", msg)
		store(t, s, "u4", "a", "b")
		if err := s.Store(ctx, "u3", []byte(msg)); !errors.Is(err, adapter.ErrOfflineFull) {
			t.Fatalf("Store over the total bound: %v, want ErrOfflineFull", err)
		}
		time.Sleep(time.Minute + time.Second)
		store(t, s, "u3", msg)
		store(t, s, "u4", "c")
		if got := take(t, s, "u4"); !slices.Equal(got, []string{"c"}) {
			t.Errorf("u4: %q, want [c]", got)
		}
		for _, u := range []string{"u1", "u2"} {
			if got := take(t, s, u); got != nil {
				t.Errorf("%s: %d messages, want none", u, len(got))
			}
		}
	})
}

// TestOfflineManyExpired checks that expired messages are neither
// returned nor counted even when more expired at once than one call
// sweeps.
func TestOfflineManyExpired(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newOffline(t, 3, 100, time.Minute, 1<<20)
		for i := range 300 {
			store(t, s, "filler"+strconv.Itoa(i), "x")
		}
		time.Sleep(10 * time.Second)
		store(t, s, "a", "a1", "a2", "a3")
		store(t, s, "b", "b1")
		store(t, s, "c", "c1")
		time.Sleep(30 * time.Second)
		store(t, s, "a", "a4")
		time.Sleep(35 * time.Second) // all but a4 expired

		store(t, s, "a", "a5", "a6") // a4 and two new ones fit the bound of 3
		if got := take(t, s, "a"); !slices.Equal(got, []string{"a4", "a5", "a6"}) {
			t.Errorf("a: %q, want [a4 a5 a6]", got)
		}
		store(t, s, "b", "b2")
		if got := take(t, s, "b"); !slices.Equal(got, []string{"b2"}) {
			t.Errorf("b: %q, want [b2]", got)
		}
		if got := take(t, s, "c"); got != nil {
			t.Errorf("c: %q, want nil", got)
		}
	})
}

// TestOfflineRoomRecovered checks that messages pushed out, expired or
// taken give all their room back: after churn, an emptied store holds
// exactly as much as a new one.
func TestOfflineRoomRecovered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		s := newOffline(t, 3, 250, time.Minute, 4000)
		msg := []byte(strings.Repeat("x", 100))
		fill := func() (n int) {
			for ; s.Store(ctx, "fill"+strconv.Itoa(n), msg) == nil; n++ {
			}
			for i := range n {
				take(t, s, "fill"+strconv.Itoa(i))
			}
			return n
		}
		room := fill()
		if room < 2 {
			t.Fatalf("an empty store took %d messages of 100 bytes, want a few", room)
		}
		for i := range 50 {
			u := "u" + strconv.Itoa(i%7)
			s.Store(ctx, u, msg[:i%120]) // some push out older ones, some are refused
			if i%5 == 0 {
				take(t, s, "u"+strconv.Itoa(i%3))
			}
			time.Sleep(7 * time.Second) // some expire
		}
		time.Sleep(2 * time.Minute)
		for i := range 2 {
			take(t, s, "u"+strconv.Itoa(i)) // and some are taken, expired
		}
		if got := fill(); got != room {
			t.Errorf("after churn the store took %d messages, a new one %d", got, room)
		}
	})
}

func TestOfflineNoAgeLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newOffline(t, 10, 100, 0, 1<<20)
		store(t, s, "u", "a")
		time.Sleep(1000 * time.Hour)
		if got := take(t, s, "u"); !slices.Equal(got, []string{"a"}) {
			t.Errorf("after 1000h: %q, want [a]", got)
		}
	})
}

// TestOfflineConcurrent stores and takes from several goroutines; run it
// with -race. Every message stored must be taken exactly once, in order
// per user.
func TestOfflineConcurrent(t *testing.T) {
	const (
		users   = 4
		writers = 8
		rounds  = 100
	)
	s := newOffline(t, writers*rounds, 1<<20, 0, 1<<30)
	ctx := context.Background()
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		taken  = make(map[string][]string)
		stop   = make(chan struct{})
		takers sync.WaitGroup
	)
	takeInto := func(user string) {
		msgs, err := s.Take(ctx, user)
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		for _, m := range msgs {
			taken[user] = append(taken[user], string(m))
		}
		mu.Unlock()
	}
	for w := range writers {
		wg.Go(func() {
			for r := range rounds {
				if err := s.Store(ctx, "u"+strconv.Itoa(r%users), fmt.Appendf(nil, "%d/%d", w, r)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	for u := range users {
		takers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
					takeInto("u" + strconv.Itoa(u))
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	takers.Wait()
	for u := range users {
		takeInto("u" + strconv.Itoa(u))
	}

	total := 0
	for user, msgs := range taken {
		total += len(msgs)
		last := make(map[string]int) // writer -> last round seen
		for _, m := range msgs {
			w, r, _ := strings.Cut(m, "/")
			round, _ := strconv.Atoi(r)
			if prev, ok := last[w]; ok && round <= prev {
				t.Errorf("%s: writer %s's round %d after %d", user, w, round, prev)
			}
			last[w] = round
		}
	}
	if total != writers*rounds {
		t.Errorf("took %d messages, want %d", total, writers*rounds)
	}
}

// TestOfflineReopen checks that messages kept for a user survive Close
// and Open, with their bounds' accounting, and are taken once.
func TestOfflineReopen(t *testing.T) {
	path := tempPath(t)
	opt := diskstore.WithOffline(2, 1000, time.Hour, 3000)
	st, err := diskstore.Open(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	msg := strings.Repeat("x", 1000)
	store(t, st.Offline(), "u", "a", "b", "c") // keeps b, c
	store(t, st.Offline(), "big", msg)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Offline().Store(context.Background(), "u", []byte("d")); !errors.Is(err, diskstore.ErrClosed) {
		t.Errorf("Store after Close: %v, want ErrClosed", err)
	}

	s := open(t, path, opt).Offline()
	store(t, s, "big2", msg)
	if err := s.Store(context.Background(), "big3", []byte(msg)); !errors.Is(err, adapter.ErrOfflineFull) {
		t.Errorf("Store past the total bound after reopening: %v, want ErrOfflineFull: the total is kept", err)
	}
	if got := take(t, s, "u"); !slices.Equal(got, []string{"b", "c"}) {
		t.Errorf("after reopening: %q, want [b c]", got)
	}
	if got := take(t, s, "u"); got != nil {
		t.Errorf("second Take: %q, want nil", got)
	}
}
