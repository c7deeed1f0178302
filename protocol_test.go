package tether

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// protoCase is one line for a decoder and what it must give: want, or a
// *ProtocolError with code and id.
type protoCase struct {
	name string
	line string
	want frame
	code ErrorCode
	id   string
}

// clientCases drive TestDecodeFrame and seed FuzzDecode.
var clientCases = []protoCase{
	// Every op, with and without its optional fields.
	{name: "ping", line: `{"op":"ping","ts":1700000000000}`, want: frame{op: opPing, ts: 1700000000000}},
	{name: "ping without ts", line: `{"op":"ping"}`, want: frame{op: opPing}},
	{name: "ping negative ts", line: `{"op":"ping","ts":-9223372036854775808}`, want: frame{op: opPing, ts: math.MinInt64}},
	{name: "pong", line: `{"op":"pong","ts":42}`, want: frame{op: opPong, ts: 42}},
	{name: "sub", line: `{"op":"sub","topic":"room:42"}`, want: frame{op: opSub, topic: "room:42"}},
	{name: "sub with id and since", line: `{"op":"sub","topic":"room:42","since":{"epoch":"e1","seq":17},"id":"s1"}`,
		want: frame{op: opSub, topic: "room:42", id: "s1", since: &wireSince{epoch: "e1", seq: 17}}},
	{name: "sub since max seq", line: `{"op":"sub","topic":"t","since":{"epoch":"","seq":18446744073709551615}}`,
		want: frame{op: opSub, topic: "t", since: &wireSince{seq: math.MaxUint64}}},
	{name: "sub null since", line: `{"op":"sub","topic":"t","since":null,"id":null}`, want: frame{op: opSub, topic: "t"}},
	{name: "unsub", line: `{"op":"unsub","topic":"room:42","id":"u1"}`, want: frame{op: opUnsub, topic: "room:42", id: "u1"}},
	{name: "pub", line: `{"op":"pub","topic":"chat","data":{"text":"hi","n":[1,2.5,null]},"id":"p1"}`,
		want: frame{op: opPub, topic: "chat", id: "p1", data: json.RawMessage(`{"text":"hi","n":[1,2.5,null]}`)}},
	{name: "pub null data", line: `{"op":"pub","topic":"chat","data":null}`, want: frame{op: opPub, topic: "chat", data: json.RawMessage(`null`)}},
	{name: "pub string data", line: `{"op":"pub","topic":"chat","data":"a\"}b"}`, want: frame{op: opPub, topic: "chat", data: json.RawMessage(`"a\"}b"`)}},
	{name: "send", line: `{"op":"send","data":[true,false]}`, want: frame{op: opSend, data: json.RawMessage(`[true,false]`)}},
	{name: "send with id", line: `{"op":"send","data":7,"id":"x"}`, want: frame{op: opSend, id: "x", data: json.RawMessage(`7`)}},

	// Liberal in what is accepted.
	{name: "op not first", line: `{"topic":"t","op":"sub"}`, want: frame{op: opSub, topic: "t"}},
	{name: "whitespace everywhere", line: " \t{ \"op\" : \"pub\" , \"topic\" : \"t\" , \"data\" : { \"a\" : 1 } }\r",
		want: frame{op: opPub, topic: "t", data: json.RawMessage(`{ "a" : 1 }`)}},
	{name: "unknown fields ignored", line: `{"op":"sub","topic":"t","v":2,"extra":{"op":"pub","topic":[]},"Topic":1}`,
		want: frame{op: opSub, topic: "t"}},
	{name: "fields of other ops ignored", line: `{"op":"ping","ts":1,"topic":5,"data":{},"id":7}`, want: frame{op: opPing, ts: 1}},
	{name: "escaped keys", line: `{"o\u0070":"unsub","\u0074opic":"a"}`, want: frame{op: opUnsub, topic: "a"}},
	{name: "last duplicate wins in since", line: `{"op":"sub","topic":"t","since":{"epoch":1,"seq":"x","epoch":"e","seq":2}}`,
		want: frame{op: opSub, topic: "t", since: &wireSince{epoch: "e", seq: 2}}},
	{name: "last duplicate wins", line: `{"op":"send","data":1,"op":"pub","topic":"t","data":[2]}`,
		want: frame{op: opPub, topic: "t", data: json.RawMessage(`[2]`)}},
	{name: "topic escapes", line: `{"op":"sub","topic":"a\"b\\c\/d\u00e9\u2028😀<>&"}`, want: frame{op: opSub, topic: "a\"b\\c/dé\u2028😀<>&"}},
	{name: "lone surrogate becomes U+FFFD", line: `{"op":"sub","topic":"x\ud800"}`, want: frame{op: opSub, topic: "x\ufffd"}},
	{name: "topic 256 bytes", line: `{"op":"sub","topic":"` + strings.Repeat("é", 128) + `"}`, want: frame{op: opSub, topic: strings.Repeat("é", 128)}},
	{name: "id 64 bytes", line: `{"op":"unsub","topic":"t","id":"` + strings.Repeat("i", 64) + `"}`, want: frame{op: opUnsub, topic: "t", id: strings.Repeat("i", 64)}},
	{name: "empty id", line: `{"op":"unsub","topic":"t","id":""}`, want: frame{op: opUnsub, topic: "t"}},

	// Not a JSON object.
	{name: "empty", line: ``, code: CodeBadRequest},
	{name: "only spaces", line: `   `, code: CodeBadRequest},
	{name: "malformed", line: `{"op":"ping"`, code: CodeBadRequest},
	{name: "trailing garbage", line: `{"op":"ping"} x`, code: CodeBadRequest},
	{name: "two objects", line: `{"op":"ping"}{"op":"ping"}`, code: CodeBadRequest},
	{name: "array", line: `[{"op":"ping"}]`, code: CodeBadRequest},
	{name: "string", line: `"ping"`, code: CodeBadRequest},
	{name: "null", line: `null`, code: CodeBadRequest},
	{name: "invalid UTF-8 in topic", line: "{\"op\":\"sub\",\"topic\":\"a\xffb\",\"id\":\"k\"}", code: CodeBadRequest},
	{name: "invalid UTF-8 in unknown field", line: "{\"op\":\"ping\",\"x\":\"\xc3\"}", code: CodeBadRequest},
	{name: "raw control character", line: "{\"op\":\"sub\",\"topic\":\"a\tb\"}", code: CodeBadRequest},

	// The op.
	{name: "missing op", line: `{"topic":"t","id":"m"}`, code: CodeBadRequest, id: "m"},
	{name: "null op", line: `{"op":null}`, code: CodeBadRequest},
	{name: "op not a string", line: `{"op":1,"id":"n"}`, code: CodeBadRequest, id: "n"},
	{name: "unknown op", line: `{"op":"subscribe","topic":"t","id":"q"}`, code: CodeUnknownOp, id: "q"},
	{name: "op case matters", line: `{"op":"SUB","topic":"t"}`, code: CodeUnknownOp},
	{name: "key case matters", line: `{"OP":"sub","topic":"t"}`, code: CodeBadRequest},
	{name: "topic key case matters", line: `{"op":"sub","Topic":"t","id":"k"}`, code: CodeBadRequest, id: "k"},
	{name: "nested key case matters", line: `{"op":"sub","topic":"t","since":{"Epoch":"e","seq":1}}`, code: CodeBadRequest},
	{name: "welcome from client", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2}}`, code: CodeUnknownOp},
	{name: "msg from client", line: `{"op":"msg","topic":"t","epoch":"e","seq":1,"data":1,"id":"r"}`, code: CodeUnknownOp, id: "r"},
	{name: "presence from client", line: `{"op":"presence","topic":"t","joins":[],"leaves":[]}`, code: CodeUnknownOp},
	{name: "resync from client", line: `{"op":"resync","topic":"t","epoch":"e"}`, code: CodeUnknownOp},
	{name: "ack from client", line: `{"op":"ack","id":"a"}`, code: CodeUnknownOp, id: "a"},
	{name: "error from client", line: `{"op":"error","code":"internal","reason":"r"}`, code: CodeUnknownOp},

	// Required fields.
	{name: "sub without topic", line: `{"op":"sub","id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "sub null topic", line: `{"op":"sub","topic":null,"id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "unsub without topic", line: `{"op":"unsub"}`, code: CodeBadRequest},
	{name: "pub without topic", line: `{"op":"pub","data":1,"id":"p"}`, code: CodeBadRequest, id: "p"},
	{name: "pub without data", line: `{"op":"pub","topic":"t","id":"p"}`, code: CodeBadRequest, id: "p"},
	{name: "send without data", line: `{"op":"send","id":"d"}`, code: CodeBadRequest, id: "d"},
	{name: "since without seq", line: `{"op":"sub","topic":"t","since":{"epoch":"e"},"id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "since without epoch", line: `{"op":"sub","topic":"t","since":{"seq":1}}`, code: CodeBadRequest},

	// Wrong types and bounds.
	{name: "topic a number", line: `{"op":"sub","topic":42,"id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "topic an object", line: `{"op":"pub","topic":{"a":1},"data":1}`, code: CodeBadRequest},
	{name: "topic empty", line: `{"op":"sub","topic":"","id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "topic 257 bytes", line: `{"op":"sub","topic":"` + strings.Repeat("t", 257) + `","id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "topic escaped control", line: `{"op":"sub","topic":"a\u0000b"}`, code: CodeBadRequest},
	{name: "topic escaped newline", line: `{"op":"sub","topic":"a\nb"}`, code: CodeBadRequest},
	{name: "topic DEL", line: `{"op":"sub","topic":"a\u007f"}`, code: CodeBadRequest},
	{name: "topic C1 control", line: `{"op":"sub","topic":"a\u0085"}`, code: CodeBadRequest},
	{name: "id a number", line: `{"op":"sub","topic":"t","id":5}`, code: CodeBadRequest},
	{name: "id 65 bytes", line: `{"op":"sub","topic":"t","id":"` + strings.Repeat("i", 65) + `"}`, code: CodeBadRequest},
	{name: "since a string", line: `{"op":"sub","topic":"t","since":"e1:5","id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "seq negative", line: `{"op":"sub","topic":"t","since":{"epoch":"e","seq":-1}}`, code: CodeBadRequest},
	{name: "seq a string", line: `{"op":"sub","topic":"t","since":{"epoch":"e","seq":"5"}}`, code: CodeBadRequest},
	{name: "seq a fraction", line: `{"op":"sub","topic":"t","since":{"epoch":"e","seq":1.5}}`, code: CodeBadRequest},
	{name: "seq an exponent", line: `{"op":"sub","topic":"t","since":{"epoch":"e","seq":1e3}}`, code: CodeBadRequest},
	{name: "seq overflows", line: `{"op":"sub","topic":"t","since":{"epoch":"e","seq":18446744073709551616}}`, code: CodeBadRequest},
	{name: "epoch a number", line: `{"op":"sub","topic":"t","since":{"epoch":1,"seq":1}}`, code: CodeBadRequest},
	{name: "ts a string", line: `{"op":"ping","ts":"1"}`, code: CodeBadRequest},
	{name: "ts a fraction", line: `{"op":"pong","ts":1.0}`, code: CodeBadRequest},
	{name: "ts overflows", line: `{"op":"ping","ts":9223372036854775808}`, code: CodeBadRequest},
	{name: "ts underflows", line: `{"op":"ping","ts":-9223372036854775809}`, code: CodeBadRequest},
}

// serverCases drive TestDecodeServerFrame and seed FuzzDecodeServer.
var serverCases = []protoCase{
	{name: "welcome", line: `{"op":"welcome","session":"s-1","heartbeat":{"interval_ms":15000,"timeout_ms":30000}}`,
		want: frame{op: opWelcome, session: "s-1", interval: 15 * time.Second, timeout: 30 * time.Second}},
	{name: "welcome with resume", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":[{"topic":"a","epoch":"e","seq":3,"status":"ok"},{"topic":"b","epoch":"f","seq":0,"status":"resync"}]}`,
		want: frame{op: opWelcome, session: "s", interval: time.Millisecond, timeout: 2 * time.Millisecond,
			resume: []wireResume{{"a", "e", 3, resumeOK}, {"b", "f", 0, resumeResync}}}},
	{name: "welcome empty resume", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":[]}`,
		want: frame{op: opWelcome, session: "s", interval: time.Millisecond, timeout: 2 * time.Millisecond}},
	{name: "ping", line: `{"op":"ping","ts":5}`, want: frame{op: opPing, ts: 5}},
	{name: "pong", line: `{"op":"pong","ts":5}`, want: frame{op: opPong, ts: 5}},
	{name: "topic msg", line: `{"op":"msg","topic":"room:42","epoch":"e1","seq":18,"data":{"text":"hi"}}`,
		want: frame{op: opMsg, topic: "room:42", epoch: "e1", seq: 18, data: json.RawMessage(`{"text":"hi"}`)}},
	{name: "direct msg", line: `{"op":"msg","data":"hello"}`, want: frame{op: opMsg, data: json.RawMessage(`"hello"`)}},
	{name: "presence", line: `{"op":"presence","topic":"t","joins":[{"user":"ann","meta":{"device":"phone"}}],"leaves":[{"user":"bob"}]}`,
		want: frame{op: opPresence, topic: "t", joins: []wireMember{{"ann", json.RawMessage(`{"device":"phone"}`)}}, leaves: []wireMember{{user: "bob"}}}},
	{name: "presence without lists", line: `{"op":"presence","topic":"t"}`, want: frame{op: opPresence, topic: "t"}},
	{name: "resync", line: `{"op":"resync","topic":"t","epoch":"e2"}`, want: frame{op: opResync, topic: "t", epoch: "e2"}},
	{name: "ack", line: `{"op":"ack","id":"s1"}`, want: frame{op: opAck, id: "s1"}},
	{name: "error", line: `{"op":"error","code":"forbidden","reason":"no","id":"p1"}`,
		want: frame{op: opError, code: CodeForbidden, reason: "no", id: "p1"}},
	{name: "error with a future code", line: `{"op":"error","code":"teapot"}`, want: frame{op: opError, code: "teapot"}},
	{name: "unknown fields ignored", line: `{"op":"ack","id":"a","v":[1]}`, want: frame{op: opAck, id: "a"}},

	{name: "sub from server", line: `{"op":"sub","topic":"t"}`, code: CodeUnknownOp},
	{name: "unknown op", line: `{"op":"hello","id":"h"}`, code: CodeUnknownOp, id: "h"},
	{name: "welcome without heartbeat", line: `{"op":"welcome","session":"s"}`, code: CodeBadRequest},
	{name: "welcome without session", line: `{"op":"welcome","heartbeat":{"interval_ms":1,"timeout_ms":2}}`, code: CodeBadRequest},
	{name: "heartbeat without timeout", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1}}`, code: CodeBadRequest},
	{name: "heartbeat negative", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":-1,"timeout_ms":2}}`, code: CodeBadRequest},
	{name: "heartbeat overflows Duration", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":9223372036855,"timeout_ms":2}}`, code: CodeBadRequest},
	{name: "resume not an array", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":{}}`, code: CodeBadRequest},
	{name: "resume element not an object", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":[null]}`, code: CodeBadRequest},
	{name: "resume bad status", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":[{"topic":"a","epoch":"e","seq":3,"status":"maybe"}]}`, code: CodeBadRequest},
	{name: "msg without data", line: `{"op":"msg","topic":"t","epoch":"e","seq":1}`, code: CodeBadRequest},
	{name: "msg negative seq", line: `{"op":"msg","topic":"t","epoch":"e","seq":-1,"data":1}`, code: CodeBadRequest},
	{name: "presence without topic", line: `{"op":"presence","joins":[]}`, code: CodeBadRequest},
	{name: "presence member without user", line: `{"op":"presence","topic":"t","joins":[{"meta":1}]}`, code: CodeBadRequest},
	{name: "presence member null", line: `{"op":"presence","topic":"t","joins":[null]}`, code: CodeBadRequest},
	{name: "presence member key case matters", line: `{"op":"presence","topic":"t","joins":[{"User":"ann"}]}`, code: CodeBadRequest},
	{name: "presence leaves not an array", line: `{"op":"presence","topic":"t","leaves":"bob"}`, code: CodeBadRequest},
	{name: "resync without epoch", line: `{"op":"resync","topic":"t"}`, code: CodeBadRequest},
	{name: "ack without id", line: `{"op":"ack"}`, code: CodeBadRequest},
	{name: "error without code", line: `{"op":"error","reason":"r","id":"e"}`, code: CodeBadRequest, id: "e"},
}

func runProtoCases(t *testing.T, cases []protoCase, decode func([]byte) (frame, error)) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decode([]byte(tc.line))
			if tc.code == "" {
				if err != nil {
					t.Fatalf("decode(%s): %v", tc.line, err)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Fatalf("decode(%s)\n got %+v\nwant %+v", tc.line, got, tc.want)
				}
				return
			}
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				t.Fatalf("decode(%s) = %+v, %v; want a *ProtocolError", tc.line, got, err)
			}
			if pe.Code != tc.code || pe.ID != tc.id {
				t.Fatalf("decode(%s): code %q id %q (%v); want code %q id %q", tc.line, pe.Code, pe.ID, err, tc.code, tc.id)
			}
			if !reflect.DeepEqual(got, frame{}) {
				t.Errorf("decode(%s) failed but returned %+v", tc.line, got)
			}
		})
	}
}

