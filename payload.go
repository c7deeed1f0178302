package tether

import (
	"unicode/utf8"

	"github.com/tether-ws/tether/internal/wire"
)

// This file is how an application's data becomes what the hub queues and
// keeps: a message is text or binary, and a text message that is a JSON
// value travels inline in a protocol v1 line, anything else after the line
// in a binary message (PROTOCOL.md, "Binary messages"). Queue entries and
// stored data are tagged []byte: see wire.TagBinary.

// kindOf returns how data, binary or text, travels to v1 peers, and its
// bytes in that form: a text JSON value compacted to one line, anything
// else as it is. Text must be valid UTF-8.
func kindOf(data []byte, binary bool) (wire.Kind, []byte, error) {
	if binary {
		return wire.KindBinary, data, nil
	}
	if compact, err := wire.CompactData(data); err == nil {
		return wire.KindJSON, compact, nil
	}
	if !utf8.Valid(data) {
		return 0, nil, ErrInvalidUTF8
	}
	return wire.KindText, data, nil
}

// ownData checks data and returns copies of it the hub owns: raw, a raw
// peer's queue entry, which gets data byte for byte, and stored, what
// history, the offline store and brokers keep. They are the same slice
// unless data is JSON spanning lines, which v1 peers get compacted.
func ownData(data []byte, binary bool) (raw, stored []byte, err error) {
	kind, body, err := kindOf(data, binary)
	if err != nil {
		return nil, nil, err
	}
	stored = wire.Store(kind, body)
	if kind == wire.KindJSON && len(body) != len(data) {
		return append([]byte(nil), data...), stored, nil
	}
	return stored, stored, nil
}

// rawEntry returns a raw peer's queue entry for data: a tagged copy.
func rawEntry(data []byte, binary bool) []byte {
	switch {
	case binary:
		return wire.Store(wire.KindBinary, data)
	case len(data) > 0 && data[0] <= wire.TagText:
		// Text that starts like a tag: tagged, so that it is not read as one.
		return wire.Store(wire.KindText, data)
	}
	return append([]byte(nil), data...)
}

// appendEntry appends to dst a v1 peer's queue entry of msg, one of the
// wire.Append...Of encoders' output for data of kind: tagged when the
// message is a record, which travels in a binary message.
func appendEntry(dst []byte, kind wire.Kind, msg func([]byte) []byte) []byte {
	if kind != wire.KindJSON {
		dst = append(dst, wire.TagBinary)
	}
	return msg(dst)
}

// msgEntry returns a v1 peer's queue entry for a msg of stored data.
func msgEntry(topic, epoch string, seq uint64, stored []byte) []byte {
	kind, data := wire.Load(stored)
	return msgEntryOf(topic, epoch, seq, kind, data)
}

// msgEntryOf is msgEntry for data of kind.
func msgEntryOf(topic, epoch string, seq uint64, kind wire.Kind, data []byte) []byte {
	dst := make([]byte, 0, len(data)+len(topic)+len(epoch)+64)
	return appendEntry(dst, kind, func(b []byte) []byte { return wire.AppendMsgOf(b, topic, epoch, seq, kind, data) })
}

// directEntry returns a v1 peer's queue entry for a direct message kept
// as a raw peer gets it (by the offline store, or a broker), and false
// for one no v1 peer could read (not from SendToUser).
func directEntry(raw []byte) ([]byte, bool) { return directEntryAt(Position{}, raw) }

// directEntryAt is directEntry for an inbox message, at pos.
func directEntryAt(pos Position, raw []byte) ([]byte, bool) {
	kind, data := wire.Load(raw)
	if kind == wire.KindJSON {
		compact, err := wire.CompactData(data)
		if err != nil {
			return nil, false
		}
		data = compact
	}
	return msgEntryOf("", pos.Epoch, pos.Seq, kind, data), true
}

// joiner joins v1 queue entries, with newlines, into entries of up to
// maxCoalesced bytes, as the writer would join them, so that a client's
// read limit is never hit by a replay or a backlog: an entry is binary
// when any of what it joins is.
type joiner struct {
	out [][]byte
	b   []byte // the entry being joined; its first byte is kept for the tag
	bin bool
}

func (j *joiner) add(entry []byte) {
	body, bin := wire.Untag(entry)
	if len(j.b) > 1 && len(j.b)+len(body) > maxCoalesced { // len(j.b) counts the tag, not the newline
		j.flush()
	}
	if len(j.b) == 0 {
		j.b = append(j.b, wire.TagBinary)
	} else {
		j.b = append(j.b, '\n')
	}
	j.b = append(j.b, body...)
	j.bin = j.bin || bin
}

func (j *joiner) flush() {
	if len(j.b) > 0 {
		e := j.b
		if !j.bin {
			e = e[1:]
		}
		j.out = append(j.out, e)
	}
	j.b, j.bin = nil, false
}

// entries returns what was joined.
func (j *joiner) entries() [][]byte {
	j.flush()
	return j.out
}
