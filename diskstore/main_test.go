package diskstore_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-ws/tether/adapter"
	"github.com/tether-ws/tether/diskstore"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if path := os.Getenv(helperEnv); path != "" {
		os.Exit(runHelperServer(path))
	}
	goleak.VerifyTestMain(m)
}

// open opens a store in path, closed when the test ends.
func open(t testing.TB, path string, opts ...diskstore.Option) *diskstore.Store {
	t.Helper()
	st, err := diskstore.Open(path, opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return st
}

// tempPath is a path for a store file in a directory of the test's own.
func tempPath(t testing.TB) string {
	return filepath.Join(t.TempDir(), "tether.db")
}

// newHistory is a store's history with the bounds of
// adapter.NewMemoryHistory(messages, maxAge), in a file of its own.
func newHistory(t testing.TB, messages int, maxAge time.Duration, opts ...diskstore.Option) adapter.History {
	t.Helper()
	return open(t, tempPath(t), append([]diskstore.Option{diskstore.WithHistory(messages, maxAge)}, opts...)...).History()
}

// newOffline is a store's offline store with the bounds of
// adapter.NewMemoryOfflineStore(messages, bytes, maxAge, total).
func newOffline(t testing.TB, messages, bytes int, maxAge time.Duration, total int) adapter.OfflineStore {
	t.Helper()
	return open(t, tempPath(t), diskstore.WithOffline(messages, bytes, maxAge, total)).Offline()
}
