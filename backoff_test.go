package tether

import (
	"errors"
	"math"
	"testing"
	"time"
)

// The statistical tests below draw boSamples delays and check bounds that
// the draws miss with probability far below 1e-9: every tolerance is more
// than 10 standard deviations wide.
const boSamples = 20000

// boDraw returns n delays of b for attempt.
func boDraw(b Backoff, attempt, n int) []time.Duration {
	ds := make([]time.Duration, n)
	for i := range ds {
		ds[i] = b.Delay(attempt)
	}
	return ds
}

// boMean returns the mean of ds in nanoseconds.
func boMean(ds []time.Duration) float64 {
	var sum float64
	for _, d := range ds {
		sum += float64(d)
	}
	return sum / float64(len(ds))
}

// boDistinct returns how many distinct values ds holds.
func boDistinct(ds []time.Duration) int {
	seen := make(map[time.Duration]struct{}, len(ds))
	for _, d := range ds {
		seen[d] = struct{}{}
	}
	return len(seen)
}

// boCheckWithin fails t unless every draw lies in [lo, hi].
func boCheckWithin(t *testing.T, ds []time.Duration, lo, hi time.Duration) {
	t.Helper()
	for i, d := range ds {
		if d < lo || d > hi {
			t.Fatalf("draw %d = %v, outside [%v, %v]", i, d, lo, hi)
		}
	}
}

// boCheckUniform fails t unless the draws, all in [lo, hi], spread evenly
// over it: each of 10 equal buckets holds 7 % to 13 % of them (the
// expected 10 % ± more than 14 standard deviations), and the extreme draws
// come within 1 % of each end.
func boCheckUniform(t *testing.T, ds []time.Duration, lo, hi time.Duration) {
	t.Helper()
	const buckets = 10
	var counts [buckets]int
	width := float64(hi - lo)
	minD, maxD := hi, lo
	for _, d := range ds {
		i := min(int(float64(d-lo)/width*buckets), buckets-1)
		counts[i]++
		minD, maxD = min(minD, d), max(maxD, d)
	}
	n := float64(len(ds))
	for i, c := range counts {
		if f := float64(c) / n; f < 0.07 || f > 0.13 {
			t.Errorf("bucket %d of [%v, %v] holds %.2f %% of draws, want 7 %% to 13 %% (counts %v)", i, lo, hi, 100*f, counts)
		}
	}
	if slack := (hi - lo) / 100; minD > lo+slack || maxD < hi-slack {
		t.Errorf("draws span [%v, %v], want close to [%v, %v]", minD, maxD, lo, hi)
	}
}

// boCheckMean fails t unless the mean of ds is within rel of want.
func boCheckMean(t *testing.T, ds []time.Duration, want time.Duration, rel float64) {
	t.Helper()
	if m := boMean(ds); math.Abs(m-float64(want)) > rel*float64(want) {
		t.Errorf("mean delay %v, want %v ± %.0f %%", time.Duration(m), want, 100*rel)
	}
}

