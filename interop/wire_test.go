package interop_test

import (
	"encoding/json"
	"strings"
	"testing"
)

// wire is one protocol v1 message (PROTOCOL.md, section 4), as a client
// decodes it.
type wire struct {
	Op        string          `json:"op"`
	ID        string          `json:"id"`
	Topic     string          `json:"topic"`
	Epoch     string          `json:"epoch"`
	Seq       *uint64         `json:"seq"`
	Data      json.RawMessage `json:"data"`
	TS        int64           `json:"ts"`
	Code      string          `json:"code"`
	Reason    string          `json:"reason"`
	Session   string          `json:"session"`
	Heartbeat *struct {
		IntervalMS int64 `json:"interval_ms"`
		TimeoutMS  int64 `json:"timeout_ms"`
	} `json:"heartbeat"`
	Limits *struct {
		MsgsPerS float64 `json:"msgs_per_s"`
		Burst    int64   `json:"burst"`
	} `json:"limits"`
	Joins  []member `json:"joins"`
	Leaves []member `json:"leaves"`

	line string // as received
}

type member struct {
	User string          `json:"user"`
	Meta json.RawMessage `json:"meta"`
}

func (w wire) String() string { return w.line }

// seq returns the message's seq, or -1 when it has none.
func (w wire) seq() int64 {
	if w.Seq == nil {
		return -1
	}
	return int64(*w.Seq)
}

// splitLines decodes one WebSocket message of protocol v1: one JSON object
// per line, empty lines skipped (PROTOCOL.md, section 2).
func splitLines(t testing.TB, payload []byte) []wire {
	t.Helper()
	var out []wire
	for line := range strings.SplitSeq(string(payload), "\n") {
		if line == "" {
			continue
		}
		var w wire
		if err := json.Unmarshal([]byte(line), &w); err != nil {
			t.Errorf("the hub sent a line that is not JSON: %q: %v", line, err)
			continue
		}
		w.line = line
		out = append(out, w)
	}
	return out
}
