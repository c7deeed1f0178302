package wire

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"iter"
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
// *Error with code and id.
type protoCase struct {
	name string
	line string
	want Frame
	code Code
	id   string
}

// clientCases drive TestDecodeFrame and seed FuzzDecode.
var clientCases = []protoCase{
	// Every op, with and without its optional fields.
	{name: "ping", line: `{"op":"ping","ts":1700000000000}`, want: Frame{Op: OpPing, TS: 1700000000000}},
	{name: "ping without ts", line: `{"op":"ping"}`, want: Frame{Op: OpPing}},
	{name: "ping negative ts", line: `{"op":"ping","ts":-9223372036854775808}`, want: Frame{Op: OpPing, TS: math.MinInt64}},
	{name: "pong", line: `{"op":"pong","ts":42}`, want: Frame{Op: OpPong, TS: 42}},
	{name: "sub", line: `{"op":"sub","topic":"room:42"}`, want: Frame{Op: OpSub, Topic: "room:42"}},
	{name: "sub with id and since", line: `{"op":"sub","topic":"room:42","since":{"epoch":"e1","seq":17},"id":"s1"}`,
		want: Frame{Op: OpSub, Topic: "room:42", ID: "s1", Since: &Since{Epoch: "e1", Seq: 17}}},
	{name: "sub since max seq", line: `{"op":"sub","topic":"t","since":{"epoch":"","seq":18446744073709551615}}`,
		want: Frame{Op: OpSub, Topic: "t", Since: &Since{Seq: math.MaxUint64}}},
	{name: "sub null since", line: `{"op":"sub","topic":"t","since":null,"id":null}`, want: Frame{Op: OpSub, Topic: "t"}},
	{name: "sub latest", line: `{"op":"sub","topic":"room:42","latest":true,"id":"s2"}`,
		want: Frame{Op: OpSub, Topic: "room:42", ID: "s2", Latest: true}},
	{name: "sub latest false", line: `{"op":"sub","topic":"t","latest":false}`, want: Frame{Op: OpSub, Topic: "t"}},
	{name: "sub null latest", line: `{"op":"sub","topic":"t","latest":null}`, want: Frame{Op: OpSub, Topic: "t"}},
	{name: "sub latest and since", line: `{"op":"sub","topic":"t","latest":true,"since":{"epoch":"e1","seq":3}}`,
		want: Frame{Op: OpSub, Topic: "t", Since: &Since{Epoch: "e1", Seq: 3}, Latest: true}},
	{name: "unsub", line: `{"op":"unsub","topic":"room:42","id":"u1"}`, want: Frame{Op: OpUnsub, Topic: "room:42", ID: "u1"}},
	{name: "pub", line: `{"op":"pub","topic":"chat","data":{"text":"hi","n":[1,2.5,null]},"id":"p1"}`,
		want: Frame{Op: OpPub, Topic: "chat", ID: "p1", Data: json.RawMessage(`{"text":"hi","n":[1,2.5,null]}`)}},
	{name: "pub null data", line: `{"op":"pub","topic":"chat","data":null}`, want: Frame{Op: OpPub, Topic: "chat", Data: json.RawMessage(`null`)}},
	{name: "pub string data", line: `{"op":"pub","topic":"chat","data":"a\"}b"}`, want: Frame{Op: OpPub, Topic: "chat", Data: json.RawMessage(`"a\"}b"`)}},
	{name: "send", line: `{"op":"send","data":[true,false]}`, want: Frame{Op: OpSend, Data: json.RawMessage(`[true,false]`)}},
	{name: "send with id", line: `{"op":"send","data":7,"id":"x"}`, want: Frame{Op: OpSend, ID: "x", Data: json.RawMessage(`7`)}},
	{name: "received", line: `{"op":"received","epoch":"i7","seq":3}`, want: Frame{Op: OpReceived, Epoch: "i7", Seq: 3}},
	{name: "received with id", line: `{"op":"received","seq":9,"epoch":"e","id":"r"}`, want: Frame{Op: OpReceived, ID: "r", Epoch: "e", Seq: 9}},

	// Liberal in what is accepted.
	{name: "op not first", line: `{"topic":"t","op":"sub"}`, want: Frame{Op: OpSub, Topic: "t"}},
	{name: "whitespace everywhere", line: " \t{ \"op\" : \"pub\" , \"topic\" : \"t\" , \"data\" : { \"a\" : 1 } }\r",
		want: Frame{Op: OpPub, Topic: "t", Data: json.RawMessage(`{ "a" : 1 }`)}},
	{name: "unknown fields ignored", line: `{"op":"sub","topic":"t","v":2,"extra":{"op":"pub","topic":[]},"Topic":1}`,
		want: Frame{Op: OpSub, Topic: "t"}},
	{name: "fields of other ops ignored", line: `{"op":"ping","ts":1,"topic":5,"data":{},"id":7}`, want: Frame{Op: OpPing, TS: 1}},
	{name: "escaped keys", line: `{"o\u0070":"unsub","\u0074opic":"a"}`, want: Frame{Op: OpUnsub, Topic: "a"}},
	{name: "last duplicate wins in since", line: `{"op":"sub","topic":"t","since":{"epoch":1,"seq":"x","epoch":"e","seq":2}}`,
		want: Frame{Op: OpSub, Topic: "t", Since: &Since{Epoch: "e", Seq: 2}}},
	{name: "last duplicate wins", line: `{"op":"send","data":1,"op":"pub","topic":"t","data":[2]}`,
		want: Frame{Op: OpPub, Topic: "t", Data: json.RawMessage(`[2]`)}},
	{name: "topic escapes", line: `{"op":"sub","topic":"a\"b\\c\/d\u00e9\u2028😀<>&"}`, want: Frame{Op: OpSub, Topic: "a\"b\\c/dé\u2028😀<>&"}},
	{name: "lone surrogate becomes U+FFFD", line: `{"op":"sub","topic":"x\ud800"}`, want: Frame{Op: OpSub, Topic: "x\ufffd"}},
	{name: "topic 256 bytes", line: `{"op":"sub","topic":"` + strings.Repeat("é", 128) + `"}`, want: Frame{Op: OpSub, Topic: strings.Repeat("é", 128)}},
	{name: "id 64 bytes", line: `{"op":"unsub","topic":"t","id":"` + strings.Repeat("i", 64) + `"}`, want: Frame{Op: OpUnsub, Topic: "t", ID: strings.Repeat("i", 64)}},
	{name: "empty id", line: `{"op":"unsub","topic":"t","id":""}`, want: Frame{Op: OpUnsub, Topic: "t"}},

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
	{name: "received without seq", line: `{"op":"received","epoch":"e","id":"r"}`, code: CodeBadRequest, id: "r"},
	{name: "received without epoch", line: `{"op":"received","seq":1}`, code: CodeBadRequest},
	{name: "received with a negative seq", line: `{"op":"received","epoch":"e","seq":-1}`, code: CodeBadRequest},
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
	{name: "latest a string", line: `{"op":"sub","topic":"t","latest":"true","id":"s"}`, code: CodeBadRequest, id: "s"},
	{name: "latest a number", line: `{"op":"sub","topic":"t","latest":1}`, code: CodeBadRequest},
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
		want: Frame{Op: OpWelcome, Session: "s-1", Interval: 15 * time.Second, Timeout: 30 * time.Second}},
	{name: "welcome with resume", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":[{"topic":"a","epoch":"e","seq":3,"status":"ok"},{"topic":"b","epoch":"f","seq":0,"status":"resync"}]}`,
		want: Frame{Op: OpWelcome, Session: "s", Interval: time.Millisecond, Timeout: 2 * time.Millisecond,
			Resume: []Resume{{"a", "e", 3, ResumeOK}, {"b", "f", 0, ResumeResync}}}},
	{name: "welcome empty resume", line: `{"op":"welcome","session":"s","heartbeat":{"interval_ms":1,"timeout_ms":2},"resume":[]}`,
		want: Frame{Op: OpWelcome, Session: "s", Interval: time.Millisecond, Timeout: 2 * time.Millisecond}},
	{name: "ping", line: `{"op":"ping","ts":5}`, want: Frame{Op: OpPing, TS: 5}},
	{name: "pong", line: `{"op":"pong","ts":5}`, want: Frame{Op: OpPong, TS: 5}},
	{name: "topic msg", line: `{"op":"msg","topic":"room:42","epoch":"e1","seq":18,"data":{"text":"hi"}}`,
		want: Frame{Op: OpMsg, Topic: "room:42", Epoch: "e1", Seq: 18, Data: json.RawMessage(`{"text":"hi"}`)}},
	{name: "direct msg", line: `{"op":"msg","data":"hello"}`, want: Frame{Op: OpMsg, Data: json.RawMessage(`"hello"`)}},
	{name: "presence", line: `{"op":"presence","topic":"t","joins":[{"user":"ann","meta":{"device":"phone"}}],"leaves":[{"user":"bob"}]}`,
		want: Frame{Op: OpPresence, Topic: "t", Joins: []Member{{"ann", json.RawMessage(`{"device":"phone"}`)}}, Leaves: []Member{{User: "bob"}}, Count: -1}},
	{name: "presence without lists", line: `{"op":"presence","topic":"t"}`, want: Frame{Op: OpPresence, Topic: "t", Count: -1}},
	{name: "presence count only", line: `{"op":"presence","topic":"t","count":19000}`, want: Frame{Op: OpPresence, Topic: "t", Count: 19000}},
	{name: "presence snapshot", line: `{"op":"presence","topic":"t","count":1,"snapshot":true,"joins":[{"user":"ann"}]}`,
		want: Frame{Op: OpPresence, Topic: "t", Count: 1, Snapshot: true, Joins: []Member{{User: "ann"}}}},
	{name: "presence count null", line: `{"op":"presence","topic":"t","count":null,"snapshot":null}`, want: Frame{Op: OpPresence, Topic: "t", Count: -1}},
	{name: "resync", line: `{"op":"resync","topic":"t","epoch":"e2"}`, want: Frame{Op: OpResync, Topic: "t", Epoch: "e2"}},
	{name: "ack", line: `{"op":"ack","id":"s1"}`, want: Frame{Op: OpAck, ID: "s1"}},
	{name: "error", line: `{"op":"error","code":"forbidden","reason":"no","id":"p1"}`,
		want: Frame{Op: OpError, Code: CodeForbidden, Reason: "no", ID: "p1"}},
	{name: "error with a future code", line: `{"op":"error","code":"teapot"}`, want: Frame{Op: OpError, Code: "teapot"}},
	{name: "unknown fields ignored", line: `{"op":"ack","id":"a","v":[1]}`, want: Frame{Op: OpAck, ID: "a"}},

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
	{name: "presence count negative", line: `{"op":"presence","topic":"t","count":-1}`, code: CodeBadRequest},
	{name: "presence count fraction", line: `{"op":"presence","topic":"t","count":1.5}`, code: CodeBadRequest},
	{name: "presence snapshot not a bool", line: `{"op":"presence","topic":"t","snapshot":1}`, code: CodeBadRequest},
	{name: "resync without epoch", line: `{"op":"resync","topic":"t"}`, code: CodeBadRequest},
	{name: "ack without id", line: `{"op":"ack"}`, code: CodeBadRequest},
	{name: "error without code", line: `{"op":"error","reason":"r","id":"e"}`, code: CodeBadRequest, id: "e"},
}