func TestBackoffCeiling(t *testing.T) {
	const (
		ms = time.Millisecond
		s  = time.Second
	)
	type step struct {
		attempt int
		want    time.Duration
	}
	tests := []struct {
		name  string
		b     Backoff
		steps []step
	}{
		{"defaults", Backoff{}, []step{
			{0, 500 * ms}, {1, 1 * s}, {2, 2 * s}, {3, 4 * s}, {4, 8 * s},
			{5, 16 * s}, {6, 30 * s}, {7, 30 * s}, {62, 30 * s},
			{-1, 500 * ms}, {math.MinInt, 500 * ms},
			{1000, 30 * s}, {math.MaxInt, 30 * s},
		}},
		{"custom base, max and factor", Backoff{Base: 100 * ms, Max: 1 * s, Factor: 3}, []step{
			{0, 100 * ms}, {1, 300 * ms}, {2, 900 * ms}, {3, 1 * s}, {4, 1 * s},
			{-5, 100 * ms}, {1000, 1 * s}, {math.MaxInt, 1 * s},
		}},
		{"only base set", Backoff{Base: 1 * s}, []step{
			{0, 1 * s}, {1, 2 * s}, {4, 16 * s}, {5, 30 * s}, {math.MaxInt, 30 * s},
		}},
		{"factor 1 is constant", Backoff{Base: 2 * s, Max: time.Minute, Factor: 1}, []step{
			{0, 2 * s}, {1, 2 * s}, {10, 2 * s}, {1000, 2 * s}, {math.MaxInt, 2 * s}, {-1, 2 * s},
		}},
		{"fractional factor", Backoff{Base: 1 * s, Max: 10 * s, Factor: 1.5}, []step{
			{0, 1 * s}, {1, 1500 * ms}, {2, 2250 * ms}, {3, 3375 * ms},
			{4, 5062500 * time.Microsecond}, {5, 7593750 * time.Microsecond},
			{6, 10 * s}, {1000, 10 * s},
		}},
		{"base equals max", Backoff{Base: 3 * s, Max: 3 * s}, []step{
			{0, 3 * s}, {1, 3 * s}, {math.MaxInt, 3 * s},
		}},
		// 2^62 ns fits an int64; 2^63 does not, and must saturate.
		{"max near the int64 limit", Backoff{Base: 1, Max: math.MaxInt64}, []step{
			{0, 1}, {10, 1024}, {62, 1 << 62}, {63, math.MaxInt64},
			{64, math.MaxInt64}, {1000, math.MaxInt64}, {math.MaxInt, math.MaxInt64},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nj := tt.b
			nj.Jitter = NoJitter
			for _, st := range tt.steps {
				if got := tt.b.Ceiling(st.attempt); got != st.want {
					t.Errorf("Ceiling(%d) = %v, want %v", st.attempt, got, st.want)
				}
				if got := nj.Delay(st.attempt); got != st.want {
					t.Errorf("Delay(%d) with NoJitter = %v, want %v", st.attempt, got, st.want)
				}
			}
		})
	}
}

// The ceiling never shrinks as attempts grow, and stays within [Base, Max].
func TestBackoffCeilingMonotonic(t *testing.T) {
	for _, b := range []Backoff{
		{},
		{Base: 100 * time.Millisecond, Max: time.Second, Factor: 3},
		{Base: time.Millisecond, Max: time.Hour, Factor: 1.1},
		{Base: 1, Max: math.MaxInt64, Factor: 1.7},
	} {
		d := b.withDefaults()
		prev := time.Duration(0)
		for a := range 2000 {
			c := b.Ceiling(a)
			if c < prev || c < d.Base || c > d.Max {
				t.Fatalf("%+v: Ceiling(%d) = %v after %v, want non-decreasing within [%v, %v]", b, a, c, prev, d.Base, d.Max)
			}
			prev = c
		}
		if prev != d.Max {
			t.Errorf("%+v: Ceiling(1999) = %v, want it saturated at %v", b, prev, d.Max)
		}
	}
}

func TestBackoffFullJitter(t *testing.T) {
	tests := []struct {
		name    string
		b       Backoff
		attempt int
	}{
		{"zero value defaults to full jitter", Backoff{}, 0},
		{"attempt 3", Backoff{Jitter: FullJitter}, 3},
		{"saturated", Backoff{Jitter: FullJitter}, 10},
		{"huge attempt", Backoff{Jitter: FullJitter}, math.MaxInt},
		{"custom", Backoff{Base: 100 * time.Millisecond, Max: time.Second, Factor: 3, Jitter: FullJitter}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.b.Ceiling(tt.attempt)
			ds := boDraw(tt.b, tt.attempt, boSamples)
			boCheckWithin(t, ds, 0, c)
			// The mean of U[0, c] over 20,000 draws has a standard
			// deviation of 0.2 % of c: ±5 % of c/2 is 12 of them.
			boCheckMean(t, ds, c/2, 0.05)
			boCheckUniform(t, ds, 0, c)
			if n := boDistinct(ds); n < len(ds)/2 {
				t.Errorf("only %d distinct delays in %d draws", n, len(ds))
			}
		})
	}
}

func TestBackoffEqualJitter(t *testing.T) {
	for _, attempt := range []int{0, 2, 10, math.MaxInt} {
		b := Backoff{Jitter: EqualJitter}
		c := b.Ceiling(attempt)
		ds := boDraw(b, attempt, boSamples)
		boCheckWithin(t, ds, c/2, c)
		// Standard deviation of the mean: 0.1 % of c; tolerance 1.5 % of c.
		boCheckMean(t, ds, 3*c/4, 0.02)
		boCheckUniform(t, ds, c/2, c)
		if n := boDistinct(ds); n < len(ds)/2 {
			t.Errorf("attempt %d: only %d distinct delays in %d draws", attempt, n, len(ds))
		}
	}
}

