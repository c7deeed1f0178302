package wire

import (
	"bytes"
	"iter"
	"strconv"
	"unicode/utf8"
)

// Kind is what a message's data is, and so how it travels in protocol v1
// (PROTOCOL.md, "Binary messages").
type Kind uint8

const (
	// KindJSON: a JSON value, inline in its line as the data field, in a
	// text or a binary WebSocket message.
	KindJSON Kind = iota
	// KindBinary: bytes, right after the line, whose len field counts
	// them, in a binary WebSocket message.
	KindBinary
	// KindText: UTF-8 text that is not JSON, carried as KindBinary is,
	// with "text":true in the line.
	KindText
)

// Tagged messages. The hub keeps a message's data, and queues a message
// for a conn, in one []byte whose first byte says what it is, so that
// queues, history and brokers need no other field:
//   - stored data (history, offline store, broker): a JSON value as it
//     is; anything else TagBinary or TagText followed by the bytes;
//   - a raw peer's queue entry: TagBinary and the bytes of a binary
//     frame, TagText and the bytes of a text frame, or else the whole
//     entry is a text frame (JSON never starts with either tag);
//   - a v1 peer's queue entry: TagBinary and the body of a binary
//     message (records), or else the lines of a text message.
const (
	TagBinary = 0x01
	TagText   = 0x02
)

// Store returns data of the given kind in stored form, in a new slice.
// A KindJSON data must be compact (see CompactData).
func Store(kind Kind, data []byte) []byte {
	switch kind {
	case KindBinary:
		return append(append(make([]byte, 0, 1+len(data)), TagBinary), data...)
	case KindText:
		return append(append(make([]byte, 0, 1+len(data)), TagText), data...)
	}
	return append([]byte(nil), data...)
}

// Load splits stored data into its kind and bytes, which alias stored.
func Load(stored []byte) (Kind, []byte) {
	if len(stored) > 0 {
		switch stored[0] {
		case TagBinary:
			return KindBinary, stored[1:]
		case TagText:
			return KindText, stored[1:]
		}
	}
	return KindJSON, stored
}

// Untag splits a queue entry into the WebSocket message it is part of:
// its bytes, and whether the message is binary.
func Untag(entry []byte) (body []byte, binary bool) {
	if len(entry) > 0 {
		switch entry[0] {
		case TagBinary:
			return entry[1:], true
		case TagText:
			return entry[1:], false
		}
	}
	return entry, false
}

// appendLen ends a line that data of kind follows: its len, the text
// flag, the closing brace and the newline, then the data itself.
func appendLen(dst []byte, kind Kind, data []byte) []byte {
	dst = strconv.AppendInt(append(dst, `,"len":`...), int64(len(data)), 10)
	if kind == KindText {
		dst = append(dst, `,"text":true`...)
	}
	return append(append(dst, "}\n"...), data...)
}

// AppendMsgOf appends a msg carrying data of kind: a line with data
// (AppendMsg) for KindJSON, a record (the line with len, then data) for
// the others, which must travel in a binary message.
func AppendMsgOf(dst []byte, topic, epoch string, seq uint64, kind Kind, data []byte) []byte {
	if kind == KindJSON {
		return AppendMsg(dst, topic, epoch, seq, data)
	}
	dst = appendMsgHead(dst, topic, epoch, seq)
	return appendLen(dst, kind, data)
}

// AppendPubOf is AppendPub for data of any kind, as AppendMsgOf.
func AppendPubOf(dst []byte, topic string, kind Kind, data []byte, id string) []byte {
	if kind == KindJSON {
		return AppendPub(dst, topic, data, id)
	}
	dst = appendJSONString(append(dst, `{"op":"pub","topic":`...), topic)
	if id != "" {
		dst = appendJSONString(append(dst, `,"id":`...), id)
	}
	return appendLen(dst, kind, data)
}

