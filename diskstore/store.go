// Package diskstore keeps a tether hub's history and offline messages in a
// file on local disk, so that they survive a restart, and a crash: a
// topic's messages and its epoch are still there when the process comes
// back, so its clients resume (PROTOCOL.md, section 10) instead of
// reloading, and direct messages kept for users who were away still
// reach them. The history also remembers the ids of clients'
// publications ([adapter.Deduper]), so that one sent again after a
// restart takes effect once, and the store has an [adapter.Inbox]
// ([Store.Inbox]) for users' direct messages until they are acknowledged.
//
//	st, err := diskstore.Open("/var/lib/myapp/tether.db")
//	...
//	hub, err := tether.NewHub(
//		tether.WithHistory(st.History()),
//		tether.WithOfflineStore(st.Offline()),
//	)
//	...
//	hub.Shutdown(ctx)
//	st.Close() // after the hub
//
// # Durability
//
// By default ([SyncAlways]) an Append, a Store and a Take, and an
// Inbox's Append and Ack, are on disk when they return: their transaction
// is committed and the file fsynced (fdatasync), so what a hub
// acknowledged to a client survives kill -9, a kernel panic and a power
// cut. Calls made at the same time share one commit and one fsync (group
// commit): while one commit is being written, the calls that arrive queue
// up, and the next commit takes them all, so many topics published at
// once cost few fsyncs, and a call alone waits for nothing but its own. A hub calls Append for a topic one call at a
// time, and handles a client's publications one at a time, so one topic,
// or one publishing client, is held to one publication per fsync;
// publications to many topics, or from many clients, are grouped. The
// grouping is the store's own rather than bbolt's DB.Batch, which waits
// up to MaxBatchDelay (10 ms) for company before it commits: a topic,
// whose Appends come one at a time, would get about 100 a second
// (BenchmarkCommit measures both). The figures are in BENCHMARKS.md,
// "Disk store". [SyncNever] skips the fsync (see there for what it
// risks).
//
// A request id given to the history's Once is not written at once: it
// goes to disk in the commit of the next write called after it (for a
// publication, its own Append), or within 50 ms on its own, so that an id
// and the publication it guards are on disk together (see dedupe.go for
// why, and for what remains of the window between them).
//
// # Bounds
//
// The store honours the contracts of [adapter.History],
// [adapter.OfflineStore] and [adapter.Inbox] with the bounds and behaviour
// of [adapter.NewMemoryHistory], [adapter.NewMemoryOfflineStore] and
// [adapter.NewMemoryInbox], and the same defaults as a hub without it:
// 256 messages for 2 minutes per topic ([WithHistory]); 100 messages and
// 256 KiB per user for 24 hours, 64 MiB in all ([WithOffline]). The inbox
// keeps 1,000 unacknowledged messages per user for 7 days, 64 MiB in all
// ([WithInbox]). Request ids are kept for the ttl the hub gives (2
// minutes), at most 131,072 of them as the hub keeps in memory, past which
// the one closest to expiry goes; the store holds them in memory too,
// where Once looks them up. A topic's old messages are trimmed in the
// transaction that appends (up to 64 per call: the bound holds from the
// next call on, even after a reopen with a smaller one), expired messages
// and idle records dropped lazily by the calls that write, a few at a time
// (up to 64 records of each kind, 256 messages of forgotten topics, 64
// expired offline and inbox messages per call, and as many expired
// request ids as a commit writes plus 64), with no goroutine but the
// committer. Whatever the file still holds, Since, Take and Pending never
// return what the bounds exclude. The file grows to hold what the bounds
// allow and does not shrink: freed pages are reused.
//
// Reads do not wait for writes: Since of a topic the store knows, and
// Take for a user with nothing kept, read a snapshot. Since of a topic it
// does not know (a first subscription) writes the topic's record and its
// epoch, a commit, so that the epoch it returns survives a restart. A
// Take is on disk when it returns: what it took is not given again, even
// if the process dies before the hub delivered it (at most once, as with
// the memory store). An inbox's Pending reads a snapshot, and so does an
// Ack that drops nothing (of another epoch, or already acknowledged), and
// the history's Once, which writes nothing itself (see Durability).
//
// # Epochs
//
// Each topic's epoch is random and stored with it, so a restart keeps it.
// A topic gets a new epoch exactly when a memory history would give it
// one: when its record is forgotten (idle for an hour, or maxAge when
// longer; 10 minutes for a topic that never had a message; the one
// appended to least recently beyond 2^20 topics, the oldest beyond 8,192
// topics without a message), or when its seq would reach 2^53. If the
// file is lost or replaced, every topic starts a new random epoch: a
// client's old position is unknown, so it resyncs, which is right.
//
// A user's inbox has a random epoch of its own too, kept by a restart; the
// inbox is forgotten once all its messages are acknowledged or expired,
// and the user's next message starts a new epoch, as in memory.
//
// # Why bbolt
//
// The file is a go.etcd.io/bbolt database: pure Go (no cgo), one file,
// ACID transactions with an fsync at commit, and a B+tree with ordered
// keys, so that a topic's messages lie in seq order and are read and
// trimmed with a cursor; a small, well-kept library made for this. Pebble
// is a log-structured merge tree with far more machinery (compactions,
// a write-ahead log of its own) than a bounded log per topic needs, and
// SQLite without cgo (modernc.org/sqlite) is a large machine-translated
// dependency.
//
// One process at a time opens a file: bbolt locks it, and [Open] gives up
// after [WithLockTimeout] (1 s by default) with an error that says so.
package diskstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tether-ws/tether/adapter"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrClosed is returned, wrapped, by calls made after [Store.Close].
var ErrClosed = errors.New("diskstore: store closed")