func runProtoCases(t *testing.T, cases []protoCase, decode func([]byte) (Frame, error)) {
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
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("decode(%s) = %+v, %v; want a *Error", tc.line, got, err)
			}
			if pe.Code != tc.code || pe.ID != tc.id {
				t.Fatalf("decode(%s): code %q id %q (%v); want code %q id %q", tc.line, pe.Code, pe.ID, err, tc.code, tc.id)
			}
			if !reflect.DeepEqual(got, Frame{}) {
				t.Errorf("decode(%s) failed but returned %+v", tc.line, got)
			}
		})
	}
}

func TestDecodeFrame(t *testing.T) { runProtoCases(t, clientCases, DecodeClient) }

func TestDecodeServerFrame(t *testing.T) { runProtoCases(t, serverCases, DecodeServer) }

// TestDecodeOwnsMemory checks that a decoded frame does not alias its
// line: the caller may reuse the buffer it read the line into.
func TestDecodeOwnsMemory(t *testing.T) {
	line := []byte(`{"op":"pub","topic":"chat","data":{"text":"hi"},"id":"p1"}`)
	f, err := DecodeClient(line)
	if err != nil {
		t.Fatal(err)
	}
	server := []byte(`{"op":"presence","topic":"t","joins":[{"user":"ann","meta":{"d":1}}]}`)
	g, err := DecodeServer(server)
	if err != nil {
		t.Fatal(err)
	}
	for _, buf := range [][]byte{line, server} {
		for i := range buf {
			buf[i] = 'x'
		}
	}
	if string(f.Data) != `{"text":"hi"}` || f.Topic != "chat" || f.ID != "p1" {
		t.Errorf("pub changed with its line: %+v", f)
	}
	if string(g.Joins[0].Meta) != `{"d":1}` || g.Joins[0].User != "ann" {
		t.Errorf("presence changed with its line: %+v", g)
	}
}

