package tether

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// Backoff says how long a [Client] waits between connection attempts.
// Zero fields take the defaults: full jitter over 500 ms · 2^attempt,
// capped at 30 s (or at Base, if that is longer), retrying forever, reset
// after 10 s of a healthy conn.
//
// Jitter is what keeps a fleet of clients dropped at once (a server
// restart) from coming back at once: with full jitter, their attempts
// spread evenly over the whole window instead of arriving as a wave.
type Backoff struct {
	// Base is the ceiling of the first delay. Default 500 ms.
	Base time.Duration
	// Max caps every delay. Default 30 s, or Base if that is longer.
	Max time.Duration
	// Factor multiplies the ceiling at each attempt. Default 2; at least 1.
	Factor float64
	// Jitter is how a delay is drawn under its ceiling. Default FullJitter.
	Jitter Jitter
	// MaxRetries is how many attempts in a row may fail before the client
	// gives up and closes, or, with Quiet, pauses; 0 retries forever. With
	// [WithFallbackURLs], an attempt is one round through every URL.
	MaxRetries int
	// Quiet, with MaxRetries, turns giving up into a pause: after
	// MaxRetries failed attempts in a row the client waits Quiet, still
	// Reconnecting, then starts another round as from its first failure
	// (the next attempt comes Quiet after the last). A server that is down
	// for long sees a few attempts per client per Quiet, not a steady
	// trickle at Max. 0, the default, gives up.
	Quiet time.Duration
	// StableAfter is how long a conn must stay up before the attempt count
	// returns to zero, so that a server that accepts and then drops every
	// conn at once is not hammered at the base delay. Default 10 s.
	StableAfter time.Duration
}

// Jitter is how [Backoff] draws a delay below its ceiling
// c = min(Max, Base·Factor^attempt).
type Jitter int

const (
	// FullJitter draws uniformly from [0, c]: the least synchronised and,
	// for a fleet, the fewest attempts in total. The default.
	FullJitter Jitter = iota
	// EqualJitter draws uniformly from [c/2, c]: never sooner than half the
	// ceiling, for servers that need a minimum pause.
	EqualJitter
	// DecorrelatedJitter draws each delay uniformly from [Base, 3·previous]
	// (the first from [Base, 3·Base]), capped at Max; Factor is not used.
	// It never waits less than Base.
	DecorrelatedJitter
	// NoJitter waits exactly c: deterministic, for tests and for a single
	// client. Do not use it for fleets.
	NoJitter
)

func (j Jitter) String() string {
	switch j {
	case FullJitter:
		return "FullJitter"
	case EqualJitter:
		return "EqualJitter"
	case DecorrelatedJitter:
		return "DecorrelatedJitter"
	case NoJitter:
		return "NoJitter"
	}
	return fmt.Sprintf("Jitter(%d)", int(j))
}

// The defaults of a zero Backoff.
const (
	defaultBackoffBase   = 500 * time.Millisecond
	defaultBackoffMax    = 30 * time.Second
	defaultBackoffFactor = 2
	defaultStableAfter   = 10 * time.Second
)

// withDefaults fills the zero fields.
func (b Backoff) withDefaults() Backoff {
	if b.Base == 0 {
		b.Base = defaultBackoffBase
	}
	if b.Max == 0 {
		b.Max = max(defaultBackoffMax, b.Base)
	}
	if b.Factor == 0 {
		b.Factor = defaultBackoffFactor
	}
	if b.StableAfter == 0 {
		b.StableAfter = defaultStableAfter
	}
	return b
}

func (b Backoff) validate() error {
	b = b.withDefaults()
	switch {
	case b.Base < 0 || b.Max < 0 || b.StableAfter < 0:
		return fmt.Errorf("%w: backoff durations (base %v, max %v, stable after %v) must not be negative", errInvalidOption, b.Base, b.Max, b.StableAfter)
	case b.Base > b.Max:
		return fmt.Errorf("%w: backoff base %v exceeds its max %v", errInvalidOption, b.Base, b.Max)
	case b.Factor < 1 || math.IsNaN(b.Factor) || math.IsInf(b.Factor, 0):
		return fmt.Errorf("%w: backoff factor %v must be a number of at least 1", errInvalidOption, b.Factor)
	case b.Jitter < FullJitter || b.Jitter > NoJitter:
		return fmt.Errorf("%w: unknown %v", errInvalidOption, b.Jitter)
	case b.MaxRetries < 0:
		return fmt.Errorf("%w: backoff max retries %d must not be negative", errInvalidOption, b.MaxRetries)
	case b.Quiet < 0:
		return fmt.Errorf("%w: backoff quiet %v must not be negative", errInvalidOption, b.Quiet)
	}
	return nil
}

// Ceiling returns min(Max, Base·Factor^attempt), the longest delay before
// attempt (counted from 0).
func (b Backoff) Ceiling(attempt int) time.Duration {
	b = b.withDefaults()
	attempt = max(attempt, 0)
	// In floating point, so that a large attempt saturates at Max instead
	// of overflowing.
	c := float64(b.Base) * math.Pow(b.Factor, float64(attempt))
	if c >= float64(b.Max) || math.IsInf(c, 0) || math.IsNaN(c) {
		return b.Max
	}
	return time.Duration(c)
}

// Delay returns how long to wait before attempt (counted from 0), drawn
// by the Jitter mode below [Backoff.Ceiling](attempt). It keeps no state,
// so one Backoff may serve any number of clients. DecorrelatedJitter
// ignores the ceiling: since its every draw depends on the previous one,
// Delay runs that recurrence from the first attempt (up to 256 steps, by
// when it has settled for any Max/Base below 10^10), so that the delay
// has the distribution the recurrence gives at that attempt.
func (b Backoff) Delay(attempt int) time.Duration {
	b = b.withDefaults()
	attempt = max(attempt, 0)
	switch b.Jitter {
	case EqualJitter:
		c := b.Ceiling(attempt)
		return c/2 + uniform(c-c/2)
	case DecorrelatedJitter:
		d := b.Base
		// One step for attempt 0 too, so that even first delays differ.
		for range min(attempt, maxDecorrelatedSteps) + 1 {
			three := time.Duration(math.MaxInt64)
			if d <= math.MaxInt64/3 {
				three = 3 * d
			}
			d = min(b.Max, b.Base+uniform(three-b.Base))
		}
		return d
	case NoJitter:
		return b.Ceiling(attempt)
	}
	return uniform(b.Ceiling(attempt))
}

// maxDecorrelatedSteps bounds the work of one DecorrelatedJitter Delay.
// Each step grows the delay by about 10 % on average.
const maxDecorrelatedSteps = 256

// uniform draws from [0, d].
func uniform(d time.Duration) time.Duration {
	switch {
	case d <= 0:
		return 0
	case d == math.MaxInt64:
		return rand.N(d) // d+1 would overflow; the one value lost is moot
	}
	return rand.N(d + 1)
}
