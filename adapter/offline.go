package adapter

import (
	"container/heap"
	"context"
	"fmt"
	"math"
	"sync"
	"time"
)

// What a message and a user with messages count against the total bound
// beyond the data: about what keeping them costs (a ring slot with its
// slack; the user's inbox, map entry and first ring). Without them, many
// tiny messages would hold far more memory than the bound says.
const (
	offlineMsgOverhead  = 64
	offlineUserOverhead = 128
)

// NewMemoryOfflineStore returns an [OfflineStore] in this process's memory
// that keeps, per user, at most messages messages and bytes bytes of data,
// each for at most maxAge, and at most totalBytes over all users.
//
// A user's new message pushes out their oldest ones when it would exceed
// the per-user bounds. Store refuses, with [ErrOfflineFull], a message
// longer than bytes, and one that would exceed totalBytes once expired
// messages are dropped: other users' messages are never pushed out. Each
// message counts as its length plus 64 bytes against totalBytes, and each
// user with messages as 128 bytes more, so that the bound holds for memory
// even when messages are tiny.
//
// With maxAge <= 0 messages do not expire. With messages, bytes or
// totalBytes <= 0 the store keeps nothing: Store always returns
// [ErrOfflineFull], so the caller knows the message was not kept.
//
// Store keeps data without copying it: the caller must not modify it
// afterwards. A user without messages costs no memory. Expired messages
// are never returned, and are dropped as a side effect of Store and Take,
// with no goroutine: each call drops up to 64 of the oldest, and Store
// drops all of them before refusing a message for the total bound.
//
// Store and Take ignore ctx: they never block.
func NewMemoryOfflineStore(messages, bytes int, maxAge time.Duration, totalBytes int) OfflineStore {
	return &memoryOffline{
		messages:   messages,
		bytes:      bytes,
		totalBytes: totalBytes,
		maxAge:     max(maxAge, 0),
		base:       time.Now(),
		users:      make(map[string]*inbox),
	}
}

type memoryOffline struct {
	messages, bytes, totalBytes int
	maxAge                      time.Duration // 0: no limit
	base                        time.Time     // times are durations since base: monotonic, and 8 bytes each

	mu    sync.Mutex // guards the fields below and every inbox
	users map[string]*inbox
	total int // the cost of every message kept, as counted against totalBytes
	// byAge orders the inboxes by their oldest message, so that expired
	// messages are found without a scan, however many users there are.
	byAge inboxHeap
}

// inbox is a user's messages, oldest first. It is never empty: an inbox
// whose last message goes is removed.
type inbox struct {
	user  string
	msgs  fifo[offlineMsg]
	bytes int // sum of len(data)
	index int // in byAge
}

type offlineMsg struct {
	data []byte
	at   time.Duration
}

