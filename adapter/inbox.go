package adapter

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrInboxFull reports that an [Inbox] refused a message because the
// user already has as many unacknowledged messages as it keeps, or it
// holds as much data as it may. Test for it with [errors.Is]: the error
// returned wraps it with the reason.
var ErrInboxFull = errors.New("tether: inbox full")

// InboxEntry is one message an [Inbox] keeps for a user.
type InboxEntry struct {
	Seq  uint64
	Data []byte
}

// Inbox keeps each user's direct messages until a client of the user
// acknowledges them, so that a message sent while a conn was dying, or
// while the user had none, is delivered when the user comes back
// (PROTOCOL.md, "Inbox"). The messages of a user are numbered from 1 in
// an epoch of the user's inbox; the epoch changes when the inbox loses
// continuity (it was emptied and forgotten, or the store restarted
// without it), so that a client compares seqs within one epoch only.
//
// It is per user, not per device: an acknowledgement from any of the
// user's clients drops the messages it covers for all of them.
//
// Data is opaque to an implementation, which keeps it byte for byte, as
// a [History] does. Implementations must be safe for concurrent use. The
// hub calls Append for a user one call at a time, in the order of the
// messages, and never modifies data after passing it.
type Inbox interface {
	// Append keeps data as the user's next message and returns its
	// place: the inbox's epoch and the message's seq. An error wrapping
	// [ErrInboxFull] means it was not kept, because of the bounds.
	Append(ctx context.Context, userID string, data []byte) (Position, error)
	// Pending returns the user's unacknowledged messages, oldest first,
	// and the inbox's epoch ("" when the user has none).
	Pending(ctx context.Context, userID string) (epoch string, entries []InboxEntry, err error)
	// Ack drops the user's messages up to pos.Seq, when pos.Epoch is the
	// inbox's epoch; otherwise it does nothing.
	Ack(ctx context.Context, userID string, pos Position) error
}

// inboxMsgOverhead is what a kept message counts against the total bound
// beyond its data, as for the offline store.
const inboxMsgOverhead = 64

// NewMemoryInbox returns an [Inbox] in this process's memory that keeps,
// per user, at most messages unacknowledged messages, each for at most
// maxAge, and at most totalBytes of data (each message counting its
// length plus 64 bytes) over all users.
//
// A message past a user's bound, or past the total, is refused with
// [ErrInboxFull]: it never pushes out an unacknowledged one, which is the
// point of an inbox. A message older than maxAge is dropped as if
// acknowledged (maxAge <= 0: never); expired messages go when the user's
// inbox is next used, and all at once before a message is refused for
// the total bound. With messages or totalBytes <= 0 it keeps nothing.
//
// A user whose inbox empties is forgotten, so a user without messages
// costs nothing; their next message starts a new epoch. Epochs are
// random, so a restart of the process changes them all (its messages are
// gone with it). Append keeps data without copying it.
//
// Its methods ignore ctx: they never block.
func NewMemoryInbox(messages int, maxAge time.Duration, totalBytes int) Inbox {
	return &memoryInbox{
		messages:   messages,
		totalBytes: totalBytes,
		maxAge:     max(maxAge, 0),
		base:       time.Now(),
		users:      make(map[string]*userInbox),
	}
}

type memoryInbox struct {
	messages, totalBytes int
	maxAge               time.Duration
	base                 time.Time

	mu    sync.Mutex // guards the fields below and every userInbox
	users map[string]*userInbox
	total int
}

// userInbox is a user's unacknowledged messages, in seq order; it is
// never empty but while Append fills it.
type userInbox struct {
	epoch string
	next  uint64 // the seq of the next message
	msgs  fifo[inboxMsg]
}

type inboxMsg struct {
	seq  uint64
	data []byte
	at   time.Duration
}

func (s *memoryInbox) Append(_ context.Context, userID string, data []byte) (Position, error) {
	if s.messages <= 0 || s.totalBytes <= 0 {
		return Position{}, fmt.Errorf("%w: it keeps no messages", ErrInboxFull)
	}
	cost := len(data) + inboxMsgOverhead
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Since(s.base)
	ib := s.liveLocked(userID, now)
	if ib != nil && ib.msgs.len() >= s.messages {
		return Position{}, fmt.Errorf("%w: %d unacknowledged messages for the user", ErrInboxFull, ib.msgs.len())
	}
	if s.total+cost > s.totalBytes {
		for u := range s.users {
			s.liveLocked(u, now)
		}
		ib = s.users[userID]
		if s.total+cost > s.totalBytes {
			return Position{}, fmt.Errorf("%w: over the total limit of %d bytes", ErrInboxFull, s.totalBytes)
		}
	}
	if ib == nil {
		ib = &userInbox{epoch: newEpoch(), next: 1}
		s.users[userID] = ib
	}
	seq := ib.next
	ib.next++
	ib.msgs.push(inboxMsg{seq: seq, data: data, at: now}, s.messages)
	s.total += cost
	return Position{Epoch: ib.epoch, Seq: seq}, nil
}

func (s *memoryInbox) Pending(_ context.Context, userID string) (string, []InboxEntry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ib := s.liveLocked(userID, time.Since(s.base))
	if ib == nil {
		return "", nil, nil
	}
	out := make([]InboxEntry, ib.msgs.len())
	for i := range out {
		m := ib.msgs.at(i)
		out[i] = InboxEntry{Seq: m.seq, Data: m.data}
	}
	return ib.epoch, out, nil
}

func (s *memoryInbox) Ack(_ context.Context, userID string, pos Position) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ib := s.users[userID]
	if ib == nil || ib.epoch != pos.Epoch {
		return nil
	}
	for ib.msgs.len() > 0 && ib.msgs.at(0).seq <= pos.Seq {
		s.popLocked(ib)
	}
	if ib.msgs.len() == 0 {
		delete(s.users, userID)
	}
	return nil
}

// liveLocked drops the user's expired messages and returns their inbox,
// nil when it is empty (and forgotten).
func (s *memoryInbox) liveLocked(userID string, now time.Duration) *userInbox {
	ib := s.users[userID]
	if ib == nil {
		return nil
	}
	for ib.msgs.len() > 0 && s.maxAge > 0 && now-ib.msgs.at(0).at > s.maxAge {
		s.popLocked(ib)
	}
	if ib.msgs.len() == 0 {
		delete(s.users, userID)
		return nil
	}
	return ib
}

func (s *memoryInbox) popLocked(ib *userInbox) {
	m := ib.msgs.pop()
	s.total -= len(m.data) + inboxMsgOverhead
}