// AppendSendOf is AppendSend for data of any kind, as AppendMsgOf.
func AppendSendOf(dst []byte, kind Kind, data []byte, id string) []byte {
	if kind == KindJSON {
		return AppendSend(dst, data, id)
	}
	dst = append(dst, `{"op":"send"`...)
	if id != "" {
		dst = appendJSONString(append(dst, `,"id":`...), id)
	}
	return appendLen(dst, kind, data)
}

// ClientFrames decodes one WebSocket message a client sent: the lines of
// a text message, or the records of a binary one, each decoded as
// DecodeClient decodes a line. A failure is yielded as a *Error and the
// next line is read, but in a binary message whose records cannot be told
// apart any more (a line that is not JSON, a len past the end), which
// ends with it. Data of KindBinary and KindText aliases payload.
func ClientFrames(payload []byte, binary bool) iter.Seq2[Frame, error] {
	return frames(payload, binary, decodeClient)
}

// ServerFrames is ClientFrames for what a server sends, decoded as
// DecodeServer decodes a line.
func ServerFrames(payload []byte, binary bool) iter.Seq2[Frame, error] {
	return frames(payload, binary, decodeServer)
}

func frames(payload []byte, binary bool, decode func(*lineDecoder, Kind, []byte) Frame) iter.Seq2[Frame, error] {
	return func(yield func(Frame, error) bool) {
		rest := payload
		for len(rest) > 0 {
			if rest[0] == '\n' {
				rest = rest[1:] // empty lines, and the newline that joins records
				continue
			}
			line := rest
			if i := bytes.IndexByte(rest, '\n'); i >= 0 {
				line, rest = rest[:i], rest[i+1:]
			} else {
				rest = nil
			}
			d := &lineDecoder{}
			kind, data := KindJSON, []byte(nil)
			if d.parse(line) == nil {
				kind, data, rest = d.record(binary, rest)
			} else {
				d.lost = binary // whether data followed cannot be known
			}
			if d.err != nil {
				if !yield(Frame{}, d.err) || d.lost {
					return
				}
				continue
			}
			f := decode(d, kind, data)
			if d.err != nil {
				if !yield(Frame{}, d.err) {
					return
				}
				continue
			}
			if !yield(f, nil) {
				return
			}
		}
	}
}

// record reads the len and text fields of a parsed line, and takes the
// data they announce from rest, the bytes after the line. In a binary
// message a line that cannot be read loses the framing of what follows:
// d.lost is set.
func (d *lineDecoder) record(binary bool, rest []byte) (Kind, []byte, []byte) {
	raw := d.m["len"]
	if raw == nil || string(raw) == "null" {
		return KindJSON, nil, rest
	}
	d.lost = binary
	n := get[uint64](d, "len", raw, false)
	switch {
	case d.err != nil:
	case !binary:
		d.fail(CodeBadRequest, "field %q is only allowed in a binary message", "len")
	case n > uint64(len(rest)):
		d.fail(CodeBadRequest, "field %q is %d, past the end of the message", "len", n)
	}
	if d.err != nil {
		return KindJSON, nil, rest
	}
	d.lost = false
	data, rest := rest[:n:n], rest[n:] // capped: an append to data must not write over what follows
	kind := KindBinary
	if get[bool](d, "text", d.m["text"], false) {
		kind = KindText
		if !utf8.Valid(data) {
			d.fail(CodeBadRequest, "text data is not valid UTF-8")
		}
	}
	if _, ok := d.m["data"]; ok && d.err == nil {
		d.fail(CodeBadRequest, "fields %q and %q exclude each other", "data", "len")
	}
	return kind, data, rest
}

// data reads the data of a pub, send or msg: the data field for
// KindJSON, the bytes after the line for the others.
func (d *lineDecoder) data(kind Kind, data []byte) []byte {
	if kind == KindJSON {
		return d.raw("data", d.m["data"])
	}
	return data
}

// noData refuses a record whose op carries no data.
func (d *lineDecoder) noData(kind Kind) {
	if kind != KindJSON {
		d.fail(CodeBadRequest, "op %q carries no len", d.op)
	}
}
