// Package wire is the codec of tether's wire protocol v1 (PROTOCOL.md):
// decoders for what each side may receive, built on encoding/json, and
// encoders that append to a caller's buffer so that fan-out encodes a
// message once.
package wire

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
	"unicode"
	"unicode/utf8"
)

// Code says why a protocol message was refused. It travels as the
// code field of an error message, and as [Error].Code. Clients
// must accept codes they do not know: later versions may add some.
type Code string

// The error codes of protocol v1.
const (
	// CodeBadRequest: the message is not one JSON object in valid UTF-8,
	// or a field is missing, of the wrong type or out of bounds (a topic
	// over 256 bytes, an id over 64). Sending it again fails again.
	CodeBadRequest Code = "bad_request"
	// CodeUnknownOp: the op is unknown, or is one the other side sends.
	CodeUnknownOp Code = "unknown_op"
	// CodeForbidden: the application refused this subscription or
	// publication. The connection stays open.
	CodeForbidden Code = "forbidden"
	// CodeRateLimited: the message exceeded a rate limit and was dropped.
	// Sending it later may succeed.
	CodeRateLimited Code = "rate_limited"
	// CodeTooBig: a payload is over a limit the server sets on it, below
	// the message size limit (over that one the connection is closed with
	// 1009 instead).
	CodeTooBig Code = "too_big"
	// CodeInternal: the server failed to carry out a valid request.
	// Sending it again later may succeed.
	CodeInternal Code = "internal"
)

// Error is a protocol message that was refused: the decoder's failure, and
// what an error message carries.
type Error struct {
	Code   Code
	Reason string
	ID     string // the refused request's id; "" for none or unreadable
}

// Error returns "tether: protocol: <code>: <reason>".
func (e *Error) Error() string {
	return "tether: protocol: " + string(e.Code) + ": " + e.Reason
}

// Bounds the decoder enforces on what clients send. They keep the server's
// per-subscription and per-request memory small whatever a client sends.
const (
	maxTopicBytes = 256
	maxIDBytes    = 64
)

// The ops of protocol v1.
const (
	OpWelcome  = "welcome"
	OpPing     = "ping"
	OpPong     = "pong"
	OpSub      = "sub"
	OpUnsub    = "unsub"
	OpPub      = "pub"
	OpSend     = "send"
	OpReceived = "received"
	OpMsg      = "msg"
	OpPresence = "presence"
	OpResync   = "resync"
	OpAck      = "ack"
	OpError    = "error"
)

// The status of a topic in a welcome's resume list.
const (
	ResumeOK     = "ok"     // the missed messages follow
	ResumeResync = "resync" // history cannot fill the gap; reload
)

// maxHeartbeatMS bounds interval_ms and timeout_ms so that they fit in a
// time.Duration.
const maxHeartbeatMS = math.MaxInt64 / int64(time.Millisecond)

// Frame is one decoded protocol message: one line of a WebSocket message.
// Only the fields of its op are set; see PROTOCOL.md for which those are.
// A decoded Frame owns its memory: its data and meta values are copies,
// so the caller may reuse the line's buffer.
type Frame struct {
	Op     string
	ID     string          // sub, unsub, pub, send, ack, error; "" for none
	Topic  string          // sub, unsub, pub, msg, presence, resync; "" in a direct msg
	Since  *Since          // sub: where to resume; nil for live messages only
	Latest bool            // sub: the topic's last message first, when Since is nil
	Data   json.RawMessage // pub, send, msg: a JSON value, never re-encoded, or the bytes of Kind
	Kind   Kind            // pub, send, msg: what Data is
	Epoch  string          // msg, resync, ack of a sub
	Seq    uint64          // msg, ack of a sub; 0 in a direct msg
	TS     int64           // ping, pong

	Session           string        // welcome
	Interval, Timeout time.Duration // welcome: the server's heartbeat, in whole ms
	Resume            []Resume      // welcome; nil for none
	Limits            Limits        // welcome; zero for none
	Dedupe            time.Duration // welcome: how long a repeated pub or send id is dropped; 0 for never

	Joins, Leaves []Member // presence; nil for none
	Count         int64    // presence: the users present after it; -1 when absent
	Snapshot      bool     // presence: Joins replaces what the client knew

	Code   Code   // error
	Reason string // error
}