func TestDecodeFrame(t *testing.T) { runProtoCases(t, clientCases, decodeFrame) }

func TestDecodeServerFrame(t *testing.T) { runProtoCases(t, serverCases, decodeServerFrame) }

// TestDecodeOwnsMemory checks that a decoded frame does not alias its
// line: the caller may reuse the buffer it read the line into.
func TestDecodeOwnsMemory(t *testing.T) {
	line := []byte(`{"op":"pub","topic":"chat","data":{"text":"hi"},"id":"p1"}`)
	f, err := decodeFrame(line)
	if err != nil {
		t.Fatal(err)
	}
	server := []byte(`{"op":"presence","topic":"t","joins":[{"user":"ann","meta":{"d":1}}]}`)
	g, err := decodeServerFrame(server)
	if err != nil {
		t.Fatal(err)
	}
	for _, buf := range [][]byte{line, server} {
		for i := range buf {
			buf[i] = 'x'
		}
	}
	if string(f.data) != `{"text":"hi"}` || f.topic != "chat" || f.id != "p1" {
		t.Errorf("pub changed with its line: %+v", f)
	}
	if string(g.joins[0].meta) != `{"d":1}` || g.joins[0].user != "ann" {
		t.Errorf("presence changed with its line: %+v", g)
	}
}

