// Package adapter defines what tether's adapters implement: the [Broker]
// that links the hubs of several processes, the [History] that keeps
// topics' recent messages, and the [OfflineStore] that keeps direct
// messages for users who are away, with the data types they exchange with
// a hub. An application passes an adapter to tether.WithBroker,
// tether.WithHistory or tether.WithOfflineStore, and needs nothing else
// from this package.
//
// An [Inbox] keeps a user's direct messages until a client acknowledges
// them (tether.WithInbox); a Broker may also implement [Relay] and
// [Deduper].
//
// [NewMemoryHistory] and [NewMemoryOfflineStore] are the in-process
// defaults a hub uses when it is given none: their bounds can be chosen
// here. [NewMemoryInbox] keeps inboxes in the process. Adapters for shared storage (tether/redisbroker) live in modules
// of their own.
package adapter

import (
	"context"
	"encoding/json"
	"errors"
	"time"
)

// Position is a place in a topic's history: its epoch and the seq of a
// message, 0 meaning before the first message. It is what a client sends
// as `since` to resume (PROTOCOL.md section 10).
type Position struct {
	// Epoch names the topic's current run of seqs. Compare it only for
	// equality: it changes when the history loses continuity.
	Epoch string
	// Seq is the seq of a message in Epoch; the first message is 1.
	Seq uint64
}

// HistoryEntry is one message a [History] keeps.
type HistoryEntry struct {
	Seq  uint64
	Data []byte
}

// History keeps the recent messages of each topic, so that a client that
// reconnects can resume where it left off instead of reloading.
//
// Data is opaque to an implementation, which must keep it byte for byte:
// a message published as text that is a JSON value is that value, on one
// line; any other message is one byte that says what it is (0x01 bytes,
// 0x02 text) followed by its data. The same holds for what an
// [OfflineStore] and a [Broker] carry.
//
// Implementations must be safe for concurrent use by multiple goroutines.
// The hub calls Append for a given topic one call at a time, in publish
// order, and never modifies data after passing it, so an implementation
// may keep data without copying it.
//
// [NewMemoryHistory] keeps history in the process; an adapter over shared
// storage lets several processes serve one topic.
type History interface {
	// Append records data as the next message of topic and returns its
	// position.
	Append(ctx context.Context, topic string, data []byte) (Position, error)

	// Since returns, in order, the messages of topic after pos, and the
	// topic's current position: its epoch and last seq.
	//
	// ok is false when it cannot replay them all: pos.Epoch is not the
	// current epoch, some message after pos.Seq is no longer kept, or
	// pos.Seq is beyond the last seq. The client must then resync, and
	// last is where it resumes from.
	Since(ctx context.Context, topic string, pos Position) (entries []HistoryEntry, last Position, ok bool, err error)
}

// ErrOfflineFull reports that an [OfflineStore] refused a message because
// keeping it would exceed the store's bounds. Test for it with [errors.Is]:
// the error returned wraps it with the reason.
var ErrOfflineFull = errors.New("tether: offline store full")

// OfflineStore keeps direct messages for users who have no live
// connection, until they connect, so that a short absence loses nothing.
//
// Implementations must be safe for concurrent use by multiple goroutines.
// The hub never modifies data after passing it to Store, so an
// implementation may keep data without copying it.
//
// [NewMemoryOfflineStore] keeps messages in the process; an adapter over
// shared storage lets a user connect to any process.
type OfflineStore interface {
	// Store keeps data for userID. It may push out the user's oldest
	// messages to respect its bounds; it returns an error wrapping
	// [ErrOfflineFull] when data cannot be kept at all.
	Store(ctx context.Context, userID string, data []byte) error

	// Take removes and returns userID's messages, oldest first; nil when
	// there are none.
	Take(ctx context.Context, userID string) ([][]byte, error)
}

// Member is a user present on a topic.
type Member struct {
	UserID string
	// Conns are the user's conns on the topic; empty in a leave.
	Conns []MemberConn
}

// MemberConn is one conn of a present user.
type MemberConn struct {
	ID   string          // see tether.Conn.ID
	Meta json.RawMessage // see tether.WithConnMeta; nil for none
}