// Since is a client's position in a topic's history: the last message
// it received.
type Since struct {
	Epoch string
	Seq   uint64
}

// Limits is the rate limit a welcome advertises: a token bucket of
// burst messages refilled at perSecond. Zero means none.
type Limits struct {
	PerSecond float64
	Burst     int64
}

// Resume says how a welcome resumed one topic.
type Resume struct {
	Topic  string
	Epoch  string // the topic's current epoch
	Seq    uint64 // the topic's last seq at the time of the welcome
	Status string // resumeOK or resumeResync
}

// Member is one entry of a presence message.
type Member struct {
	User string
	Meta json.RawMessage // nil when absent
}

// DecodeClient decodes one line a client sent to the server. Only the ops a
// client may send are accepted: ping, pong, sub, unsub, pub, send and
// received. A
// failure is a *Error, with the request's id when it could be read.
// The frame does not alias line.
func DecodeClient(line []byte) (Frame, error) {
	return decodeLine(line, decodeClient)
}

// decodeLine decodes one line of a text message.
func decodeLine(line []byte, decode func(*lineDecoder, Kind, []byte) Frame) (Frame, error) {
	d := &lineDecoder{}
	if d.parse(line) == nil {
		d.record(false, nil)
	}
	if d.err != nil {
		return Frame{}, d.err
	}
	f := decode(d, KindJSON, nil)
	if d.err != nil {
		return Frame{}, d.err
	}
	return f, nil
}

// decodeClient reads the fields of a parsed line a client sent, with
// data of kind after it; a failure is left in d.err.
func decodeClient(d *lineDecoder, kind Kind, data []byte) Frame {
	m := d.m
	f := Frame{Op: d.op}
	switch d.op {
	case OpPing, OpPong:
		d.noData(kind)
		f.TS = get[int64](d, "ts", m["ts"], false)
	case OpSub:
		d.noData(kind)
		f.ID = d.requestID()
		f.Topic = d.topic()
		if obj := get[members](d, "since", m["since"], false); obj != nil {
			f.Since = &Since{
				Epoch: get[string](d, "since.epoch", obj["epoch"], true),
				Seq:   get[uint64](d, "since.seq", obj["seq"], true),
			}
		}
		f.Latest = get[bool](d, "latest", m["latest"], false)
	case OpUnsub:
		d.noData(kind)
		f.ID = d.requestID()
		f.Topic = d.topic()
	case OpPub:
		f.ID = d.requestID()
		f.Topic = d.topic()
		f.Data, f.Kind = d.data(kind, data), kind
	case OpSend:
		f.ID = d.requestID()
		f.Data, f.Kind = d.data(kind, data), kind
	case OpReceived:
		d.noData(kind)
		f.ID = d.requestID()
		f.Epoch = get[string](d, "epoch", m["epoch"], true)
		f.Seq = get[uint64](d, "seq", m["seq"], true)
	case OpWelcome, OpMsg, OpPresence, OpResync, OpAck, OpError:
		d.fail(CodeUnknownOp, "op %q is sent by the server only", d.op)
	default:
		d.fail(CodeUnknownOp, "unknown op %q", shorten(d.op))
	}
	return f
}

// DecodeServer decodes one line the server sent to a client. Only
// the ops a server may send are accepted: welcome, ping, pong, msg,
// presence, resync, ack and error. It checks types, not the bounds the
// server enforces on clients. A failure is a *Error. The frame
// does not alias line.
func DecodeServer(line []byte) (Frame, error) {
	return decodeLine(line, decodeServer)
}

