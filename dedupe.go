package tether

import (
	"sync"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/internal/shrink"
)

// This file is how a hub makes a client's pub or send take effect once
// (PROTOCOL.md, "pub"): a client that sends one again after a reconnect,
// not knowing whether it arrived, sends the same id, and the hub answers
// the repeat with an ack without carrying it out.

// The hub remembers ids for dedupeWindow, at most dedupeMax of them (the
// oldest go first), and only ids of at least minDedupeID bytes, which a
// client makes unique to itself (a random prefix): short ids, which
// older clients number from 1, are not remembered.
const (
	dedupeWindow = 2 * time.Minute
	dedupeMax    = 1 << 17
	minDedupeID  = 16
)

// dedupe is the set of recent request ids, per user.
type dedupe struct {
	mu    sync.Mutex
	seen  map[string]time.Time
	peak  shrink.Peak
	order []dedupeEntry // oldest first, a queue: head is where it starts
	head  int
}

type dedupeEntry struct {
	key string
	at  time.Time
}

// first records id of user at now and reports whether it is new: false
// for a repeat within the window.
func (d *dedupe) first(user, id string, now time.Time) bool {
	if len(id) < minDedupeID {
		return true
	}
	key := dedupeKey(user, id)
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.head < len(d.order) {
		e := d.order[d.head]
		if now.Sub(e.at) < dedupeWindow && len(d.order)-d.head < dedupeMax {
			break
		}
		if d.seen[e.key] == e.at {
			delete(d.seen, e.key)
		}
		d.order[d.head] = dedupeEntry{}
		d.head++
	}
	if d.head > len(d.order)/2 { // compact the queue now and then
		d.order = append(d.order[:0], d.order[d.head:]...)
		d.head = 0
	}
	if d.seen == nil {
		d.seen = make(map[string]time.Time)
	}
	d.seen = shrink.Map(d.seen, &d.peak)
	if at, ok := d.seen[key]; ok && now.Sub(at) < dedupeWindow {
		return false
	}
	d.seen[key] = now
	d.peak.Grew(len(d.seen))
	d.order = append(d.order, dedupeEntry{key, now})
	return true
}

// forget drops id of user: what it named was not carried out after all
// (the publication failed), so a repeat must be.
func (d *dedupe) forget(user, id string) {
	if len(id) < minDedupeID {
		return
	}
	d.mu.Lock()
	delete(d.seen, dedupeKey(user, id))
	d.mu.Unlock()
}

// once reports whether the request id of user is new: where the hub's
// memory is not enough when it can (see sharedDeduper), else on this
// node.
func (h *Hub) once(user, id string) bool {
	if len(id) < minDedupeID {
		return true
	}
	if d := h.sharedDeduper(); d != nil {
		ctx, cancel := brokerContext()
		first, err := d.Once(ctx, dedupeKey(user, id), dedupeWindow)
		cancel()
		if err == nil {
			return first
		}
	}
	return h.dedupe.first(user, id, time.Now())
}

// forgetID undoes once for a request that was not carried out.
func (h *Hub) forgetID(user, id string) {
	if len(id) < minDedupeID {
		return
	}
	h.dedupe.forget(user, id)
	if d := h.sharedDeduper(); d != nil {
		ctx, cancel := brokerContext()
		_ = d.Forget(ctx, dedupeKey(user, id)) // the window ends it anyway
		cancel()
	}
}

// sharedDeduper returns where request ids are remembered beyond this
// hub's memory, if anywhere: by the broker, for every node, while it can
// be reached; without a broker, by the history when it implements
// adapter.Deduper (a store on disk does), so that a client resending its
// unanswered publications after a restart of the process does not
// publish them twice.
func (h *Hub) sharedDeduper() adapter.Deduper {
	if h.broker != nil {
		if d, ok := h.broker.(adapter.Deduper); ok && !h.brokerDown.Load() {
			return d
		}
		return nil
	}
	d, _ := h.cfg.history.(adapter.Deduper)
	return d
}

func dedupeKey(user, id string) string { return user + "\x00" + id }
