package redisbroker

import (
	"encoding/json"
	"testing"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/adapter"
)

// The payloads on Redis channels and in a node's records are written by
// this package and its scripts, but Redis is shared: whatever arrives is
// parsed without panicking, and what this package writes reads back.

func TestPayloadRoundTrips(t *testing.T) {
	for _, c := range []struct{ user, data string }{
		{"ann", `{"a":1}`}, {"", `"x"`}, {"a:b:c", "12:34"}, {"ü", ""},
	} {
		user, data, ok := parseDirect(string(appendDirect(nil, c.user, []byte(c.data))))
		if !ok || user != c.user || string(data) != c.data {
			t.Errorf("direct %q %q: got %q %q %v", c.user, c.data, user, data, ok)
		}
		topic, u, ok := parsePresenceKey(presenceKey(c.data, c.user))
		if !ok || topic != c.data || u != c.user {
			t.Errorf("presence key %q %q: got %q %q %v", c.data, c.user, topic, u, ok)
		}
	}
	pos, data, ev, err := parseTopicPayload("mAbC_-x:42:{\"k\":\"a:b\"}")
	if err != nil || ev != nil || pos != (tether.Position{Epoch: "AbC_-x", Seq: 42}) || string(data) != `{"k":"a:b"}` {
		t.Errorf("message: got %v %q %v %v", pos, data, ev, err)
	}
	want := presenceEvent{Node: "n1", User: "bob", Conns: []adapter.MemberConn{{ID: "c1", Meta: json.RawMessage(`{"d":1}`)}}}
	b, _ := json.Marshal(want)
	_, _, ev, err = parseTopicPayload("p" + string(b))
	if err != nil || ev == nil || ev.Node != "n1" || ev.User != "bob" || len(ev.Conns) != 1 || string(ev.Conns[0].Meta) != `{"d":1}` {
		t.Errorf("presence: got %+v %v", ev, err)
	}
	for _, bad := range []string{"", "m", "m:1:x", "me:0:x", "me:x:y", "me1:x", "p", "p{}", "p[1]", "q", "u", "u3:ab", "u-1:", "u01:a", "ux:"} {
		if _, _, _, err := parseTopicPayload(bad); err == nil && bad[0] != 'u' {
			t.Errorf("topic payload %q accepted", bad)
		}
		if _, _, ok := parseDirect(bad); ok {
			t.Errorf("direct payload %q accepted", bad)
		}
	}
}

func FuzzPayloads(f *testing.F) {
	for _, s := range []string{"mAbC:1:{}", "m:1:", "p{\"n\":\"a\",\"u\":\"b\"}", "u3:ann\"hi\"", "u99:", "3:abcuser", "-1:", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if user, data, ok := parseDirect(s); ok {
			if got := string(appendDirect(nil, user, data)); got != s {
				t.Fatalf("direct %q re-encodes as %q", s, got)
			}
		}
		if topic, user, ok := parsePresenceKey(s); ok {
			if got := presenceKey(topic, user); got != s {
				t.Fatalf("presence key %q re-encodes as %q", s, got)
			}
		}
		if pos, _, ev, err := parseTopicPayload(s); err == nil && ev == nil && (pos.Epoch == "" || pos.Seq == 0) {
			t.Fatalf("message %q parsed to an empty position", s)
		}
	})
}
