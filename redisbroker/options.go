package redisbroker

import (
	"log/slog"
	"time"

	"github.com/tether-ws/tether"
)

// Option configures a [Broker].
type Option func(*config)

type config struct {
	prefix     string
	historyLen int
	historyAge time.Duration
	offlineLen int
	offlineAge time.Duration
	inboxLen   int
	inboxAge   time.Duration
	nodeTTL    time.Duration
	backoff    tether.Backoff
	logger     *slog.Logger
}

// Defaults, documented on the options that change them.
const (
	defaultHistoryLen = 1000
	defaultHistoryAge = 10 * time.Minute
	defaultOfflineLen = 100
	defaultOfflineAge = 24 * time.Hour
	defaultInboxLen   = 1000
	defaultInboxAge   = 7 * 24 * time.Hour
	defaultNodeTTL    = 15 * time.Second
)

func defaults() config {
	return config{
		prefix:     "tether",
		historyLen: defaultHistoryLen,
		historyAge: defaultHistoryAge,
		offlineLen: defaultOfflineLen,
		offlineAge: defaultOfflineAge,
		inboxLen:   defaultInboxLen,
		inboxAge:   defaultInboxAge,
		nodeTTL:    defaultNodeTTL,
		backoff:    tether.Backoff{Base: 100 * time.Millisecond, Max: 5 * time.Second},
	}
}

// WithInbox sets the bounds of the users' inboxes that [Broker.Inbox]
// keeps: at most messages unacknowledged messages per user, by default
// 1,000, each for at most maxAge, by default 7 days.
func WithInbox(messages int, maxAge time.Duration) Option {
	return func(c *config) {
		c.inboxLen, c.inboxAge = messages, maxAge
	}
}

// WithPrefix sets the prefix of every Redis key and channel the broker
// uses, "tether" by default: hubs with the same prefix share topics and
// users, hubs with different ones do not.
func WithPrefix(p string) Option {
	return func(c *config) {
		if p != "" {
			c.prefix = p
		}
	}
}

// WithHistory sets how many of each topic's latest messages the broker
// keeps for clients that resume (about: streams are trimmed with
// MAXLEN ~), and for how long, by default 1,000 for 10 minutes. With
// messages <= 0 it keeps none but still numbers them. A topic's epoch
// lives an hour past its last message, or maxAge when longer.
func WithHistory(messages int, maxAge time.Duration) Option {
	return func(c *config) { c.historyLen, c.historyAge = max(messages, 0), max(maxAge, 0) }
}

// WithOffline sets how many direct messages the broker keeps for a user
// with no conn on any node, oldest pushed out first, and for how long, by
// default 100 for 24 hours. With messages <= 0 it keeps none, and
// SendToUser to such a user returns an error wrapping
// [adapter.ErrOfflineFull].
func WithOffline(messages int, maxAge time.Duration) Option {
	return func(c *config) { c.offlineLen, c.offlineAge = max(messages, 0), max(maxAge, 0) }
}

// WithNodeTTL sets how long a node that stops renewing its heartbeat (it
// renews every third of ttl) counts as alive, 15 s by default: when a
// node dies without a word, its users leave presence and Online within
// about ttl, and direct messages for them are kept offline.
func WithNodeTTL(ttl time.Duration) Option {
	return func(c *config) {
		if ttl > 0 {
			c.nodeTTL = ttl
		}
	}
}

// WithBackoff sets the delays between attempts to reach Redis again once
// the link is lost, by default from 100 ms up to 5 s with full jitter.
func WithBackoff(b tether.Backoff) Option {
	return func(c *config) { c.backoff = b }
}

// WithLogger sets the logger of the broker's warnings (the link lost, a
// node reaped), slog.Default() by default.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}