func TestProtocolErrorMessage(t *testing.T) {
	_, err := DecodeClient([]byte(`{"op":"sub","topic":"","id":"s7"}`))
	if got, want := err.Error(), "tether: protocol: bad_request: topic is empty"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	var pe *Error
	if !errors.As(err, &pe) || pe.ID != "s7" {
		t.Errorf("errors.As(%v) = %v, id %q", err, pe, pe.ID)
	}
	// An op echoed in a reason is bounded.
	_, err = DecodeClient([]byte(`{"op":"` + strings.Repeat("x", 1000) + `"}`))
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
		want Frame
	}
	add := func(line []byte, want Frame) {
		cases = append(cases, struct {
			line []byte
			want Frame
		}{line, want})
	}
	for _, topic := range protoTopics {
		add(AppendMsg(nil, topic, "e-"+topic, 18, data), Frame{Op: OpMsg, Topic: topic, Epoch: "e-" + topic, Seq: 18, Data: data})
		add(AppendPresence(nil, topic, 2, true, []Member{{topic, nil}, {"ann", json.RawMessage(`{"d":1}`)}}, nil),
			Frame{Op: OpPresence, Topic: topic, Count: 2, Snapshot: true, Joins: []Member{{topic, nil}, {"ann", json.RawMessage(`{"d":1}`)}}})
		add(AppendResync(nil, topic, topic), Frame{Op: OpResync, Topic: topic, Epoch: topic})
		add(AppendAck(nil, topic), Frame{Op: OpAck, ID: topic})
		add(AppendSubAck(nil, topic, topic, 17), Frame{Op: OpAck, ID: topic, Epoch: topic, Seq: 17})
		add(AppendError(nil, CodeForbidden, topic, topic), Frame{Op: OpError, Code: CodeForbidden, Reason: topic, ID: topic})
		add(AppendWelcome(nil, topic, 15*time.Second, 30*time.Second, Limits{100, 200}, 0, []Resume{{topic, topic, 7, ResumeOK}, {"b", "", 0, ResumeResync}}),
			Frame{Op: OpWelcome, Session: topic, Interval: 15 * time.Second, Timeout: 30 * time.Second, Limits: Limits{100, 200},
				Resume: []Resume{{topic, topic, 7, ResumeOK}, {"b", "", 0, ResumeResync}}})
	}
	add(AppendMsg(nil, "", "", 0, json.RawMessage(`"direct"`)), Frame{Op: OpMsg, Data: json.RawMessage(`"direct"`)})
	add(AppendMsg(nil, "t", "e", math.MaxUint64, nil), Frame{Op: OpMsg, Topic: "t", Epoch: "e", Seq: math.MaxUint64, Data: json.RawMessage(`null`)})
	add(AppendPresence(nil, "t", 0, false, nil, []Member{{"bob", json.RawMessage(`null`)}}),
		Frame{Op: OpPresence, Topic: "t", Leaves: []Member{{"bob", json.RawMessage(`null`)}}})
	add(AppendPresence(nil, "t", 20000, true, nil, nil), Frame{Op: OpPresence, Topic: "t", Count: 20000, Snapshot: true})
	add(AppendPresence(nil, "t", 20001, false, nil, nil), Frame{Op: OpPresence, Topic: "t", Count: 20001})
	add(AppendPresence(nil, "t", -1, false, []Member{}, []Member{}), Frame{Op: OpPresence, Topic: "t", Count: -1})
	add(AppendError(nil, CodeInternal, "", ""), Frame{Op: OpError, Code: CodeInternal})
	add(AppendWelcome(nil, "", 1500*time.Microsecond, time.Hour, Limits{}, 2*time.Minute, nil), Frame{Op: OpWelcome, Interval: time.Millisecond, Timeout: time.Hour, Dedupe: 2 * time.Minute})
	add(AppendPing(nil, math.MinInt64), Frame{Op: OpPing, TS: math.MinInt64})
	add(AppendPong(nil, math.MaxInt64), Frame{Op: OpPong, TS: math.MaxInt64})
	for _, tc := range cases {
		got, err := DecodeServer(tc.line)
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
		if !bytes.HasPrefix(tc.line, []byte(`{"op":"`+got.Op+`"`)) {
			t.Errorf("encoded %s: op is not first", tc.line)
		}
	}
}