// Broker links the hubs of several processes (nodes) so that they serve
// one set of topics and users: a publication on any node reaches the
// topic's subscribers on every node, a direct message reaches the user
// wherever they are connected, and history, offline messages and
// presence are shared. Plug one in with tether.WithBroker; without one a hub
// is alone, and keeps all of this in its own memory.
//
// A broker is the adapter between the hub and a real message broker
// (tether/redisbroker is one). Its contract, in short: topic messages
// are numbered by the broker and delivered to every node holding the
// topic in that order; everything else is best effort, because the hub
// repairs what a broker loses. The hub drops a repeated message, replays
// a skipped one from [Broker.Since], and when neither is possible tells
// the topic's v1 subscribers to resync.
//
// The hub bounds the methods that take a context with a timeout, and
// calls them without holding its locks, but for Since: to keep a topic's
// stream in order it reads history with the topic locked, also from
// within Node.Deliver. So Since must not wait on the broker's delivery to
// the node, and a slow Since holds up that topic. The methods without a
// context the hub may call while holding locks: they must not block
// (queue the work). Every method must be safe for concurrent use, and
// none may call the hub's methods.
type Broker interface {
	// Open starts the broker for the hub that node stands for. NewHub
	// calls it once, last; the broker delivers to node until Close.
	Open(node Node) error
	// Close stops the broker once the hub's conns are gone: it withdraws
	// this node's users and presence from the cluster and returns when
	// its goroutines have.
	Close() error

	// Publish appends data to topic's history, numbering it, and
	// delivers it to every node holding topic, this one included, with
	// [Node.Deliver].
	Publish(ctx context.Context, topic string, data []byte) (Position, error)
	// Since is [History.Since] over the broker's shared history.
	Since(ctx context.Context, topic string, pos Position) (entries []HistoryEntry, last Position, ok bool, err error)
	// Hold takes a reference on topic for this node: from when it
	// returns, the node is delivered the topic's messages and presence
	// changes. It first sends the topic's presence on the other nodes
	// with [Node.Presence] (snapshot true). The hub takes one reference
	// per subscribed conn. An error means the broker cannot deliver yet:
	// the reference is still taken, and honoured once it can.
	Hold(ctx context.Context, topic string) error
	// Release drops a reference taken by Hold.
	Release(topic string)

	// SendToUser delivers data to the user's conns on every node, with
	// [Node.DeliverUser], or keeps it for the user when they have none;
	// an error wrapping [ErrOfflineFull] means it was not kept.
	SendToUser(ctx context.Context, userID string, data []byte) error
	// Connect records that the user has a conn on this node, and returns
	// the messages kept for them, oldest first, which it no longer keeps.
	Connect(ctx context.Context, userID string) ([][]byte, error)
	// Disconnect records that the user's last conn on this node is gone.
	Disconnect(userID string)
	// Online reports whether the user has a conn on any node.
	Online(ctx context.Context, userID string) (bool, error)

	// Join records that the user is present on topic at this node, with
	// these conns; called again when they change.
	Join(topic, userID string, conns []MemberConn)
	// Leave records that the user has left topic at this node.
	Leave(topic, userID string)
	// Members returns the users present on topic on every node, sorted
	// by user ID, each with their conns on all nodes.
	Members(ctx context.Context, topic string) ([]Member, error)
}

// Deduper is what a [Broker] may also implement so that a client's
// request takes effect once across nodes: a client that reconnects to
// another node sends its unanswered publications again with the same ids
// (PROTOCOL.md, "pub"). Without it, each node remembers only the ids it
// saw itself. A [History] kept on disk may implement it too, so that a
// hub without a broker remembers them across its own restarts.
type Deduper interface {
	// Once records key for ttl and reports whether it is new: false when
	// it was recorded within ttl, by any node.
	Once(ctx context.Context, key string, ttl time.Duration) (bool, error)
	// Forget drops key: what it named was not carried out after all.
	Forget(ctx context.Context, key string) error
}

// Relay is what a [Broker] may also implement so that the hub's
// operations on every conn, or on all of a user's conns, reach every
// node: tether.Hub's Broadcast, DisconnectUser, SubscribeUser and
// UnsubscribeUser, and LastSeen for users gone from every node. Without
// it they reach this node's conns only.
type Relay interface {
	// Relay hands cmd to [Node.Relay] on every other live node or, when
	// userID is not empty, on every other node where the user has a conn.
	// It is best effort: a node it cannot reach misses cmd, and no error
	// says so. cmd is opaque to the broker.
	Relay(ctx context.Context, userID string, cmd []byte) error
	// LastSeen returns when the user's last conn on a node ended, as the
	// cluster remembers it; ok is false when it remembers none.
	LastSeen(ctx context.Context, userID string) (at time.Time, ok bool, err error)
}

// RemoteMember is a user's presence on a topic at another node: present
// with Conns, or gone when Conns is empty.
type RemoteMember struct {
	Node string
	Member
}

// Node is a hub as its [Broker] sees it: where the broker delivers what
// the other nodes send. The hub passes it to [Broker.Open]. Its methods
// are safe for concurrent use and do not block on the network.
type Node interface {
	// ID returns the node's ID: random, and new for every hub.
	ID() string
	// Deliver hands the node a message of topic at pos. A broker calls it
	// for each topic the node holds, one call at a time per topic, in
	// position order. The hub drops messages it already has and replays
	// those it skipped (see [Broker]).
	Deliver(topic string, pos Position, data []byte)
	// DeliverUser hands the node a direct message for the user, sent by
	// the application on any node, and reports whether one of the user's
	// conns here took it; when none did (the user just left), the broker
	// keeps it as for a user with no conn. The hub keeps data: the broker
	// must not modify it afterwards.
	DeliverUser(userID string, data []byte) bool
	// Presence hands the node changes of presence on topic at other
	// nodes, in the order they happened. With snapshot set, members is the
	// whole presence of the other nodes on topic, replacing what the node
	// knew.
	Presence(topic string, members []RemoteMember, snapshot bool)
	// Relay hands the node a command that another node's hub sent with
	// [Relay.Relay]. The hub keeps cmd.
	Relay(cmd []byte)
	// Health reports the broker's link: err when it is lost, nil once it
	// is back and Hold's promises hold again. The hub reports it to its
	// observer, keeps delivering to its own conns meanwhile, and once the
	// link is back catches up every topic it holds.
	Health(err error)
}