func TestProtocolErrorMessage(t *testing.T) {
	_, err := decodeFrame([]byte(`{"op":"sub","topic":"","id":"s7"}`))
	if got, want := err.Error(), "tether: protocol: bad_request: topic is empty"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	var pe *ProtocolError
	if !errors.As(err, &pe) || pe.ID != "s7" {
		t.Errorf("errors.As(%v) = %v, id %q", err, pe, pe.ID)
	}
	// An op echoed in a reason is bounded.
	_, err = decodeFrame([]byte(`{"op":"` + strings.Repeat("x", 1000) + `"}`))
	if len(err.Error()) > 100 {
		t.Errorf("reason not bounded: %d bytes", len(err.Error()))
	}
}

// protoTopics are topics that stress the escaper; each is also valid for
// checkTopic.
var protoTopics = []string{
	"room:42", `quo"te`, `back\slash`, "tab\u2028line\u2029para", "ünïcödé/日本語/😀",
	"<script>&amp;</script>", "\ufffd", "a/b.c-d_e~f", strings.Repeat("é", 128),
}

func TestEncodeRoundTrip(t *testing.T) {
	data := json.RawMessage(`{"text":"hi \"there\"","list":[1,2,{"x":null}]}`)
	var cases []struct {
		line []byte
		want frame
	}
	add := func(line []byte, want frame) {
		cases = append(cases, struct {
			line []byte
			want frame
		}{line, want})
	}
	for _, topic := range protoTopics {
		add(appendMsg(nil, topic, "e-"+topic, 18, data), frame{op: opMsg, topic: topic, epoch: "e-" + topic, seq: 18, data: data})
		add(appendPresence(nil, topic, []wireMember{{topic, nil}, {"ann", json.RawMessage(`{"d":1}`)}}, nil),
			frame{op: opPresence, topic: topic, joins: []wireMember{{topic, nil}, {"ann", json.RawMessage(`{"d":1}`)}}})
		add(appendResync(nil, topic, topic), frame{op: opResync, topic: topic, epoch: topic})
		add(appendAck(nil, topic), frame{op: opAck, id: topic})
		add(appendSubAck(nil, topic, Position{Epoch: topic, Seq: 17}), frame{op: opAck, id: topic, epoch: topic, seq: 17})
		add(appendError(nil, CodeForbidden, topic, topic), frame{op: opError, code: CodeForbidden, reason: topic, id: topic})
		add(appendWelcome(nil, topic, 15*time.Second, 30*time.Second, wireLimits{100, 200}, []wireResume{{topic, topic, 7, resumeOK}, {"b", "", 0, resumeResync}}),
			frame{op: opWelcome, session: topic, interval: 15 * time.Second, timeout: 30 * time.Second, limits: wireLimits{100, 200},
				resume: []wireResume{{topic, topic, 7, resumeOK}, {"b", "", 0, resumeResync}}})
	}
	add(appendMsg(nil, "", "", 0, json.RawMessage(`"direct"`)), frame{op: opMsg, data: json.RawMessage(`"direct"`)})
	add(appendMsg(nil, "t", "e", math.MaxUint64, nil), frame{op: opMsg, topic: "t", epoch: "e", seq: math.MaxUint64, data: json.RawMessage(`null`)})
	add(appendPresence(nil, "t", nil, []wireMember{{"bob", json.RawMessage(`null`)}}),
		frame{op: opPresence, topic: "t", leaves: []wireMember{{"bob", json.RawMessage(`null`)}}})
	add(appendError(nil, CodeInternal, "", ""), frame{op: opError, code: CodeInternal})
	add(appendWelcome(nil, "", 1500*time.Microsecond, time.Hour, wireLimits{}, nil), frame{op: opWelcome, interval: time.Millisecond, timeout: time.Hour})
	add(appendPing(nil, math.MinInt64), frame{op: opPing, ts: math.MinInt64})
	add(appendPong(nil, math.MaxInt64), frame{op: opPong, ts: math.MaxInt64})
	for _, tc := range cases {
		got, err := decodeServerFrame(tc.line)
		if err != nil {
			t.Errorf("decodeServerFrame(%s): %v", tc.line, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("decodeServerFrame(%s)\n got %+v\nwant %+v", tc.line, got, tc.want)
		}
		if bytes.IndexByte(tc.line, '\n') >= 0 || !json.Valid(tc.line) {
			t.Errorf("encoded %q: not one line of valid JSON", tc.line)
		}
		if !bytes.HasPrefix(tc.line, []byte(`{"op":"`+got.op+`"`)) {
			t.Errorf("encoded %s: op is not first", tc.line)
		}
	}
}

func TestEncodeClientRoundTrip(t *testing.T) {
	for _, topic := range protoTopics {
		for _, f := range []frame{
			{op: opSub, topic: topic},
			{op: opSub, topic: topic, id: "s1", since: &wireSince{epoch: topic, seq: 99}},
			{op: opUnsub, topic: topic, id: strings.Repeat("i", 64)},
			{op: opPub, topic: topic, data: json.RawMessage(`[1,"two"]`), id: topic[:min(len(topic), 64)]},
			{op: opSend, data: json.RawMessage(`{}`)},
			{op: opPing, ts: 1},
			{op: opPong, ts: -1},
		} {
			line := protoEncode(f)
			got, err := decodeFrame(line)
			if err != nil {
				t.Errorf("decodeFrame(%s): %v", line, err)
			} else if !reflect.DeepEqual(got, f) {
				t.Errorf("decodeFrame(%s)\n got %+v\nwant %+v", line, got, f)
			}
		}
	}
}

// TestEncodeGolden pins the exact bytes of the encoders: clients in other
// languages match on them, and PROTOCOL.md shows them.
func TestEncodeGolden(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{string(appendMsg(nil, "room:42", "e1", 18, json.RawMessage(`{"text":"hi"}`))), `{"op":"msg","topic":"room:42","epoch":"e1","seq":18,"data":{"text":"hi"}}`},
		{string(appendMsg(nil, "", "", 0, json.RawMessage(`{"text":"hi"}`))), `{"op":"msg","data":{"text":"hi"}}`},
		{string(appendWelcome(nil, "c9f1", 15*time.Second, 30*time.Second, wireLimits{}, []wireResume{{"room:42", "e1", 20, resumeOK}})),
			`{"op":"welcome","session":"c9f1","heartbeat":{"interval_ms":15000,"timeout_ms":30000},"resume":[{"topic":"room:42","epoch":"e1","seq":20,"status":"ok"}]}`},
		{string(appendWelcome(nil, "c9f1", 15*time.Second, 30*time.Second, wireLimits{0.5, 20}, nil)),
			`{"op":"welcome","session":"c9f1","heartbeat":{"interval_ms":15000,"timeout_ms":30000},"limits":{"msgs_per_s":0.5,"burst":20}}`},
		{string(appendPing(nil, 1700000000000)), `{"op":"ping","ts":1700000000000}`},
		{string(appendPong(nil, 1700000000000)), `{"op":"pong","ts":1700000000000}`},
		{string(appendAck(nil, "s1")), `{"op":"ack","id":"s1"}`},
		{string(appendSubAck(nil, "2", Position{Epoch: "e1", Seq: 17})), `{"op":"ack","id":"2","epoch":"e1","seq":17}`},
		{string(appendError(nil, CodeForbidden, "not allowed", "p1")), `{"op":"error","code":"forbidden","reason":"not allowed","id":"p1"}`},
		{string(appendPresence(nil, "room:42", []wireMember{{"ann", json.RawMessage(`{"device":"phone"}`)}}, nil)),
			`{"op":"presence","topic":"room:42","joins":[{"user":"ann","meta":{"device":"phone"}}],"leaves":[]}`},
		{string(appendResync(nil, "room:42", "e2")), `{"op":"resync","topic":"room:42","epoch":"e2"}`},
		{string(appendSub(nil, "room:42", &wireSince{"e1", 17}, "s1")), `{"op":"sub","topic":"room:42","since":{"epoch":"e1","seq":17},"id":"s1"}`},
		{string(appendUnsub(nil, "room:42", "")), `{"op":"unsub","topic":"room:42"}`},
		{string(appendPub(nil, "room:42", json.RawMessage(`{"text":"hi"}`), "p1")), `{"op":"pub","topic":"room:42","data":{"text":"hi"},"id":"p1"}`},
		{string(appendSend(nil, json.RawMessage(`{"cmd":"typing"}`), "")), `{"op":"send","data":{"cmd":"typing"}}`},
	} {
		if tc.got != tc.want {
			t.Errorf("got  %s\nwant %s", tc.got, tc.want)
		}
	}
}