// decodeServer reads the fields of a parsed line a server sent, with
// data of kind after it; a failure is left in d.err.
func decodeServer(d *lineDecoder, kind Kind, data []byte) Frame {
	m := d.m
	f := Frame{Op: d.op}
	switch d.op {
	case OpWelcome:
		f.Session = get[string](d, "session", m["session"], true)
		if hb := get[members](d, "heartbeat", m["heartbeat"], true); hb != nil {
			f.Interval = d.millis("heartbeat.interval_ms", hb["interval_ms"])
			f.Timeout = d.millis("heartbeat.timeout_ms", hb["timeout_ms"])
		}
		for _, elem := range get[[]json.RawMessage](d, "resume", m["resume"], false) {
			f.Resume = append(f.Resume, d.resumeEntry(elem))
		}
		if raw := m["dedupe_ms"]; raw != nil && string(raw) != "null" {
			f.Dedupe = d.millis("dedupe_ms", raw)
		}
		if lim := get[members](d, "limits", m["limits"], false); lim != nil {
			f.Limits.PerSecond = get[float64](d, "limits.msgs_per_s", lim["msgs_per_s"], true)
			f.Limits.Burst = get[int64](d, "limits.burst", lim["burst"], true)
			if d.err == nil && (f.Limits.PerSecond <= 0 || f.Limits.Burst <= 0) {
				d.fail(CodeBadRequest, "limits must be positive")
			}
		}
	case OpPing, OpPong:
		f.TS = get[int64](d, "ts", m["ts"], false)
	case OpMsg:
		f.Topic = get[string](d, "topic", m["topic"], false)
		f.Epoch = get[string](d, "epoch", m["epoch"], false)
		f.Seq = get[uint64](d, "seq", m["seq"], false)
		f.Data, f.Kind = d.data(kind, data), kind
	case OpPresence:
		f.Topic = get[string](d, "topic", m["topic"], true)
		for _, elem := range get[[]json.RawMessage](d, "joins", m["joins"], false) {
			f.Joins = append(f.Joins, d.member("joins", elem))
		}
		for _, elem := range get[[]json.RawMessage](d, "leaves", m["leaves"], false) {
			f.Leaves = append(f.Leaves, d.member("leaves", elem))
		}
		f.Count = -1
		if raw := m["count"]; raw != nil && string(raw) != "null" {
			if f.Count = get[int64](d, "count", raw, false); f.Count < 0 {
				d.fail(CodeBadRequest, "field %q must not be negative", "count")
			}
		}
		f.Snapshot = get[bool](d, "snapshot", m["snapshot"], false)
	case OpResync:
		f.Topic = get[string](d, "topic", m["topic"], true)
		f.Epoch = get[string](d, "epoch", m["epoch"], true)
	case OpAck:
		f.ID = get[string](d, "id", m["id"], true)
		f.Epoch = get[string](d, "epoch", m["epoch"], false)
		f.Seq = get[uint64](d, "seq", m["seq"], false)
	case OpError:
		f.ID = get[string](d, "id", m["id"], false)
		f.Code = Code(get[string](d, "code", m["code"], true))
		f.Reason = get[string](d, "reason", m["reason"], false)
	case OpSub, OpUnsub, OpPub, OpSend, OpReceived:
		d.fail(CodeUnknownOp, "op %q is sent by clients only", d.op)
	default:
		d.fail(CodeUnknownOp, "unknown op %q", shorten(d.op))
	}
	if f.Op != OpMsg {
		d.noData(kind)
	}
	return f
}

// CheckTopic returns nil if s may name a topic, or a *Error with
// [CodeBadRequest] that says why not: a topic is 1 to 256 bytes of UTF-8
// without control characters, so that it is safe to log, to use as a key
// and to show.
func CheckTopic(s string) error {
	if reason := topicProblem(s); reason != "" {
		return &Error{Code: CodeBadRequest, Reason: reason}
	}
	return nil
}

// topicProblem says what makes s an invalid topic, or "" if it is valid.
func topicProblem(s string) string {
	switch {
	case s == "":
		return "topic is empty"
	case len(s) > maxTopicBytes:
		return "topic is longer than 256 bytes"
	case !utf8.ValidString(s):
		return "topic is not valid UTF-8"
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return "topic contains a control character"
		}
	}
	return ""
}