func (s *memoryOffline) Store(_ context.Context, userID string, data []byte) error {
	if s.messages <= 0 || s.bytes <= 0 || s.totalBytes <= 0 {
		return fmt.Errorf("%w: it keeps no messages", ErrOfflineFull)
	}
	if len(data) > s.bytes {
		return fmt.Errorf("%w: message of %d bytes over the per-user limit of %d", ErrOfflineFull, len(data), s.bytes)
	}
	cost := len(data) + offlineMsgOverhead
	if cost > s.totalBytes {
		return fmt.Errorf("%w: message of %d bytes over the total limit of %d", ErrOfflineFull, len(data), s.totalBytes)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Since(s.base)
	s.sweepLocked(now, sweepBatch)
	ib := s.users[userID]
	if ib != nil && !s.trimLocked(ib, now) {
		ib = nil
	}
	if ib == nil {
		cost += offlineUserOverhead
	}

	// Find the user's oldest messages that must go to make room, without
	// dropping them yet: if the total bound refuses data they stay.
	drop, freedBytes := 0, 0
	if ib != nil {
		for ib.msgs.len()-drop+1 > s.messages || ib.bytes-freedBytes+len(data) > s.bytes {
			freedBytes += len(ib.msgs.at(drop).data)
			drop++
		}
	}
	freed := freedBytes + drop*offlineMsgOverhead
	if s.total-freed+cost > s.totalBytes {
		// ib has no expired message left, so this cannot change freed.
		s.sweepLocked(now, math.MaxInt)
		if s.total-freed+cost > s.totalBytes {
			return fmt.Errorf("%w: over the total limit of %d bytes", ErrOfflineFull, s.totalBytes)
		}
	}

	msg := offlineMsg{data: data, at: now}
	if ib == nil {
		ib = &inbox{user: userID}
		ib.msgs.push(msg, s.messages)
		s.users[userID] = ib
		heap.Push(&s.byAge, ib)
	} else {
		for range drop {
			s.popLocked(ib)
		}
		ib.msgs.push(msg, s.messages)
		if drop > 0 {
			heap.Fix(&s.byAge, ib.index)
		}
	}
	ib.bytes += len(data)
	s.total += cost
	return nil
}

func (s *memoryOffline) Take(_ context.Context, userID string) ([][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Since(s.base)
	s.sweepLocked(now, sweepBatch)
	ib := s.users[userID]
	if ib == nil || !s.trimLocked(ib, now) {
		return nil, nil
	}
	out := make([][]byte, ib.msgs.len())
	for i := range out {
		out[i] = ib.msgs.at(i).data
	}
	s.total -= ib.bytes + ib.msgs.len()*offlineMsgOverhead
	s.removeLocked(ib)
	return out, nil
}

// sweepLocked drops up to limit expired messages, oldest first.
func (s *memoryOffline) sweepLocked(now time.Duration, limit int) {
	for n := 0; n < limit && len(s.byAge) > 0; n++ {
		ib := s.byAge[0]
		if !s.expired(ib.msgs.at(0).at, now) {
			return
		}
		s.popLocked(ib)
		if ib.msgs.len() == 0 {
			s.removeLocked(ib)
		} else {
			heap.Fix(&s.byAge, 0)
		}
	}
}

// trimLocked drops ib's expired messages and reports whether ib still
// exists, so that Take never returns one and Store does not count them
// against the user's bounds.
func (s *memoryOffline) trimLocked(ib *inbox, now time.Duration) bool {
	if !s.expired(ib.msgs.at(0).at, now) {
		return true
	}
	for ib.msgs.len() > 0 && s.expired(ib.msgs.at(0).at, now) {
		s.popLocked(ib)
	}
	if ib.msgs.len() == 0 {
		s.removeLocked(ib)
		return false
	}
	heap.Fix(&s.byAge, ib.index)
	return true
}

// popLocked drops ib's oldest message. The caller fixes ib's place in
// byAge, or removes ib if it is empty.
func (s *memoryOffline) popLocked(ib *inbox) {
	m := ib.msgs.pop()
	ib.bytes -= len(m.data)
	s.total -= len(m.data) + offlineMsgOverhead
}

// removeLocked forgets ib; its messages must already be out of total.
func (s *memoryOffline) removeLocked(ib *inbox) {
	heap.Remove(&s.byAge, ib.index)
	delete(s.users, ib.user)
	s.total -= offlineUserOverhead
}

func (s *memoryOffline) expired(at, now time.Duration) bool {
	return s.maxAge > 0 && now-at > s.maxAge
}

// inboxHeap is a min-heap of inboxes by the time of their oldest message,
// for container/heap.
type inboxHeap []*inbox

func (h inboxHeap) Len() int           { return len(h) }
func (h inboxHeap) Less(i, j int) bool { return h[i].msgs.at(0).at < h[j].msgs.at(0).at }
func (h inboxHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}

func (h *inboxHeap) Push(x any) {
	ib := x.(*inbox)
	ib.index = len(*h)
	*h = append(*h, ib)
}

func (h *inboxHeap) Pop() any {
	old := *h
	ib := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return ib
}