// TestEncodeJSONString checks that appendJSONString, through its fast
// path or json.Marshal, writes what json.Marshal writes, for every byte
// and for random strings.
func TestEncodeJSONString(t *testing.T) {
	inputs := []string{
		"", "plain", "\u2028\u2029", "a\u2028b\u2029c", "<>&", "\x00\x01\x1f\x7f", "\b\f\n\r\t",
		"\xff", "a\xffb", "\xc3", "\xc3(", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x80", "\xe2\x80\xa8\xe2\x80",
		"é😀\ufffd", "\"\\/",
	}
	for b := range 256 {
		inputs = append(inputs, string([]byte{byte(b)}), "x"+string([]byte{byte(b)})+"y")
	}
	r := rand.New(rand.NewPCG(1, 2))
	alphabet := []string{"a", "\"", "\\", "<", "\x00", "\x1f", "\xff", "\xe2", "\x80", "\xa8", "é", "\u2028", "😀", "\xf0\x9f"}
	for range 5000 {
		var sb strings.Builder
		for range r.IntN(12) {
			sb.WriteString(alphabet[r.IntN(len(alphabet))])
		}
		inputs = append(inputs, sb.String())
	}
	for _, s := range inputs {
		checkJSONString(t, s)
	}
}

func checkJSONString(t *testing.T, s string) {
	t.Helper()
	want, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	prefix := []byte("prefix")
	if got := appendJSONString(prefix, s); string(got) != "prefix"+string(want) {
		t.Fatalf("appendJSONString(%q) = %s, want %s", s, got[len(prefix):], want)
	}
}

