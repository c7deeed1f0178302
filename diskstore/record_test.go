package diskstore

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzRecords feeds the decoders of the on-disk format arbitrary bytes, as
// a damaged file would: they must return a value or errCorrupt, never
// panic, and a value they return must encode back to the same bytes.
func FuzzRecords(f *testing.F) {
	f.Add(topicRec{id: 1, seq: 5, touched: 1e18, appended: true, epoch: "AAAAAAAAAAA"}.encode())
	f.Add(topicRec{id: 1 << 40, seq: maxSeq, epoch: "e"}.encode())
	f.Add(userRec{id: 3, head: 1, tail: 4, bytes: 12, lastAt: 1e18}.encode())
	f.Add(inboxRec{id: 2, head: 3, next: 9, lastAt: 1e18, epoch: "AAAAAAAAAAA"}.encode())
	f.Add(expKey(1e18, "ann\x00abcdefghijklmnop.1"))
	f.Add(encodeMsg(1e18, []byte(`{"n":1}`)))
	f.Add(key3(1, 2, 3))
	f.Add(key2(1, 2))
	f.Add([]byte{})
	f.Add([]byte{recVersion, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		check := func(what string, enc []byte, err error) {
			t.Helper()
			if err != nil {
				if !errors.Is(err, errCorrupt) {
					t.Fatalf("%s: error %v does not wrap errCorrupt", what, err)
				}
				return
			}
			if !bytes.Equal(enc, b) {
				t.Fatalf("%s: decoded %x, encodes back to %x", what, b, enc)
			}
		}
		r, err := decodeTopicRec(b)
		if err == nil && (r.epoch == "" || r.id == 0 || r.seq > maxSeq) {
			t.Fatalf("topic record %x decoded to an impossible %+v", b, r)
		}
		check("topic record", r.encode(), err)

		u, err := decodeUserRec(b)
		if err == nil && (u.head >= u.tail || u.n() <= 0 || u.bytes < 0) {
			t.Fatalf("user record %x decoded to an impossible %+v", b, u)
		}
		check("user record", u.encode(), err)

		ir, err := decodeInboxRec(b)
		if err == nil && (ir.epoch == "" || ir.id == 0 || ir.head == 0 || ir.head >= ir.next || ir.n() <= 0) {
			t.Fatalf("inbox record %x decoded to an impossible %+v", b, ir)
		}
		check("inbox record", ir.encode(), err)

		exp, key, err := decodeExpKey(b)
		if err == nil && exp < 0 {
			t.Fatalf("request id entry %x decoded to an expiry of %d", b, exp)
		}
		check("request id entry", expKey(exp, key), err)

		at, data, err := decodeMsg(b)
		if err == nil {
			check("message", encodeMsg(at, data), nil)
		} else {
			check("message", nil, err)
		}

		for _, n := range []int{2, 3} {
			ks, err := decodeKey(b, n)
			if err != nil {
				check("key", nil, err)
				continue
			}
			var enc []byte
			if n == 2 {
				enc = key2(ks[0], ks[1])
			} else {
				enc = key3(ks[0], ks[1], ks[2])
			}
			check("key", enc, nil)
		}

		v, err := decodeU64(b)
		if err == nil && b != nil {
			check("counter", u64(v), nil)
		} else if err != nil {
			check("counter", nil, err)
		}
	})
}
