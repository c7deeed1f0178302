package tether

import (
	"context"
	"time"
)

// Broker links the hubs of several processes (nodes) so that they serve
// one set of topics and users: a publication on any node reaches the
// topic's subscribers on every node, a direct message reaches the user
// wherever they are connected, and history, offline messages and
// presence are shared. Plug one in with [WithBroker]; without one a hub
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
	Open(node *Node) error
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

// RemoteMember is a user's presence on a topic at another node: present
// with Conns, or gone when Conns is empty.
type RemoteMember struct {
	Node string
	Member
}

// Node is a hub as its [Broker] sees it: where the broker delivers what
// the other nodes send. The hub passes it to [Broker.Open].
type Node struct {
	h  *Hub
	id string
}

// ID returns the node's ID: random, and new for every hub.
func (n *Node) ID() string { return n.id }

// Deliver hands the node a message of topic at pos. A broker calls it
// for each topic the node holds, one call at a time per topic, in
// position order. The hub drops messages it already has and replays
// those it skipped (see [Broker]).
func (n *Node) Deliver(topic string, pos Position, data []byte) {
	n.h.deliverRemote(topic, pos, data)
}

// DeliverUser hands the node a direct message for the user, sent with
// [Hub.SendToUser] on any node, and reports whether one of the user's
// conns here took it; when none did (the user just left), the broker
// keeps it as for a user with no conn. The hub keeps data: the broker
// must not modify it afterwards.
func (n *Node) DeliverUser(userID string, data []byte) bool {
	return n.h.deliverUser(userID, data)
}

// Presence hands the node changes of presence on topic at other nodes,
// in the order they happened. With snapshot set, members is the whole
// presence of the other nodes on topic, replacing what the node knew.
func (n *Node) Presence(topic string, members []RemoteMember, snapshot bool) {
	n.h.remotePresence(topic, members, snapshot)
}

// Health reports the broker's link: err when it is lost, nil once it is
// back and Hold's promises hold again. The hub reports it to
// [Observer].Broker, keeps delivering to its own conns meanwhile, and
// once the link is back catches up every topic it holds.
func (n *Node) Health(err error) {
	n.h.brokerHealth(err)
}

// brokerTimeout bounds each call the hub makes to its broker.
const brokerTimeout = 5 * time.Second

func brokerContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), brokerTimeout)
}