// TestEncodeMsgAllocs checks that appendMsg, called once per publication,
// does not allocate for topics of printable ASCII that need no escaping
// when dst has room, and allocates little for others: json.Marshal boxes
// the string and returns a new slice, and takes its buffer from a
// sync.Pool, which the race detector sometimes empties.
func TestEncodeMsgAllocs(t *testing.T) {
	data := json.RawMessage(`{"text":"hello, world","user":"ann"}`)
	buf := make([]byte, 0, 256)
	for _, tc := range []struct {
		topic string
		max   float64
	}{
		{"room:42", 0},
		{"a/b.c-d_e~f ok", 0},
		{"room:42 \"quoted\" \u2028", 3},
		{"ünïcödé/日本語", 3},
	} {
		// AllocsPerRun counts the whole process's allocations: the least of
		// three runs leaves out goroutines of earlier tests still winding
		// down.
		allocs := math.Inf(1)
		for range 3 {
			allocs = min(allocs, testing.AllocsPerRun(100, func() {
				buf = appendMsg(buf[:0], tc.topic, "e1", 123456, data)
			}))
		}
		if allocs > tc.max {
			t.Errorf("appendMsg(%q): %v allocs/op, want at most %v", tc.topic, allocs, tc.max)
		}
	}
}

func BenchmarkEncodeMsg(b *testing.B) {
	data := json.RawMessage(`{"text":"hello, world","user":"ann","at":1700000000000}`)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	b.SetBytes(int64(len(appendMsg(nil, "room:42", "e1", 123456, data))))
	for b.Loop() {
		buf = appendMsg(buf[:0], "room:42", "e1", 123456, data)
	}
}