// CompactData returns data in the form the encoders need: valid JSON in
// UTF-8 on one line. It returns data itself when it already is, and a
// compacted copy when it holds newlines, which would split a message in
// two; an error if it is not valid JSON.
// The hub checks an application's payload with it once, before encoding it
// for any number of peers.
func CompactData(data []byte) (json.RawMessage, error) {
	if !utf8.Valid(data) || !json.Valid(data) {
		return nil, errors.New("tether: protocol: data is not valid JSON")
	}
	if bytes.IndexByte(data, '\n') < 0 {
		return data, nil
	}
	var buf bytes.Buffer
	buf.Grow(len(data))
	if err := json.Compact(&buf, data); err != nil {
		return nil, fmt.Errorf("tether: protocol: %w", err)
	}
	return buf.Bytes(), nil
}

// members is a JSON object decoded one level deep by encoding/json: the
// raw value of each member under its exact key, as in JavaScript (a
// struct would match keys case-insensitively). When a key repeats, the
// last wins, as in JSON.parse. The values are copies of the input.
type members = map[string]json.RawMessage

// lineDecoder reads the members of one line with encoding/json. It
// records the first failure in err, and reads nothing after it, so a
// decoder reads the fields of an op in sequence and checks err once at the
// end, when what it read is discarded if there was a failure.
type lineDecoder struct {
	m    members // the line's members
	op   string
	id   string // the line's id if it could be read, for error reports
	err  *Error
	lost bool // the failure lost a binary message's framing: read no further
}

// parse checks that line is one JSON object in valid UTF-8, collects its
// members and reads its op. Unknown members are ignored, so that later
// versions may add fields.
func (d *lineDecoder) parse(line []byte) error {
	if len(bytes.Trim(line, " \t\r\n")) == 0 {
		return d.fail(CodeBadRequest, "empty message")
	}
	// encoding/json would read invalid UTF-8 as U+FFFD; the protocol
	// refuses it, even in members the decoder ignores.
	if !utf8.Valid(line) {
		return d.fail(CodeBadRequest, "message is not valid UTF-8")
	}
	if err := json.Unmarshal(line, &d.m); err != nil || d.m == nil {
		var syntax *json.SyntaxError
		if errors.As(err, &syntax) {
			return d.fail(CodeBadRequest, "malformed JSON")
		}
		return d.fail(CodeBadRequest, "message is not a JSON object") // or is null
	}
	// The id is read before anything can fail, so that every error
	// answers the request it is about.
	if raw := d.m["id"]; raw != nil && (json.Unmarshal(raw, &d.id) != nil || len(d.id) > maxIDBytes) {
		d.id = ""
	}
	d.op = get[string](d, "op", d.m["op"], true)
	if d.err != nil {
		return d.err
	}
	return nil
}

// fail records a failure unless one is already recorded, and returns the
// recorded one.
func (d *lineDecoder) fail(code Code, format string, args ...any) *Error {
	if d.err == nil {
		d.err = &Error{Code: code, Reason: fmt.Sprintf(format, args...), ID: d.id}
	}
	return d.err
}

// get reads the member name, whose raw value is raw, with encoding/json,
// which enforces its type: a JSON string for a string, an integer without
// fraction or exponent that fits for an integer type, an object for
// members, an array for a slice. A member that is not there or is null is
// absent: the zero value, and a failure if it is required. (data and meta,
// where null is a value, are read with raw instead.)
func get[T any](d *lineDecoder, name string, raw json.RawMessage, required bool) (v T) {
	switch {
	case d.err != nil:
	case raw == nil || string(raw) == "null":
		if required {
			d.fail(CodeBadRequest, "missing field %q", name)
		}
	case json.Unmarshal(raw, &v) != nil:
		d.fail(CodeBadRequest, "field %q must be %s", name, typeName(v))
	}
	return v
}

// typeName names the JSON values get reads into v, for error reasons.
func typeName(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case uint64:
		return "an integer from 0 to 2^64-1"
	case int64:
		return "an integer from -2^63 to 2^63-1"
	case members:
		return "an object"
	case float64:
		return "a number"
	case bool:
		return "true or false"
	}
	return "an array"
}

