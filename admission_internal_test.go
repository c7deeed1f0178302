package tether

import (
	"testing"
	"time"
)

// Refused clients that never come back for their slots do not push the
// line out of reach: the slots handed out reach at most a minute ahead,
// and once the bucket has refilled the next refusal waits a slot, not the
// whole line.
func TestAdmissionHorizon(t *testing.T) {
	a := newAdmission(100, 10)
	now := time.Unix(1000, 0)
	for range 10 {
		if ok, _ := a.take(now); !ok {
			t.Fatal("the burst refused")
		}
	}
	var wait time.Duration
	for range 100000 {
		var ok bool
		if ok, wait = a.take(now); ok {
			t.Fatal("admitted past the burst")
		}
	}
	if wait > admissionHorizon {
		t.Errorf("the 100,000th refusal waits %v, want at most %v", wait, admissionHorizon)
	}
	later := now.Add(5 * time.Minute)
	for range 10 {
		if ok, _ := a.take(later); !ok {
			t.Fatal("the refilled bucket refused")
		}
	}
	if ok, wait := a.take(later); ok || wait > time.Second {
		t.Errorf("past the refilled burst: admitted %v, wait %v; want a refusal with a slot within a second", ok, wait)
	}
}