func BenchmarkEncodeMsgEscaped(b *testing.B) {
	data := json.RawMessage(`{"text":"hello, world","user":"ann","at":1700000000000}`)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = appendMsg(buf[:0], "salle:42/été", "e1", 123456, data)
	}
}

func BenchmarkDecodeFrame(b *testing.B) {
	line := []byte(`{"op":"pub","topic":"room:42","data":{"text":"hello, world","user":"ann"},"id":"p1"}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		if _, err := decodeFrame(line); err != nil {
			b.Fatal(err)
		}
	}
}

func TestSplitFrames(t *testing.T) {
	for _, tc := range []struct {
		payload string
		want    []string
	}{
		{"", nil},
		{"\n\n\n", nil},
		{`{"op":"ping"}`, []string{`{"op":"ping"}`}},
		{`{"op":"ping"}` + "\n", []string{`{"op":"ping"}`}},
		{"a\nb\nc", []string{"a", "b", "c"}},
		{"\na\n\n\nb\n", []string{"a", "b"}},
		{"a\r\nb\r\n", []string{"a\r", "b\r"}},
		{"a\n   \nb", []string{"a", "   ", "b"}},
	} {
		var got []string
		for line := range splitFrames([]byte(tc.payload)) {
			got = append(got, string(line))
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("splitFrames(%q) = %q, want %q", tc.payload, got, tc.want)
		}
	}

	// A coalesced WebSocket message decodes line by line; a line of
	// spaces is refused, not skipped.
	payload := []byte(`{"op":"sub","topic":"a","id":"1"}` + "\n" + `{"op":"pub","topic":"a","data":[1]}` + "\n   \n" + `{"op":"ping","ts":3}` + "\n")
	var ops []string
	for line := range splitFrames(payload) {
		f, err := decodeFrame(line)
		var pe *ProtocolError
		switch {
		case err == nil:
			ops = append(ops, f.op)
		case errors.As(err, &pe) && pe.Code == CodeBadRequest:
			ops = append(ops, "bad_request")
		default:
			t.Fatalf("decodeFrame(%q): %v", line, err)
		}
	}
	if want := []string{"sub", "pub", "bad_request", "ping"}; !reflect.DeepEqual(ops, want) {
		t.Errorf("ops = %q, want %q", ops, want)
	}

	// Stopping early stops.
	n := 0
	for range splitFrames([]byte("a\nb\nc")) {
		n++
		break
	}
	if n != 1 {
		t.Errorf("break: %d lines", n)
	}
}

func TestProtocolCheckTopic(t *testing.T) {
	for _, s := range protoTopics {
		if err := checkTopic(s); err != nil {
			t.Errorf("checkTopic(%q): %v", s, err)
		}
	}
	for _, s := range []string{"", strings.Repeat("a", 257), "a\xff", "a\x00", "a\nb", "\u0085", "a\u007f"} {
		var pe *ProtocolError
		if err := checkTopic(s); !errors.As(err, &pe) || pe.Code != CodeBadRequest {
			t.Errorf("checkTopic(%q) = %v, want bad_request", s, err)
		}
	}
}

func TestProtocolCompactData(t *testing.T) {
	in := []byte(`{"a": 1}`)
	if got, err := compactData(in); err != nil || &got[0] != &in[0] {
		t.Errorf("compactData(%s) = %s, %v; want the same bytes", in, got, err)
	}
	got, err := compactData([]byte("{\n  \"a\": [\n    1,\n    \"x\\ny\"\n  ]\n}\n"))
	if err != nil || string(got) != `{"a":[1,"x\ny"]}` {
		t.Errorf("compactData(indented) = %s, %v", got, err)
	}
	for _, bad := range []string{"", "{", `{"a":1} x`, "\"\xff\""} {
		if _, err := compactData([]byte(bad)); err == nil {
			t.Errorf("compactData(%q) succeeded", bad)
		}
	}
}

// TestProtocolDocExamples decodes every line of the json blocks of
// PROTOCOL.md: a client-to-server example must pass decodeFrame and a
// server-to-client one decodeServerFrame, so the spec cannot drift from
// the code. Blocks are marked c2s or s2c in their info string.
func TestProtocolDocExamples(t *testing.T) {
	doc, err := os.Open("PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	defer doc.Close()
	sc := bufio.NewScanner(doc)
	var decode func([]byte) (frame, error)
	n := 0
	for lineNo := 1; sc.Scan(); lineNo++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "```json c2s"):
			decode = decodeFrame
		case strings.HasPrefix(line, "```json s2c"):
			decode = decodeServerFrame
		case strings.HasPrefix(line, "```"):
			decode = nil
		case decode != nil && strings.TrimSpace(line) != "":
			n++
			if _, err := decode([]byte(line)); err != nil {
				t.Errorf("PROTOCOL.md:%d: %s: %v", lineNo, line, err)
			}
		}
	}
	if n < 12 {
		t.Errorf("found only %d examples", n)
	}
}

