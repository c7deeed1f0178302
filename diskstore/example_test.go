package diskstore_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/tether-ws/tether"
	"github.com/tether-ws/tether/diskstore"
)

// A hub whose history and offline messages live in a file: after a
// restart, a topic has the same epoch and messages, so a client resumes
// where it left off instead of reloading.
func ExampleOpen() {
	dir, _ := os.MkdirTemp("", "tether")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "tether.db")
	ctx := context.Background()

	st, err := diskstore.Open(path, diskstore.WithHistory(1000, 10*time.Minute))
	if err != nil {
		fmt.Println(err)
		return
	}
	hub, err := tether.NewHub(tether.WithHistory(st.History()), tether.WithOfflineStore(st.Offline()))
	if err != nil {
		fmt.Println(err)
		return
	}
	hub.Publish("room", []byte(`"hello"`))
	hub.Publish("room", []byte(`"world"`))
	hub.SendToUser("ann", []byte(`"while you were away"`))
	// A client has processed "hello": its position.
	_, last, _, _ := st.History().Since(ctx, "room", tether.Position{})
	pos := tether.Position{Epoch: last.Epoch, Seq: 1}
	hub.Close()
	st.Close() // after the hub

	// The process restarts.
	st, err = diskstore.Open(path, diskstore.WithHistory(1000, 10*time.Minute))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer st.Close()
	entries, _, ok, _ := st.History().Since(ctx, "room", pos)
	fmt.Println("resume:", ok)
	for _, e := range entries {
		fmt.Println(e.Seq, string(e.Data))
	}
	msgs, _ := st.Offline().Take(ctx, "ann")
	fmt.Println(len(msgs), "message kept for ann")
	// Output:
	// resume: true
	// 2 "world"
	// 1 message kept for ann
}

// A hub whose users' inboxes are in the file: a direct message is kept
// until a client of the user acknowledges it, across a restart too, in
// the same epoch, so a client's position in it stays valid.
func ExampleStore_Inbox() {
	dir, _ := os.MkdirTemp("", "tether")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "tether.db")

	st, err := diskstore.Open(path)
	if err != nil {
		fmt.Println(err)
		return
	}
	hub, err := tether.NewHub(tether.WithHistory(st.History()), tether.WithInbox(st.Inbox()))
	if err != nil {
		fmt.Println(err)
		return
	}
	hub.SendToUser("ann", []byte(`"see you at 3"`)) // ann is away
	hub.Close()
	st.Close()

	// The process restarts.
	st, err = diskstore.Open(path)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer st.Close()
	epoch, pending, _ := st.Inbox().Pending(context.Background(), "ann")
	for _, e := range pending {
		fmt.Println(e.Seq, string(e.Data), epoch != "")
	}
	// Output:
	// 1 "see you at 3" true
}