// Store is a history, an offline store and an inbox in one file. Create
// it with [Open], give [Store.History], [Store.Offline] (and
// [Store.Inbox]) to a hub, and close it after the hub. It is safe for
// concurrent use; one process at a time opens a file.
//
// The calls check their context on entry only: once a write is queued it
// is carried out, and the call returns how it went.
type Store struct {
	db   *bolt.DB
	cfg  config
	path string
	hist *history
	off  *offline
	ib   *inbox
	keys dedupeKeys // the request ids known, on disk and on their way (dedupe.go)

	mu       sync.Mutex // guards queue, enqueued and closed
	queue    []*op
	enqueued uint64 // ops ever queued: the idx of the last one
	closed   bool
	wake     chan struct{} // cap 1: the committer has work
	done     chan struct{} // closed when the committer has returned
}

// Sync is the durability of the store's writes: see [WithSync].
type Sync int

const (
	// SyncAlways, the default, fsyncs each commit before the calls in it
	// return: what they wrote survives a crash of the process, of the
	// machine and a power cut.
	SyncAlways Sync = iota
	// SyncNever never fsyncs: the kernel writes the file back when it
	// sees fit. What a call wrote survives a crash of the process
	// (kill -9: the kernel still has it) but not of the machine or its
	// power, which can lose the last seconds of writes or, as bbolt
	// warns, corrupt the file, which Open then refuses: delete it, and
	// clients resync. Use it where the disk cannot keep up with the
	// publications, and a power cut may cost a resync.
	SyncNever
)

func (s Sync) String() string {
	switch s {
	case SyncAlways:
		return "SyncAlways"
	case SyncNever:
		return "SyncNever"
	}
	return fmt.Sprintf("Sync(%d)", int(s))
}

// Option configures a [Store].
type Option func(*config)

type config struct {
	histMessages int
	histAge      time.Duration
	offMessages  int
	offBytes     int
	offAge       time.Duration
	offTotal     int
	inMessages   int
	inAge        time.Duration
	inTotal      int
	sync         Sync
	lockTimeout  time.Duration
	// Caps on topic records and request ids, variables for the tests.
	maxTopics, maxEmpty int
	dedupeKeys          int
}

// Defaults: those of a tether hub without a store of its own.
const (
	defaultHistoryLen   = 256
	defaultHistoryAge   = 2 * time.Minute
	defaultOfflineLen   = 100
	defaultOfflineBytes = 256 << 10
	defaultOfflineAge   = 24 * time.Hour
	defaultOfflineTotal = 64 << 20
	defaultLockTimeout  = time.Second
)

// WithHistory bounds the history as [adapter.NewMemoryHistory] does: for
// each topic, up to messages of its latest messages, none older than
// maxAge. The default is 256 messages for 2 minutes. With messages <= 0
// it keeps none but still numbers them; with maxAge <= 0 they do not
// expire.
func WithHistory(messages int, maxAge time.Duration) Option {
	return func(c *config) { c.histMessages, c.histAge = max(messages, 0), max(maxAge, 0) }
}

