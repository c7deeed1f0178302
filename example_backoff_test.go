package tether_test

import (
	"fmt"
	"time"

	"github.com/tether-ws/tether"
)

// Without jitter, each delay doubles from Base until it reaches Max.
func ExampleBackoff_Delay() {
	b := tether.Backoff{
		Base:   500 * time.Millisecond,
		Max:    10 * time.Second,
		Jitter: tether.NoJitter,
	}
	for attempt := range 7 {
		fmt.Println(attempt, b.Delay(attempt))
	}
	// Output:
	// 0 500ms
	// 1 1s
	// 2 2s
	// 3 4s
	// 4 8s
	// 5 10s
	// 6 10s
}