// raw reads a required member holding any JSON value, null included.
func (d *lineDecoder) raw(name string, raw json.RawMessage) json.RawMessage {
	if raw == nil {
		d.fail(CodeBadRequest, "missing field %q", name)
	}
	return raw
}

// millis reads a required member holding a whole number of milliseconds
// that fits in a time.Duration.
func (d *lineDecoder) millis(name string, raw json.RawMessage) time.Duration {
	n := get[uint64](d, name, raw, true)
	if n > uint64(maxHeartbeatMS) {
		d.fail(CodeBadRequest, "field %q is too large", name)
	}
	return time.Duration(n) * time.Millisecond
}

// element reads an element of the array member name, which must be an
// object.
func (d *lineDecoder) element(name string, elem json.RawMessage) (m members) {
	if d.err == nil && (json.Unmarshal(elem, &m) != nil || m == nil) {
		d.fail(CodeBadRequest, "elements of field %q must be objects", name)
	}
	return m
}

// requestID reads the id of a request, which is bounded so that a server
// can keep it until it answers.
func (d *lineDecoder) requestID() string {
	if d.id != "" {
		return d.id // read by parse, within bounds
	}
	id := get[string](d, "id", d.m["id"], false)
	if len(id) > maxIDBytes {
		d.fail(CodeBadRequest, "id is longer than 64 bytes")
	}
	return id
}

// topic reads the topic of a request, which must pass checkTopic.
func (d *lineDecoder) topic() string {
	t := get[string](d, "topic", d.m["topic"], true)
	if reason := topicProblem(t); reason != "" {
		d.fail(CodeBadRequest, "%s", reason)
	}
	return t
}

// resumeEntry reads one element of a welcome's resume array.
func (d *lineDecoder) resumeEntry(elem json.RawMessage) Resume {
	m := d.element("resume", elem)
	r := Resume{
		Topic:  get[string](d, "resume[].topic", m["topic"], true),
		Epoch:  get[string](d, "resume[].epoch", m["epoch"], true),
		Seq:    get[uint64](d, "resume[].seq", m["seq"], true),
		Status: get[string](d, "resume[].status", m["status"], true),
	}
	if d.err == nil && r.Status != ResumeOK && r.Status != ResumeResync {
		d.fail(CodeBadRequest, "field %q must be %q or %q", "resume[].status", ResumeOK, ResumeResync)
	}
	return r
}

// member reads one element of a presence message's joins or leaves.
func (d *lineDecoder) member(name string, elem json.RawMessage) Member {
	m := d.element(name, elem)
	return Member{User: get[string](d, name+"[].user", m["user"], true), Meta: m["meta"]}
}

