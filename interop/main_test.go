package interop_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any test leaves a goroutine behind: every hub,
// HTTP server, gorilla conn, tether.Client and Node process a test starts
// must be gone when it ends.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