// protoEncode encodes f with the encoder of its op, as a peer would send it.
func protoEncode(f frame) []byte {
	switch f.op {
	case opPing:
		return appendPing(nil, f.ts)
	case opPong:
		return appendPong(nil, f.ts)
	case opSub:
		return appendSub(nil, f.topic, f.since, f.id)
	case opUnsub:
		return appendUnsub(nil, f.topic, f.id)
	case opPub:
		return appendPub(nil, f.topic, f.data, f.id)
	case opSend:
		return appendSend(nil, f.data, f.id)
	case opWelcome:
		return appendWelcome(nil, f.session, f.interval, f.timeout, f.limits, f.resume)
	case opMsg:
		return appendMsg(nil, f.topic, f.epoch, f.seq, f.data)
	case opPresence:
		return appendPresence(nil, f.topic, f.joins, f.leaves)
	case opResync:
		return appendResync(nil, f.topic, f.epoch)
	case opAck:
		if f.epoch != "" {
			return appendSubAck(nil, f.id, Position{Epoch: f.epoch, Seq: f.seq})
		}
		return appendAck(nil, f.id)
	case opError:
		return appendError(nil, f.code, f.reason, f.id)
	}
	panic("no encoder for op " + f.op)
}

var knownCodes = map[ErrorCode]bool{
	CodeBadRequest: true, CodeUnknownOp: true, CodeForbidden: true,
	CodeRateLimited: true, CodeTooBig: true, CodeInternal: true,
}