// shorten bounds a client's string quoted in an error reason.
func shorten(s string) string {
	const limit = 32
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

// Encoders. Each appends one message to dst, without a newline, and
// returns the extended buffer; the writer joins queued messages with '\n'.
// Strings are escaped exactly as encoding/json escapes them. Raw values
// (data, meta) are copied as they are, so they must be valid JSON on one
// line (see compactData); a nil one is written as null.

// AppendMsg appends a msg: a topic message when topic is set, a direct
// message otherwise. epoch and seq are left out when empty. It does not
// allocate when dst has room and topic and epoch are printable ASCII that
// needs no escaping (see appendJSONString); it is called once per
// publication, not once per subscriber.
func AppendMsg(dst []byte, topic, epoch string, seq uint64, data json.RawMessage) []byte {
	dst = appendMsgHead(dst, topic, epoch, seq)
	dst = appendRaw(append(dst, `,"data":`...), data)
	return append(dst, '}')
}

// appendMsgHead appends a msg's fields but its data, without the closing
// brace.
func appendMsgHead(dst []byte, topic, epoch string, seq uint64) []byte {
	dst = append(dst, `{"op":"msg"`...)
	if topic != "" {
		dst = appendJSONString(append(dst, `,"topic":`...), topic)
	}
	if epoch != "" {
		dst = appendJSONString(append(dst, `,"epoch":`...), epoch)
	}
	if seq != 0 {
		dst = strconv.AppendUint(append(dst, `,"seq":`...), seq, 10)
	}
	return dst
}

// AppendWelcome appends a welcome, the first message of a connection.
// The heartbeat is written in whole milliseconds; resume is left out when
// empty.
func AppendWelcome(dst []byte, session string, interval, timeout time.Duration, limits Limits, dedupe time.Duration, resume []Resume) []byte {
	dst = appendJSONString(append(dst, `{"op":"welcome","session":`...), session)
	dst = strconv.AppendInt(append(dst, `,"heartbeat":{"interval_ms":`...), interval.Milliseconds(), 10)
	dst = strconv.AppendInt(append(dst, `,"timeout_ms":`...), timeout.Milliseconds(), 10)
	dst = append(dst, '}')
	if limits.PerSecond > 0 {
		dst = strconv.AppendFloat(append(dst, `,"limits":{"msgs_per_s":`...), limits.PerSecond, 'f', -1, 64)
		dst = strconv.AppendInt(append(dst, `,"burst":`...), limits.Burst, 10)
		dst = append(dst, '}')
	}
	if dedupe > 0 {
		dst = strconv.AppendInt(append(dst, `,"dedupe_ms":`...), dedupe.Milliseconds(), 10)
	}
	if len(resume) > 0 {
		dst = append(dst, `,"resume":[`...)
		for i, r := range resume {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = appendJSONString(append(dst, `{"topic":`...), r.Topic)
			dst = appendJSONString(append(dst, `,"epoch":`...), r.Epoch)
			dst = strconv.AppendUint(append(dst, `,"seq":`...), r.Seq, 10)
			dst = appendJSONString(append(dst, `,"status":`...), r.Status)
			dst = append(dst, '}')
		}
		dst = append(dst, ']')
	}
	return append(dst, '}')
}

// AppendPing appends a ping; the peer answers with a pong echoing ts.
func AppendPing(dst []byte, ts int64) []byte {
	return append(strconv.AppendInt(append(dst, `{"op":"ping","ts":`...), ts, 10), '}')
}

// AppendPong appends a pong, echoing the ts of the ping it answers.
func AppendPong(dst []byte, ts int64) []byte {
	return append(strconv.AppendInt(append(dst, `{"op":"pong","ts":`...), ts, 10), '}')
}

// AppendAck appends an ack of the request with this id.
func AppendAck(dst []byte, id string) []byte {
	return append(appendJSONString(append(dst, `{"op":"ack","id":`...), id), '}')
}

// AppendSubAck appends the ack of a sub, with the topic's position when
// the subscription took effect: live messages follow it.
func AppendSubAck(dst []byte, id, epoch string, seq uint64) []byte {
	dst = appendJSONString(append(dst, `{"op":"ack","id":`...), id)
	dst = appendJSONString(append(dst, `,"epoch":`...), epoch)
	dst = strconv.AppendUint(append(dst, `,"seq":`...), seq, 10)
	return append(dst, '}')
}

// AppendError appends an error; id, the refused request's, is left out
// when empty.
func AppendError(dst []byte, code Code, reason, id string) []byte {
	dst = appendJSONString(append(dst, `{"op":"error","code":`...), string(code))
	dst = appendJSONString(append(dst, `,"reason":`...), reason)
	if id != "" {
		dst = appendJSONString(append(dst, `,"id":`...), id)
	}
	return append(dst, '}')
}

// AppendPresence appends a presence message: count, the users present
// after it (left out when negative); with snapshot, joins lists every user the client is to know
// of (and is written as [] when empty); otherwise the changes, joins and
// leaves, each left out when nil, so that a topic that only counts its
// users sends {"op","topic","count"}.
func AppendPresence(dst []byte, topic string, count int, snapshot bool, joins, leaves []Member) []byte {
	dst = appendJSONString(append(dst, `{"op":"presence","topic":`...), topic)
	if count >= 0 {
		dst = strconv.AppendInt(append(dst, `,"count":`...), int64(count), 10)
	}
	if snapshot {
		dst = append(dst, `,"snapshot":true`...)
		if joins == nil {
			joins = []Member{}
		}
	}
	if joins != nil {
		dst = appendMembers(append(dst, `,"joins":`...), joins)
	}
	if leaves != nil {
		dst = appendMembers(append(dst, `,"leaves":`...), leaves)
	}
	return append(dst, '}')
}

func appendMembers(dst []byte, ms []Member) []byte {
	dst = append(dst, '[')
	for i, m := range ms {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendJSONString(append(dst, `{"user":`...), m.User)
		if m.Meta != nil {
			dst = append(append(dst, `,"meta":`...), m.Meta...)
		}
		dst = append(dst, '}')
	}
	return append(dst, ']')
}

// AppendResync appends a resync: the client's copy of topic is stale
// beyond what history can replay, and epoch is the topic's current one.
func AppendResync(dst []byte, topic, epoch string) []byte {
	dst = appendJSONString(append(dst, `{"op":"resync","topic":`...), topic)
	dst = appendJSONString(append(dst, `,"epoch":`...), epoch)
	return append(dst, '}')
}

// AppendSub appends a client's sub; since, latest and id are left out
// when nil, false and empty. With since, a server ignores latest.
func AppendSub(dst []byte, topic string, since *Since, latest bool, id string) []byte {
	dst = appendJSONString(append(dst, `{"op":"sub","topic":`...), topic)
	if since != nil {
		dst = appendJSONString(append(dst, `,"since":{"epoch":`...), since.Epoch)
		dst = strconv.AppendUint(append(dst, `,"seq":`...), since.Seq, 10)
		dst = append(dst, '}')
	}
	if latest {
		dst = append(dst, `,"latest":true`...)
	}
	return appendID(dst, id)
}

// AppendUnsub appends a client's unsub; id is left out when empty.
func AppendUnsub(dst []byte, topic, id string) []byte {
	dst = appendJSONString(append(dst, `{"op":"unsub","topic":`...), topic)
	return appendID(dst, id)
}

// AppendPub appends a client's pub; id is left out when empty.
func AppendPub(dst []byte, topic string, data json.RawMessage, id string) []byte {
	dst = appendJSONString(append(dst, `{"op":"pub","topic":`...), topic)
	dst = appendRaw(append(dst, `,"data":`...), data)
	return appendID(dst, id)
}

// AppendSend appends a client's send; id is left out when empty.
func AppendSend(dst []byte, data json.RawMessage, id string) []byte {
	dst = appendRaw(append(dst, `{"op":"send","data":`...), data)
	return appendID(dst, id)
}

// AppendReceived appends a received: the client has handed its user's
// inbox messages up to seq of epoch to the application.
func AppendReceived(dst []byte, epoch string, seq uint64, id string) []byte {
	dst = appendJSONString(append(dst, `{"op":"received","epoch":`...), epoch)
	dst = strconv.AppendUint(append(dst, `,"seq":`...), seq, 10)
	return appendID(dst, id)
}

// appendID ends a request, with its id unless empty.
func appendID(dst []byte, id string) []byte {
	if id != "" {
		dst = appendJSONString(append(dst, `,"id":`...), id)
	}
	return append(dst, '}')
}

// appendRaw appends a raw JSON value, or null for none.
func appendRaw(dst []byte, v json.RawMessage) []byte {
	if len(v) == 0 {
		return append(dst, "null"...)
	}
	return append(dst, v...)
}

// appendJSONString appends s as a JSON string, byte for byte as
// json.Marshal writes it (<, > and & escaped for HTML, U+2028 and U+2029
// for JavaScript, invalid UTF-8 replaced by \ufffd), which keeps one
// spelling for every string, safe to embed anywhere encoding/json output
// is. A string of printable ASCII that encoding/json leaves as it is, as
// topics, ids and epochs nearly always are, is copied without allocating;
// any other is escaped by json.Marshal.
func appendJSONString(dst []byte, s string) []byte {
	for i := range len(s) {
		if c := s[i]; c < ' ' || c > '~' || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			quoted, _ := json.Marshal(s) // a string always marshals
			return append(dst, quoted...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}