// Tiny ceilings show that both ends of each range can be drawn. Missing
// any one of four values in 1,000 draws has probability below 1e-120.
func TestBackoffJitterClosedRange(t *testing.T) {
	tests := []struct {
		name string
		b    Backoff
		want []time.Duration
	}{
		{"full", Backoff{Base: 3, Max: 3, Jitter: FullJitter}, []time.Duration{0, 1, 2, 3}},
		{"equal", Backoff{Base: 4, Max: 4, Jitter: EqualJitter}, []time.Duration{2, 3, 4}},
		{"decorrelated", Backoff{Base: 1, Max: 100, Jitter: DecorrelatedJitter}, []time.Duration{1, 2, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen := map[time.Duration]int{}
			for _, d := range boDraw(tt.b, 0, 1000) {
				seen[d]++
			}
			if len(seen) != len(tt.want) {
				t.Errorf("drew %v, want exactly the values %v", seen, tt.want)
			}
			for _, w := range tt.want {
				if seen[w] == 0 {
					t.Errorf("never drew %v in 1000 draws (drew %v)", w, seen)
				}
			}
		})
	}
}

func TestBackoffDecorrelatedJitter(t *testing.T) {
	b := Backoff{Jitter: DecorrelatedJitter} // base 500 ms, max 30 s
	base, maxD := defaultBackoffBase, defaultBackoffMax

	t.Run("within base and max", func(t *testing.T) {
		for _, attempt := range []int{math.MinInt, -1, 0, 1, 2, 5, 10, 64, 1000, math.MaxInt} {
			boCheckWithin(t, boDraw(b, attempt, 2000), base, maxD)
		}
	})

	t.Run("first attempt", func(t *testing.T) {
		// Factor is not used: a large one changes nothing.
		for _, b := range []Backoff{b, {Factor: 10, Jitter: DecorrelatedJitter}} {
			for _, attempt := range []int{0, -1} {
				ds := boDraw(b, attempt, boSamples)
				boCheckWithin(t, ds, base, 3*base)
				// U[B, 3B]: standard deviation of the mean 0.2 % of B.
				boCheckMean(t, ds, 2*base, 0.05)
				boCheckUniform(t, ds, base, 3*base)
				if n := boDistinct(ds); n < len(ds)/2 {
					t.Errorf("only %d distinct delays in %d draws", n, len(ds))
				}
			}
		}
	})

	t.Run("second attempt grows past 3 base", func(t *testing.T) {
		// The second delay is drawn from [B, 3·first], so up to 9B; it
		// exceeds 3B with probability 1 - ln(4)/3, about 0.54.
		ds := boDraw(b, 1, boSamples)
		boCheckWithin(t, ds, base, 9*base)
		above := 0
		for _, d := range ds {
			if d > 3*base {
				above++
			}
		}
		if f := float64(above) / float64(len(ds)); f < 0.1 {
			t.Errorf("%.2f %% of second delays exceed 3·base, want at least 10 %%", 100*f)
		}
	})

	t.Run("large attempts", func(t *testing.T) {
		mean0 := boMean(boDraw(b, 0, boSamples))
		for _, attempt := range []int{10, 64, 1000, math.MaxInt} {
			ds := boDraw(b, attempt, boSamples)
			// The recurrence keeps wandering below Max: about a third of
			// the draws sit at Max, about half below Max/2. The bounds
			// below are over 30 standard deviations from those.
			atMax, low := 0, 0
			for _, d := range ds {
				switch {
				case d == maxD:
					atMax++
				case d < maxD/2:
					low++
				}
			}
			n := float64(len(ds))
			if f := float64(atMax) / n; f < 0.15 || f > 0.6 {
				t.Errorf("attempt %d: %.2f %% of delays at max, want 15 %% to 60 %%", attempt, 100*f)
			}
			if f := float64(low) / n; f < 0.2 {
				t.Errorf("attempt %d: %.2f %% of delays below max/2, want at least 20 %%", attempt, 100*f)
			}
			if m := boMean(ds); m < 4*mean0 {
				t.Errorf("attempt %d: mean delay %v, want over 4 times the first's %v", attempt, time.Duration(m), time.Duration(mean0))
			}
			if k := boDistinct(ds); k < len(ds)/4 {
				t.Errorf("attempt %d: only %d distinct delays in %d draws", attempt, k, len(ds))
			}
		}
	})

	t.Run("base equals max", func(t *testing.T) {
		b := Backoff{Base: time.Second, Max: time.Second, Jitter: DecorrelatedJitter}
		for _, attempt := range []int{0, 1, 100} {
			boCheckWithin(t, boDraw(b, attempt, 100), time.Second, time.Second)
		}
	})
}

