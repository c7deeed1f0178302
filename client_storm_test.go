package tether_test

import (
	"testing"
	"time"
)

// stormWindow is the window the storm criterion is measured in.
const stormWindow = 100 * time.Millisecond

// peakAndMean returns the most attempts in any window of stormWindow (a
// sliding window starting at each attempt) and the mean per window over
// the reconnect period, from the drop to the last attempt. The period
// starts at the drop, not at the first attempt, so that clients that all
// wait the same delay and then come at once show as the storm they are.
func peakAndMean(drop time.Time, at []time.Time) (peak int, mean float64, span time.Duration) {
	if len(at) == 0 {
		return 0, 0, 0
	}
	j := 0
	for i := range at {
		for j < len(at) && at[j].Sub(at[i]) < stormWindow {
			j++
		}
		peak = max(peak, j-i)
	}
	span = at[len(at)-1].Sub(drop)
	mean = float64(len(at)) * float64(stormWindow) / float64(max(span, stormWindow))
	return peak, mean, span
}

// stormFactor is how much more than the mean rate of reconnect attempts
// a 100 ms window may hold before the storm test calls it a herd.
const stormFactor = 4

func TestPeakAndMean(t *testing.T) {
	drop := time.Now()
	// 10 attempts 10 ms apart from the drop, then one at 1.09 s: the first
	// 100 ms hold 10; the mean over 1.09 s is about 1 per window.
	var at []time.Time
	for i := range 10 {
		at = append(at, drop.Add(time.Duration(i)*10*time.Millisecond))
	}
	at = append(at, drop.Add(1090*time.Millisecond))
	peak, mean, _ := peakAndMean(drop, at)
	if peak != 10 || mean < 1.0 || mean > 1.01 {
		t.Errorf("peak %d mean %.3f, want 10 and 1.0", peak, mean)
	}
	// Everyone waits 500 ms, then comes at once: a storm, whatever the
	// span of the attempts themselves.
	var herd []time.Time
	for i := range 100 {
		herd = append(herd, drop.Add(500*time.Millisecond+time.Duration(i)*time.Microsecond))
	}
	if peak, mean, _ := peakAndMean(drop, herd); float64(peak) <= stormFactor*mean {
		t.Errorf("a herd after a fixed delay: peak %d mean %.1f passes the %vx criterion", peak, mean, stormFactor)
	}
}
