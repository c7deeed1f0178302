package diskstore_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-ws/tether/diskstore"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// TestOpenLocked checks that a file another holder has open is refused
// quickly, with an error that says why. bbolt's lock (flock) is per open
// file, so a second Open in the same process finds it as another process
// would.
func TestOpenLocked(t *testing.T) {
	path := tempPath(t)
	open(t, path)
	start := time.Now()
	_, err := diskstore.Open(path, diskstore.WithLockTimeout(200*time.Millisecond))
	took := time.Since(start)
	if err == nil || !errors.Is(err, berrors.ErrTimeout) || !strings.Contains(err.Error(), "locked by another process") {
		t.Fatalf("Open of a locked file: %v; want an error saying it is locked", err)
	}
	if took > 5*time.Second {
		t.Errorf("Open of a locked file took %v, with a lock timeout of 200 ms", took)
	}
	t.Logf("refused in %v: %v", took.Round(time.Millisecond), err)
}

// TestOpenNotAStore checks that Open refuses a file that is not a
// store's, and leaves it as it was.
func TestOpenNotAStore(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("not a database ", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := diskstore.Open(garbage); err == nil {
		t.Error("Open of a file of text: no error")
	}

	other := filepath.Join(dir, "other.db")
	db, err := bolt.Open(other, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucket([]byte("accounts"))
		return err
	})
	db.Close()
	if _, err := diskstore.Open(other); err == nil || !strings.Contains(err.Error(), "something else") {
		t.Errorf("Open of another application's bbolt file: %v; want it refused", err)
	}
	db, err = bolt.Open(other, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("meta")) != nil {
			t.Error("the refused file was written to")
		}
		return nil
	})

	if _, err := diskstore.Open(filepath.Join(dir, "no", "such", "dir", "x.db")); err == nil {
		t.Error("Open in a directory that does not exist: no error")
	}
}

// TestCloseTwice checks that a second Close is harmless.
func TestCloseTwice(t *testing.T) {
	st, err := diskstore.Open(tempPath(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