func TestBackoffValidate(t *testing.T) {
	valid := []Backoff{
		{},
		{Base: time.Second, Max: time.Minute, Factor: 1.5, Jitter: EqualJitter, MaxRetries: 5, StableAfter: time.Minute},
		{Base: time.Second, Max: time.Second, Factor: 1},
		{Base: time.Second}, // max defaults to 30 s
		{Base: time.Minute}, // max defaults to the base
		{Jitter: FullJitter},
		{Jitter: EqualJitter},
		{Jitter: DecorrelatedJitter},
		{Jitter: NoJitter},
		{MaxRetries: 1},
		{Base: 1, Max: math.MaxInt64, Factor: math.MaxFloat64},
	}
	for _, b := range valid {
		if err := b.validate(); err != nil {
			t.Errorf("%+v: validate() = %v, want nil", b, err)
		}
	}

	invalid := []struct {
		name string
		b    Backoff
	}{
		{"negative base", Backoff{Base: -time.Second}},
		{"negative max", Backoff{Max: -1}},
		{"negative stable after", Backoff{StableAfter: -time.Second}},
		{"base above max", Backoff{Base: 2 * time.Second, Max: time.Second}},
		{"factor below 1", Backoff{Factor: 0.5}},
		{"negative factor", Backoff{Factor: -2}},
		{"NaN factor", Backoff{Factor: math.NaN()}},
		{"+Inf factor", Backoff{Factor: math.Inf(1)}},
		{"-Inf factor", Backoff{Factor: math.Inf(-1)}},
		{"jitter above range", Backoff{Jitter: NoJitter + 1}},
		{"negative jitter", Backoff{Jitter: -1}},
		{"negative max retries", Backoff{MaxRetries: -1}},
		{"negative quiet", Backoff{MaxRetries: 3, Quiet: -time.Second}},
	}
	for _, tt := range invalid {
		err := tt.b.validate()
		if !errors.Is(err, errInvalidOption) {
			t.Errorf("%s: validate() = %v, want an error wrapping errInvalidOption", tt.name, err)
		}
	}
}

func TestJitterString(t *testing.T) {
	for j, want := range map[Jitter]string{
		FullJitter:         "FullJitter",
		EqualJitter:        "EqualJitter",
		DecorrelatedJitter: "DecorrelatedJitter",
		NoJitter:           "NoJitter",
		NoJitter + 1:       "Jitter(4)",
		-1:                 "Jitter(-1)",
	} {
		if got := j.String(); got != want {
			t.Errorf("Jitter(%d).String() = %q, want %q", int(j), got, want)
		}
	}
}

func TestBackoffExtremes(t *testing.T) {
	// A Max of MaxInt64 says "no cap": full jitter must not overflow, and
	// decorrelated jitter must not wrap back to Base.
	huge := Backoff{Base: 1 << 61, Max: math.MaxInt64}
	for range 100 {
		if d := huge.Delay(100); d < 0 {
			t.Fatalf("full jitter Delay(100) = %v", d)
		}
	}
	huge.Jitter = DecorrelatedJitter
	atBase := 0
	for range 1000 {
		d := huge.Delay(1)
		if d < huge.Base {
			t.Fatalf("decorrelated Delay(1) = %v, below Base", d)
		}
		if d == huge.Base {
			atBase++
		}
	}
	if atBase > 10 {
		t.Errorf("decorrelated Delay(1) returned exactly Base %d times in 1000: the step overflowed", atBase)
	}
	if got := (Backoff{Base: time.Minute}).Ceiling(5); got != time.Minute {
		t.Errorf("Backoff{Base: 1m}.Ceiling(5) = %v, want the base as the default max", got)
	}
}