func TestEncodeClientRoundTrip(t *testing.T) {
	for _, topic := range protoTopics {
		for _, f := range []Frame{
			{Op: OpSub, Topic: topic},
			{Op: OpSub, Topic: topic, ID: "s1", Since: &Since{Epoch: topic, Seq: 99}},
			{Op: OpSub, Topic: topic, ID: "s2", Latest: true},
			{Op: OpSub, Topic: topic, Since: &Since{Epoch: topic, Seq: 1}, Latest: true},
			{Op: OpUnsub, Topic: topic, ID: strings.Repeat("i", 64)},
			{Op: OpPub, Topic: topic, Data: json.RawMessage(`[1,"two"]`), ID: topic[:min(len(topic), 64)]},
			{Op: OpSend, Data: json.RawMessage(`{}`)},
			{Op: OpPing, TS: 1},
			{Op: OpPong, TS: -1},
		} {
			line := protoEncode(f)
			got, err := DecodeClient(line)
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
		{string(AppendMsg(nil, "room:42", "e1", 18, json.RawMessage(`{"text":"hi"}`))), `{"op":"msg","topic":"room:42","epoch":"e1","seq":18,"data":{"text":"hi"}}`},
		{string(AppendMsg(nil, "", "", 0, json.RawMessage(`{"text":"hi"}`))), `{"op":"msg","data":{"text":"hi"}}`},
		{string(AppendWelcome(nil, "c9f1", 15*time.Second, 30*time.Second, Limits{}, 0, []Resume{{"room:42", "e1", 20, ResumeOK}})),
			`{"op":"welcome","session":"c9f1","heartbeat":{"interval_ms":15000,"timeout_ms":30000},"resume":[{"topic":"room:42","epoch":"e1","seq":20,"status":"ok"}]}`},
		{string(AppendWelcome(nil, "c9f1", 15*time.Second, 30*time.Second, Limits{0.5, 20}, 0, nil)),
			`{"op":"welcome","session":"c9f1","heartbeat":{"interval_ms":15000,"timeout_ms":30000},"limits":{"msgs_per_s":0.5,"burst":20}}`},
		{string(AppendPing(nil, 1700000000000)), `{"op":"ping","ts":1700000000000}`},
		{string(AppendPong(nil, 1700000000000)), `{"op":"pong","ts":1700000000000}`},
		{string(AppendAck(nil, "s1")), `{"op":"ack","id":"s1"}`},
		{string(AppendSubAck(nil, "2", "e1", 17)), `{"op":"ack","id":"2","epoch":"e1","seq":17}`},
		{string(AppendError(nil, CodeForbidden, "not allowed", "p1")), `{"op":"error","code":"forbidden","reason":"not allowed","id":"p1"}`},
		{string(AppendPresence(nil, "room:42", 1, true, []Member{{"ann", json.RawMessage(`{"device":"phone"}`)}}, nil)),
			`{"op":"presence","topic":"room:42","count":1,"snapshot":true,"joins":[{"user":"ann","meta":{"device":"phone"}}]}`},
		{string(AppendPresence(nil, "room:42", 2, false, []Member{{"bob", nil}}, []Member{})),
			`{"op":"presence","topic":"room:42","count":2,"joins":[{"user":"bob"}],"leaves":[]}`},
		{string(AppendPresence(nil, "room:42", 250, true, nil, nil)), `{"op":"presence","topic":"room:42","count":250,"snapshot":true,"joins":[]}`},
		{string(AppendPresence(nil, "room:42", 251, false, nil, nil)), `{"op":"presence","topic":"room:42","count":251}`},
		{string(AppendResync(nil, "room:42", "e2")), `{"op":"resync","topic":"room:42","epoch":"e2"}`},
		{string(AppendSub(nil, "room:42", &Since{"e1", 17}, false, "s1")), `{"op":"sub","topic":"room:42","since":{"epoch":"e1","seq":17},"id":"s1"}`},
		{string(AppendSub(nil, "room:42", nil, true, "s2")), `{"op":"sub","topic":"room:42","latest":true,"id":"s2"}`},
		{string(AppendSub(nil, "t", nil, false, "")), `{"op":"sub","topic":"t"}`},
		{string(AppendUnsub(nil, "room:42", "")), `{"op":"unsub","topic":"room:42"}`},
		{string(AppendPub(nil, "room:42", json.RawMessage(`{"text":"hi"}`), "p1")), `{"op":"pub","topic":"room:42","data":{"text":"hi"},"id":"p1"}`},
		{string(AppendSend(nil, json.RawMessage(`{"cmd":"typing"}`), "")), `{"op":"send","data":{"cmd":"typing"}}`},
		{string(AppendReceived(nil, "i7", 3, "")), `{"op":"received","epoch":"i7","seq":3}`},
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
				buf = AppendMsg(buf[:0], tc.topic, "e1", 123456, data)
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
	b.SetBytes(int64(len(AppendMsg(nil, "room:42", "e1", 123456, data))))
	for b.Loop() {
		buf = AppendMsg(buf[:0], "room:42", "e1", 123456, data)
	}
}

func BenchmarkEncodeMsgEscaped(b *testing.B) {
	data := json.RawMessage(`{"text":"hello, world","user":"ann","at":1700000000000}`)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendMsg(buf[:0], "salle:42/été", "e1", 123456, data)
	}
}

func BenchmarkDecodeFrame(b *testing.B) {
	line := []byte(`{"op":"pub","topic":"room:42","data":{"text":"hello, world","user":"ann"},"id":"p1"}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		if _, err := DecodeClient(line); err != nil {
			b.Fatal(err)
		}
	}
}

// outcomes decodes payload, a client's message, into the op of each
// protocol message, or the code of its failure.
func outcomes(t *testing.T, payload []byte, binary bool) []string {
	t.Helper()
	var got []string
	for f, err := range ClientFrames(payload, binary) {
		var pe *Error
		switch {
		case err == nil:
			got = append(got, f.Op)
		case errors.As(err, &pe):
			got = append(got, string(pe.Code))
		default:
			t.Fatalf("ClientFrames(%q): %v, want a *Error", payload, err)
		}
	}
	return got
}

func TestClientFramesText(t *testing.T) {
	for _, tc := range []struct {
		payload string
		want    []string
	}{
		{"", nil},
		{"\n\n\n", nil},
		{`{"op":"ping"}`, []string{"ping"}},
		{`{"op":"ping"}` + "\n", []string{"ping"}},
		{"a\nb\nc", []string{"bad_request", "bad_request", "bad_request"}},
		{"\n{\"op\":\"ping\"}\n\n\n{\"op\":\"pong\"}\n", []string{"ping", "pong"}},
		{"{\"op\":\"ping\"}\r\n{\"op\":\"pong\"}\r\n", []string{"ping", "pong"}},
		// A coalesced message decodes line by line; a line of spaces is
		// refused, not skipped.
		{`{"op":"sub","topic":"a","id":"1"}` + "\n" + `{"op":"pub","topic":"a","data":[1]}` + "\n   \n" + `{"op":"ping","ts":3}` + "\n",
			[]string{"sub", "pub", "bad_request", "ping"}},
		// len belongs to binary messages: refused in a text one, and the
		// next line is read.
		{`{"op":"pub","topic":"a","len":1}` + "\nx\n" + `{"op":"ping"}`, []string{"bad_request", "bad_request", "ping"}},
	} {
		if got := outcomes(t, []byte(tc.payload), false); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ClientFrames(%q) = %q, want %q", tc.payload, got, tc.want)
		}
	}
	// Stopping early stops.
	n := 0
	for range ClientFrames([]byte("a\nb\nc"), false) {
		n++
		break
	}
	if n != 1 {
		t.Errorf("break: %d lines", n)
	}
}

func TestClientFramesBinary(t *testing.T) {
	bin := []byte{0, '\n', 0xff, '{', 1}
	payload := AppendPubOf(nil, "t", KindBinary, bin, "1")
	payload = append(payload, '\n')
	payload = AppendSendOf(payload, KindText, []byte("héllo\nworld"), "")
	payload = append(payload, `{"op":"ping","ts":5}`...) // a line without len: no newline needed before it
	payload = append(payload, '\n')
	payload = AppendPubOf(payload, "t", KindJSON, []byte(`{"a":1}`), "2")
	payload = append(payload, '\n')
	payload = AppendPubOf(payload, "t", KindBinary, nil, "") // empty data

	var got []Frame
	for f, err := range ClientFrames(payload, true) {
		if err != nil {
			t.Fatalf("ClientFrames(%q): %v", payload, err)
		}
		got = append(got, f)
	}
	if len(got) != 5 {
		t.Fatalf("%d frames, want 5: %+v", len(got), got)
	}
	if f := got[0]; f.Op != OpPub || f.Topic != "t" || f.ID != "1" || f.Kind != KindBinary || !bytes.Equal(f.Data, bin) {
		t.Errorf("first: %+v, want a binary pub of %q", f, bin)
	}
	if cap(got[0].Data) != len(bin) {
		t.Errorf("binary data has cap %d: an append would overwrite the next record", cap(got[0].Data))
	}
	if f := got[1]; f.Op != OpSend || f.Kind != KindText || string(f.Data) != "héllo\nworld" {
		t.Errorf("second: %+v, want a text send", f)
	}
	if f := got[2]; f.Op != OpPing || f.TS != 5 {
		t.Errorf("third: %+v, want a ping", f)
	}
	if f := got[3]; f.Op != OpPub || f.Kind != KindJSON || string(f.Data) != `{"a":1}` {
		t.Errorf("fourth: %+v, want a JSON pub", f)
	}
	if f := got[4]; f.Op != OpPub || f.Kind != KindBinary || len(f.Data) != 0 {
		t.Errorf("fifth: %+v, want an empty binary pub", f)
	}

	for _, tc := range []struct {
		name, payload string
		want          []string
	}{
		// Framing lost: the message ends with the failure.
		{"len past the end", `{"op":"pub","topic":"t","len":99}` + "\nabc\n" + `{"op":"ping"}`, []string{"bad_request"}},
		{"len not a number", `{"op":"pub","topic":"t","len":"3"}` + "\nabc\n" + `{"op":"ping"}`, []string{"bad_request"}},
		{"negative len", `{"op":"pub","topic":"t","len":-1}` + "\n" + `{"op":"ping"}`, []string{"bad_request"}},
		{"unreadable line", "{oops\n" + `{"op":"ping"}`, []string{"bad_request"}},
		// Framing kept: the next record is read.
		{"data and len", `{"op":"pub","topic":"t","data":1,"len":1}` + "\nx" + `{"op":"ping"}`, []string{"bad_request", "ping"}},
		{"len on a sub", `{"op":"sub","topic":"t","len":1}` + "\nx" + `{"op":"ping"}`, []string{"bad_request", "ping"}},
		{"bad topic", `{"op":"pub","topic":"","len":1}` + "\nx" + `{"op":"ping"}`, []string{"bad_request", "ping"}},
		{"text not UTF-8", `{"op":"send","len":1,"text":true}` + "\n\xff" + `{"op":"ping"}`, []string{"bad_request", "ping"}},
		{"server op", `{"op":"msg","len":1}` + "\nx" + `{"op":"ping"}`, []string{"unknown_op", "ping"}},
		{"header not UTF-8", "{\"op\":\"ping\",\"x\":\"\xff\"}\n" + `{"op":"ping"}`, []string{"bad_request"}},
	} {
		if got := outcomes(t, []byte(tc.payload), true); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: ClientFrames(%q) = %q, want %q", tc.name, tc.payload, got, tc.want)
		}
	}
}

func TestServerFramesBinary(t *testing.T) {
	payload := AppendMsgOf(nil, "room", "e1", 7, KindBinary, []byte("\x00\x01"))
	payload = append(payload, '\n')
	payload = AppendMsgOf(payload, "", "", 0, KindText, []byte("plain"))
	payload = append(payload, '\n')
	payload = AppendPresence(payload, "room", 3, false, nil, nil)
	var got []Frame
	for f, err := range ServerFrames(payload, true) {
		if err != nil {
			t.Fatalf("ServerFrames(%q): %v", payload, err)
		}
		got = append(got, f)
	}
	if len(got) != 3 {
		t.Fatalf("%d frames, want 3", len(got))
	}
	if f := got[0]; f.Op != OpMsg || f.Topic != "room" || f.Epoch != "e1" || f.Seq != 7 || f.Kind != KindBinary || string(f.Data) != "\x00\x01" {
		t.Errorf("first: %+v", f)
	}
	if f := got[1]; f.Op != OpMsg || f.Topic != "" || f.Kind != KindText || string(f.Data) != "plain" {
		t.Errorf("second: %+v", f)
	}
	if f := got[2]; f.Op != OpPresence || f.Count != 3 {
		t.Errorf("third: %+v", f)
	}
	if _, err := DecodeServer([]byte(`{"op":"ack","id":"1","len":0}`)); err == nil {
		t.Error("DecodeServer took a len on an ack")
	}
}

func TestStoreLoad(t *testing.T) {
	for _, tc := range []struct {
		kind Kind
		data string
	}{{KindJSON, `{"a":1}`}, {KindJSON, ` 1`}, {KindBinary, ""}, {KindBinary, "\x01\x02"}, {KindText, "\x02"}, {KindText, "hi"}} {
		kind, data := Load(Store(tc.kind, []byte(tc.data)))
		if kind != tc.kind || string(data) != tc.data {
			t.Errorf("Load(Store(%d, %q)) = %d, %q", tc.kind, tc.data, kind, data)
		}
	}
}

func TestProtocolCheckTopic(t *testing.T) {
	for _, s := range protoTopics {
		if err := CheckTopic(s); err != nil {
			t.Errorf("checkTopic(%q): %v", s, err)
		}
	}
	for _, s := range []string{"", strings.Repeat("a", 257), "a\xff", "a\x00", "a\nb", "\u0085", "a\u007f"} {
		var pe *Error
		if err := CheckTopic(s); !errors.As(err, &pe) || pe.Code != CodeBadRequest {
			t.Errorf("checkTopic(%q) = %v, want bad_request", s, err)
		}
	}
}

func TestProtocolCompactData(t *testing.T) {
	in := []byte(`{"a": 1}`)
	if got, err := CompactData(in); err != nil || &got[0] != &in[0] {
		t.Errorf("compactData(%s) = %s, %v; want the same bytes", in, got, err)
	}
	got, err := CompactData([]byte("{\n  \"a\": [\n    1,\n    \"x\\ny\"\n  ]\n}\n"))
	if err != nil || string(got) != `{"a":[1,"x\ny"]}` {
		t.Errorf("compactData(indented) = %s, %v", got, err)
	}
	for _, bad := range []string{"", "{", `{"a":1} x`, "\"\xff\""} {
		if _, err := CompactData([]byte(bad)); err == nil {
			t.Errorf("compactData(%q) succeeded", bad)
		}
	}
}

// TestProtocolDocExamples decodes every line of the json blocks of
// PROTOCOL.md: a client-to-server example must pass decodeFrame and a
// server-to-client one decodeServerFrame, so the spec cannot drift from
// the code. Blocks are marked c2s or s2c in their info string.
func TestProtocolDocExamples(t *testing.T) {
	doc, err := os.Open("../../PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	defer doc.Close()
	sc := bufio.NewScanner(doc)
	var decode func([]byte) (Frame, error)
	n := 0
	for lineNo := 1; sc.Scan(); lineNo++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "```json c2s"):
			decode = DecodeClient
		case strings.HasPrefix(line, "```json s2c"):
			decode = DecodeServer
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
func protoEncode(f Frame) []byte {
	switch f.Op {
	case OpPing:
		return AppendPing(nil, f.TS)
	case OpPong:
		return AppendPong(nil, f.TS)
	case OpSub:
		return AppendSub(nil, f.Topic, f.Since, f.Latest, f.ID)
	case OpUnsub:
		return AppendUnsub(nil, f.Topic, f.ID)
	case OpPub:
		return AppendPub(nil, f.Topic, f.Data, f.ID)
	case OpSend:
		return AppendSend(nil, f.Data, f.ID)
	case OpReceived:
		return AppendReceived(nil, f.Epoch, f.Seq, f.ID)
	case OpWelcome:
		return AppendWelcome(nil, f.Session, f.Interval, f.Timeout, f.Limits, f.Dedupe, f.Resume)
	case OpMsg:
		return AppendMsg(nil, f.Topic, f.Epoch, f.Seq, f.Data)
	case OpPresence:
		return AppendPresence(nil, f.Topic, int(f.Count), f.Snapshot, f.Joins, f.Leaves)
	case OpResync:
		return AppendResync(nil, f.Topic, f.Epoch)
	case OpAck:
		if f.Epoch != "" {
			return AppendSubAck(nil, f.ID, f.Epoch, f.Seq)
		}
		return AppendAck(nil, f.ID)
	case OpError:
		return AppendError(nil, f.Code, f.Reason, f.ID)
	}
	panic("no encoder for op " + f.Op)
}

var knownCodes = map[Code]bool{
	CodeBadRequest: true, CodeUnknownOp: true, CodeForbidden: true,
	CodeRateLimited: true, CodeTooBig: true, CodeInternal: true,
}

// fuzzDecode is the property both decoders must have: no panic; on
// success, the frame survives encoding and decoding again, and agrees
// with encoding/json on the op and topic; on failure, a *Error
// with a known code and a bounded id.
func fuzzDecode(t *testing.T, line []byte, decode func([]byte) (Frame, error)) {
	f, err := decode(line)
	if err != nil {
		var pe *Error
		if !errors.As(err, &pe) {
			t.Fatalf("error %v (%T) is not a *Error", err, err)
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
	if json.Unmarshal(m["op"], &op) != nil || op != f.Op {
		t.Fatalf("op %q, encoding/json says %s", f.Op, m["op"])
	}
	if f.Topic != "" && (json.Unmarshal(m["topic"], &topic) != nil || topic != f.Topic) {
		t.Fatalf("topic %q, encoding/json says %s", f.Topic, m["topic"])
	}
	if f.Data != nil && !bytes.Equal(f.Data, m["data"]) {
		t.Fatalf("data %s, encoding/json says %s", f.Data, m["data"])
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
		fuzzDecode(t, line, DecodeClient)
		if fr, err := DecodeClient(line); err == nil {
			if fr.Op == OpSub || fr.Op == OpUnsub || fr.Op == OpPub {
				if err := CheckTopic(fr.Topic); err != nil {
					t.Fatalf("accepted topic %q: %v", fr.Topic, err)
				}
			}
			if len(fr.ID) > maxIDBytes {
				t.Fatalf("accepted id of %d bytes", len(fr.ID))
			}
		}
	})
}

// FuzzFrames decodes any message, text or binary, as a client's and as a
// server's: nothing panics, binary data lies within the message and is
// capped, and a binary pub re-encoded decodes to the same frame.
func FuzzFrames(f *testing.F) {
	for _, tc := range clientCases {
		f.Add([]byte(tc.line), false)
	}
	f.Add(AppendPubOf(nil, "t", KindBinary, []byte{0, 1, '\n'}, "1"), true)
	f.Add(AppendSendOf(AppendSendOf(nil, KindText, []byte("a"), ""), KindBinary, nil, "2"), true)
	f.Add(AppendMsgOf([]byte(`{"op":"ping"}`+"\n"), "t", "e", 1, KindBinary, []byte("x")), true)
	f.Add([]byte(`{"op":"pub","topic":"t","len":18446744073709551615}`+"\n"), true)
	f.Fuzz(func(t *testing.T, payload []byte, binary bool) {
		for _, frames := range []func([]byte, bool) iter.Seq2[Frame, error]{ClientFrames, ServerFrames} {
			for fr, err := range frames(payload, binary) {
				if err != nil {
					var pe *Error
					if !errors.As(err, &pe) {
						t.Fatalf("error %v is not a *Error", err)
					}
					continue
				}
				if fr.Kind == KindJSON {
					continue
				}
				if !binary {
					t.Fatalf("a text message gave data of kind %d", fr.Kind)
				}
				if len(fr.Data) != cap(fr.Data) {
					t.Fatalf("data of len %d, cap %d", len(fr.Data), cap(fr.Data))
				}
				if fr.Kind == KindText && !utf8.Valid(fr.Data) {
					t.Fatalf("text data %q is not UTF-8", fr.Data)
				}
				if fr.Op == OpPub {
					again := AppendPubOf(nil, fr.Topic, fr.Kind, fr.Data, fr.ID)
					n := 0
					for g, err := range ClientFrames(again, true) {
						n++
						if err != nil || g.Op != OpPub || g.Topic != fr.Topic || g.ID != fr.ID || g.Kind != fr.Kind || !bytes.Equal(g.Data, fr.Data) {
							t.Fatalf("re-encoded %q: %+v, %v; want %+v", again, g, err, fr)
						}
					}
					if n != 1 {
						t.Fatalf("re-encoded %q: %d frames", again, n)
					}
				}
			}
		}
	})
}

func FuzzDecodeServer(f *testing.F) {
	for _, tc := range serverCases {
		f.Add([]byte(tc.line))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		fuzzDecode(t, line, DecodeServer)
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
		line := AppendMsg(nil, s, s, 1, json.RawMessage(`1`))
		fr, err := DecodeServer(line)
		if err != nil {
			t.Fatalf("decodeServerFrame(%s): %v", line, err)
		}
		var want string
		if err := json.Unmarshal(appendJSONString(nil, s), &want); err != nil || fr.Topic != want {
			t.Fatalf("topic %q, want %q (%v)", fr.Topic, want, err)
		}
	})
}
