package diskstore

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// This file is the store's on-disk format: the keys and values it puts in
// bbolt, and their encoders and decoders. A decoder never trusts what it
// reads (the file may be damaged, or written by a later version): it
// returns errCorrupt rather than panic or make up a value.
//
// Every integer is big-endian, so that keys sort by their numbers.
//
//	bucket   key                         value
//	meta     "format"                    formatVersion
//	meta     "ntopics" "nempty" "ototal" uint64 counters
//	topics   "n", topic name             topicRec
//	msgs     topic id, seq               message: at, data
//	hidx     touched, topic id           topic name (topics with messages)
//	hempty   touched, topic id           topic name (topics without)
//	gc       topic id                    - (forgotten, messages still to purge)
//	users    "n", user ID                userRec
//	omsgs    user id, n                  message: at, data
//	oage     at, user id, n              user ID
//	iusers   "n", user ID                inboxRec
//	imsgs    inbox id, seq               message: at, data
//	iage     at, inbox id, seq           user ID
//	dexp     expiry, request id          -
//	meta     "itotal"                    uint64 counter
//
// The buckets from iusers on came after the first files of this format,
// which hold none: Open creates them, and a version that does not know
// them leaves them alone.

// formatVersion names the layout above; Open refuses a file with another.
const formatVersion = "tether-diskstore 1"

var (
	bucketMeta   = []byte("meta")
	bucketTopics = []byte("topics")
	bucketMsgs   = []byte("msgs")
	bucketHIdx   = []byte("hidx")
	bucketHEmpty = []byte("hempty")
	bucketGC     = []byte("gc")
	bucketUsers  = []byte("users")
	bucketOMsgs  = []byte("omsgs")
	bucketOAge   = []byte("oage")
	bucketIUsers = []byte("iusers")
	bucketIMsgs  = []byte("imsgs")
	bucketIAge   = []byte("iage")
	bucketDExp   = []byte("dexp")

	allBuckets = [][]byte{bucketMeta, bucketTopics, bucketMsgs, bucketHIdx, bucketHEmpty, bucketGC, bucketUsers, bucketOMsgs, bucketOAge,
		bucketIUsers, bucketIMsgs, bucketIAge, bucketDExp}

	keyFormat  = []byte("format")
	keyNTopics = []byte("ntopics")
	keyNEmpty  = []byte("nempty")
	keyOTotal  = []byte("ototal")
	keyITotal  = []byte("itotal")
)

// errCorrupt reports a record the store cannot read.
var errCorrupt = errors.New("diskstore: corrupt record")

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errCorrupt}, args...)...)
}

// recVersion is the first byte of every record, so that a later format
// can be told apart.
const recVersion = 1

// topicRec is a topic's history record. Its messages are those of msgs
// under id, seqs up to seq, and contiguous: trimming only ever removes the
// oldest.
type topicRec struct {
	id       uint64 // never reused: a new record of the topic gets a new one
	seq      uint64 // the last seq handed out in epoch; 0 before the first
	touched  int64  // unix ns: the last Append, or the record's creation before it
	appended bool   // it has had a message (in hidx), or not (in hempty)
	epoch    string
}

const topicRecFixed = 1 + 1 + 8 + 8 + 8 + 1 // version, flags, id, seq, touched, len(epoch)

func (r topicRec) encode() []byte {
	b := make([]byte, topicRecFixed, topicRecFixed+len(r.epoch))
	b[0] = recVersion
	if r.appended {
		b[1] = 1
	}
	binary.BigEndian.PutUint64(b[2:], r.id)
	binary.BigEndian.PutUint64(b[10:], r.seq)
	binary.BigEndian.PutUint64(b[18:], uint64(r.touched))
	b[26] = byte(len(r.epoch))
	return append(b, r.epoch...)
}

func decodeTopicRec(b []byte) (topicRec, error) {
	if len(b) < topicRecFixed {
		return topicRec{}, corrupt("topic record of %d bytes", len(b))
	}
	if b[0] != recVersion || b[1]&^1 != 0 {
		return topicRec{}, corrupt("topic record version %d, flags %#x", b[0], b[1])
	}
	r := topicRec{
		appended: b[1] == 1,
		id:       binary.BigEndian.Uint64(b[2:]),
		seq:      binary.BigEndian.Uint64(b[10:]),
		touched:  int64(binary.BigEndian.Uint64(b[18:])),
	}
	n := int(b[26])
	if n == 0 || len(b) != topicRecFixed+n || r.id == 0 || r.seq > maxSeq {
		return topicRec{}, corrupt("topic record: id %d, seq %d, epoch of %d bytes in %d", r.id, r.seq, n, len(b))
	}
	r.epoch = string(b[topicRecFixed:])
	return r, nil
}

// userRec is a user's offline record: their messages are those of omsgs
// under id, n from head to tail-1, oldest first. A user without messages
// has no record.
type userRec struct {
	id         uint64
	head, tail uint64
	bytes      int64 // sum of the messages' data
	lastAt     int64 // unix ns of the newest message, so that ats never go back
}

const userRecLen = 1 + 8 + 8 + 8 + 8 + 8

func (r userRec) n() int { return int(r.tail - r.head) }

func (r userRec) encode() []byte {
	b := make([]byte, userRecLen)
	b[0] = recVersion
	binary.BigEndian.PutUint64(b[1:], r.id)
	binary.BigEndian.PutUint64(b[9:], r.head)
	binary.BigEndian.PutUint64(b[17:], r.tail)
	binary.BigEndian.PutUint64(b[25:], uint64(r.bytes))
	binary.BigEndian.PutUint64(b[33:], uint64(r.lastAt))
	return b
}