// fuzzDecode is the property both decoders must have: no panic; on
// success, the frame survives encoding and decoding again, and agrees
// with encoding/json on the op and topic; on failure, a *ProtocolError
// with a known code and a bounded id.
func fuzzDecode(t *testing.T, line []byte, decode func([]byte) (frame, error)) {
	f, err := decode(line)
	if err != nil {
		var pe *ProtocolError
		if !errors.As(err, &pe) {
			t.Fatalf("error %v (%T) is not a *ProtocolError", err, err)
		}
		if !knownCodes[pe.Code] || pe.Reason == "" || len(pe.ID) > maxIDBytes {
			t.Fatalf("bad error %+v", pe)
		}
		return
	}
	if !utf8.Valid(line) || !json.Valid(line) {
		t.Fatalf("accepted invalid input %q", line)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		t.Fatalf("encoding/json: %v", err)
	}
	var op, topic string
	if json.Unmarshal(m["op"], &op) != nil || op != f.op {
		t.Fatalf("op %q, encoding/json says %s", f.op, m["op"])
	}
	if f.topic != "" && (json.Unmarshal(m["topic"], &topic) != nil || topic != f.topic) {
		t.Fatalf("topic %q, encoding/json says %s", f.topic, m["topic"])
	}
	if f.data != nil && !bytes.Equal(f.data, m["data"]) {
		t.Fatalf("data %s, encoding/json says %s", f.data, m["data"])
	}
	again := protoEncode(f)
	g, err := decode(again)
	if err != nil {
		t.Fatalf("re-encoded %s: %v", again, err)
	}
	if !reflect.DeepEqual(f, g) {
		t.Fatalf("round trip through %s\n got %+v\nwant %+v", again, g, f)
	}
}

func FuzzDecode(f *testing.F) {
	for _, tc := range clientCases {
		f.Add([]byte(tc.line))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		fuzzDecode(t, line, decodeFrame)
		if fr, err := decodeFrame(line); err == nil {
			if fr.op == opSub || fr.op == opUnsub || fr.op == opPub {
				if err := checkTopic(fr.topic); err != nil {
					t.Fatalf("accepted topic %q: %v", fr.topic, err)
				}
			}
			if len(fr.id) > maxIDBytes {
				t.Fatalf("accepted id of %d bytes", len(fr.id))
			}
		}
	})
}

func FuzzDecodeServer(f *testing.F) {
	for _, tc := range serverCases {
		f.Add([]byte(tc.line))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		fuzzDecode(t, line, decodeServerFrame)
	})
}

// FuzzEncodeJSONString checks appendJSONString against json.Marshal for
// any string.
func FuzzEncodeJSONString(f *testing.F) {
	for _, s := range protoTopics {
		f.Add(s)
	}
	f.Add("\xff\xe2\x80\xa8\xed\xa0\x80<\x00")
	f.Fuzz(func(t *testing.T, s string) {
		checkJSONString(t, s)
		line := appendMsg(nil, s, s, 1, json.RawMessage(`1`))
		fr, err := decodeServerFrame(line)
		if err != nil {
			t.Fatalf("decodeServerFrame(%s): %v", line, err)
		}
		var want string
		if err := json.Unmarshal(appendJSONString(nil, s), &want); err != nil || fr.topic != want {
			t.Fatalf("topic %q, want %q (%v)", fr.topic, want, err)
		}
	})
}