// WithOffline bounds the offline store as [adapter.NewMemoryOfflineStore]
// does: per user, at most messages messages and bytes bytes of data, each
// for at most maxAge, and at most totalBytes over all users, each message
// counting 64 bytes more and each user with messages 128. The default is
// 100 messages and 256 KiB per user, 24 hours, 64 MiB in all. With
// messages, bytes or totalBytes <= 0 it keeps nothing; with maxAge <= 0
// messages do not expire. Before it refuses a message for totalBytes,
// Store drops up to 4,096 expired messages (the memory store drops them
// all), so that one call never holds up the other writes for long.
func WithOffline(messages, bytes int, maxAge time.Duration, totalBytes int) Option {
	return func(c *config) {
		c.offMessages, c.offBytes, c.offAge, c.offTotal = messages, bytes, max(maxAge, 0), totalBytes
	}
}

// WithSync sets the durability of writes, [SyncAlways] by default.
func WithSync(s Sync) Option {
	return func(c *config) { c.sync = s }
}

// WithLockTimeout sets how long [Open] waits for a file that another
// process holds, 1 s by default; at least 1 ms.
func WithLockTimeout(d time.Duration) Option {
	return func(c *config) { c.lockTimeout = max(d, time.Millisecond) }
}

// Open opens the store in the file at path, creating it (mode 0600) if it
// does not exist. It fails if another process holds the file (after
// [WithLockTimeout]), or if the file is not a store's.
func Open(path string, opts ...Option) (*Store, error) {
	cfg := config{
		histMessages: defaultHistoryLen,
		histAge:      defaultHistoryAge,
		offMessages:  defaultOfflineLen,
		offBytes:     defaultOfflineBytes,
		offAge:       defaultOfflineAge,
		offTotal:     defaultOfflineTotal,
		inMessages:   defaultInboxLen,
		inAge:        defaultInboxAge,
		inTotal:      defaultInboxTotal,
		lockTimeout:  defaultLockTimeout,
		maxTopics:    maxHistoryRecords,
		maxEmpty:     maxEmptyRecords,
		dedupeKeys:   defaultDedupeKeys,
	}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	if cfg.sync != SyncAlways && cfg.sync != SyncNever {
		return nil, fmt.Errorf("diskstore: open %s: unknown %v", path, cfg.sync)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout: cfg.lockTimeout,
		// As etcd does: the freelist is rebuilt at Open rather than
		// written at every commit, and kept in a map.
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
		NoSync:         cfg.sync == SyncNever,
	})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("diskstore: open %s: the file is locked by another process (is another hub running on it?); gave up after %v: %w", path, cfg.lockTimeout, err)
	}
	if err != nil {
		return nil, fmt.Errorf("diskstore: open %s: %w", path, err)
	}
	s := &Store{
		db:   db,
		cfg:  cfg,
		path: path,
		wake: make(chan struct{}, 1),
		done: make(chan struct{}),
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := initFile(tx); err != nil {
			return err
		}
		return s.keys.load(tx, time.Now().UnixNano())
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("diskstore: open %s: %w", path, err)
	}
	s.hist = &history{s: s}
	s.off = &offline{s: s}
	s.ib = &inbox{s: s}
	go s.commitLoop()
	return s, nil
}

// initFile creates the buckets of a new file, and checks that an old one
// is a store's, of this format.
func initFile(tx *bolt.Tx) error {
	if meta := tx.Bucket(bucketMeta); meta != nil {
		if v := meta.Get(keyFormat); string(v) != formatVersion {
			return fmt.Errorf("diskstore: the file's format is %q, this version reads %q", v, formatVersion)
		}
	} else {
		empty := true
		tx.ForEach(func([]byte, *bolt.Bucket) error { empty = false; return nil })
		if !empty {
			return errors.New("diskstore: the file is a bbolt database of something else")
		}
	}
	for _, name := range allBuckets {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketMeta).Put(keyFormat, []byte(formatVersion))
}

// History returns the store's [adapter.History], for tether.WithHistory.
// It is also an [adapter.Deduper], which a hub without a broker uses to
// remember its clients' request ids across restarts.
func (s *Store) History() adapter.History { return s.hist }

// Offline returns the store's [adapter.OfflineStore], for
// tether.WithOfflineStore.
func (s *Store) Offline() adapter.OfflineStore { return s.off }

// Path returns the file's path.
func (s *Store) Path() string { return s.path }

// Close waits for the calls in progress, then closes the file. Close the
// hub first: calls made after Close return an error wrapping [ErrClosed].
// Closing twice returns nil.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.signal()
	<-s.done
	return s.db.Close()
}