func decodeUserRec(b []byte) (userRec, error) {
	if len(b) != userRecLen || b[0] != recVersion {
		return userRec{}, corrupt("user record of %d bytes", len(b))
	}
	r := userRec{
		id:     binary.BigEndian.Uint64(b[1:]),
		head:   binary.BigEndian.Uint64(b[9:]),
		tail:   binary.BigEndian.Uint64(b[17:]),
		bytes:  int64(binary.BigEndian.Uint64(b[25:])),
		lastAt: int64(binary.BigEndian.Uint64(b[33:])),
	}
	// A user with a record has at least one message, and no more than
	// an int counts.
	if r.id == 0 || r.head >= r.tail || r.tail-r.head > 1<<31 || r.bytes < 0 {
		return userRec{}, corrupt("user record: id %d, messages %d to %d, %d bytes", r.id, r.head, r.tail, r.bytes)
	}
	return r, nil
}

// inboxRec is a user's inbox record: their unacknowledged messages are
// those of imsgs under id, seqs from head to next-1, oldest first, in
// epoch. A user without messages has no record, so that their next
// message starts a new epoch.
type inboxRec struct {
	id         uint64
	head, next uint64
	lastAt     int64 // unix ns of the newest message, so that ats never go back
	epoch      string
}

const inboxRecFixed = 1 + 8 + 8 + 8 + 8 + 1 // version, id, head, next, lastAt, len(epoch)

func (r inboxRec) n() int { return int(r.next - r.head) }

func (r inboxRec) encode() []byte {
	b := make([]byte, inboxRecFixed, inboxRecFixed+len(r.epoch))
	b[0] = recVersion
	binary.BigEndian.PutUint64(b[1:], r.id)
	binary.BigEndian.PutUint64(b[9:], r.head)
	binary.BigEndian.PutUint64(b[17:], r.next)
	binary.BigEndian.PutUint64(b[25:], uint64(r.lastAt))
	b[33] = byte(len(r.epoch))
	return append(b, r.epoch...)
}

func decodeInboxRec(b []byte) (inboxRec, error) {
	if len(b) < inboxRecFixed || b[0] != recVersion {
		return inboxRec{}, corrupt("inbox record of %d bytes", len(b))
	}
	r := inboxRec{
		id:     binary.BigEndian.Uint64(b[1:]),
		head:   binary.BigEndian.Uint64(b[9:]),
		next:   binary.BigEndian.Uint64(b[17:]),
		lastAt: int64(binary.BigEndian.Uint64(b[25:])),
	}
	n := int(b[33])
	// A user with a record has at least one message, and no more than
	// an int counts.
	if n == 0 || len(b) != inboxRecFixed+n || r.id == 0 || r.head == 0 || r.head >= r.next || r.next-r.head > 1<<31 {
		return inboxRec{}, corrupt("inbox record: id %d, messages %d to %d, epoch of %d bytes in %d", r.id, r.head, r.next, n, len(b))
	}
	r.epoch = string(b[inboxRecFixed:])
	return r, nil
}

// A message, in msgs, omsgs or imsgs: the unix ns it was kept at, then its data.
const msgAtLen = 8

func encodeMsg(at int64, data []byte) []byte {
	b := make([]byte, msgAtLen, msgAtLen+len(data))
	binary.BigEndian.PutUint64(b, uint64(at))
	return append(b, data...)
}

// decodeMsg returns the time and the data of a message; data aliases b.
func decodeMsg(b []byte) (at int64, data []byte, err error) {
	if len(b) < msgAtLen {
		return 0, nil, corrupt("message of %d bytes", len(b))
	}
	return int64(binary.BigEndian.Uint64(b)), b[msgAtLen:], nil
}

// key2 is the key of two numbers: a topic's or a user's message (id, seq),
// or an index entry (time, id).
func key2(a, b uint64) []byte {
	k := make([]byte, 16)
	binary.BigEndian.PutUint64(k, a)
	binary.BigEndian.PutUint64(k[8:], b)
	return k
}

// key3 is the key of an oage entry: at, user id, n.
func key3(a, b, c uint64) []byte {
	k := make([]byte, 24)
	binary.BigEndian.PutUint64(k, a)
	binary.BigEndian.PutUint64(k[8:], b)
	binary.BigEndian.PutUint64(k[16:], c)
	return k
}

// decodeKey splits a key of n numbers (key2, key3) into them.
func decodeKey(k []byte, n int) ([]uint64, error) {
	if len(k) != 8*n {
		return nil, corrupt("key of %d bytes, want %d", len(k), 8*n)
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = binary.BigEndian.Uint64(k[8*i:])
	}
	return out, nil
}

// u64 encodes a counter or an id.
func u64(v uint64) []byte {
	return binary.BigEndian.AppendUint64(nil, v)
}

func decodeU64(b []byte) (uint64, error) {
	if b == nil {
		return 0, nil // a counter not written yet
	}
	if len(b) != 8 {
		return 0, corrupt("counter of %d bytes", len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

// timeKey orders times before 1970, which a wrong clock could give, as 0.
func timeKey(ns int64) uint64 { return uint64(max(ns, 0)) }

// nameKey is the key of a topic's or a user's record: the name after a
// byte, since bbolt takes no empty key.
func nameKey(name string) []byte {
	return append([]byte{'n'}, name...)
}