// op is a write that the committer runs in a transaction with others.
// fn runs in the committer's goroutine and may run twice (see commit):
// it must leave nothing behind but its writes to tx and its results,
// which a second run overwrites.
type op struct {
	fn  func(tx *bolt.Tx) error
	err chan error // buffered
	idx uint64     // its place in the order of calls, from 1
}

// maxBatch bounds the calls in one transaction, so that a crowd of them
// does not make one commit so big that the next waits long.
const maxBatch = 1024

// update runs fn in a write transaction, committed (and synced, by
// default) when update returns, with the other calls queued meanwhile.
func (s *Store) update(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	o := &op{fn: fn, err: make(chan error, 1)}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.enqueued++
	o.idx = s.enqueued
	s.queue = append(s.queue, o)
	s.mu.Unlock()
	s.signal()
	// Once queued, a write is carried out whatever ctx says: the caller
	// learns how it went.
	return <-o.err
}

// view runs fn in a read transaction, which does not wait for writes.
func (s *Store) view(fn func(tx *bolt.Tx) error) error {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return ErrClosed
	}
	err := s.db.View(fn)
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

func (s *Store) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// commitLoop is the committer: it commits what is queued, all of it in
// one transaction (up to maxBatch), as soon as the previous commit is
// done, with the request ids recorded before (see dedupeKeys.take). Ids
// that no write took along it commits on its own after keyFlushDelay.
// It returns once Close was called, the queue is empty and the ids are
// written.
func (s *Store) commitLoop() {
	defer close(s.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-s.wake:
		case <-timer.C:
		}
		for {
			s.mu.Lock()
			n := min(len(s.queue), maxBatch)
			batch := s.queue[:n:n]
			s.queue = s.queue[n:]
			if len(s.queue) == 0 {
				s.queue = nil // let the backing array go
			}
			closed := s.closed && n == 0
			s.mu.Unlock()
			if closed {
				s.commit(nil, s.keys.take(func(pendingKey) bool { return true }))
				return
			}
			if n == 0 {
				break
			}
			last := batch[n-1].idx
			s.commit(batch, s.keys.take(func(p pendingKey) bool { return p.after < last }))
		}
		// Ids that waited long enough for a write, or too many of them.
		now := time.Now()
		s.commit(nil, s.keys.take(func(p pendingKey) bool { return now.Sub(p.added) >= keyFlushDelay }))
		if next, ok := s.keys.oldest(); ok {
			timer.Reset(max(keyFlushDelay-time.Since(next), 0))
		}
	}
}

// commit runs the ops of batch in one transaction, then writes keys, the
// request ids that go with it. If one op fails, the transaction is rolled
// back and each op runs again in one of its own, so that one failure
// fails only its call, and the ids in one of theirs. Ids not written wait
// for the next commit.
func (s *Store) commit(batch []*op, keys flushKeys) {
	dropped, onDisk := []keyWrite(nil), keys.onDisk
	if len(batch) == 0 && len(keys.writes) == 0 {
		s.keys.written(keys, dropped, onDisk) // stale entries, if any
		return
	}
	write := func(tx *bolt.Tx) error {
		if len(keys.writes) == 0 {
			return nil
		}
		var err error
		dropped, onDisk, err = keys.writeTx(tx, time.Now().UnixNano(), s.cfg.dedupeKeys)
		return err
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, o := range batch {
			if err := o.fn(tx); err != nil {
				return err
			}
		}
		return write(tx)
	})
	if err == nil {
		s.keys.written(keys, dropped, onDisk)
		for _, o := range batch {
			o.err <- nil
		}
		return
	}
	if len(batch) == 1 && len(keys.writes) == 0 {
		s.keys.written(keys, nil, keys.onDisk)
		batch[0].err <- err
		return
	}
	errs := make([]error, len(batch))
	for i, o := range batch {
		errs[i] = s.db.Update(o.fn)
	}
	if len(keys.writes) == 0 || s.db.Update(write) == nil {
		s.keys.written(keys, dropped, onDisk)
	}
	for i, o := range batch {
		o.err <- errs[i]
	}
}

// counter reads a counter of the meta bucket.
func counter(tx *bolt.Tx, key []byte) (uint64, error) {
	return decodeU64(tx.Bucket(bucketMeta).Get(key))
}

// addCounter adds d to a counter of the meta bucket.
func addCounter(tx *bolt.Tx, key []byte, d int64) error {
	v, err := counter(tx, key)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketMeta).Put(key, u64(uint64(int64(v)+d)))
}
