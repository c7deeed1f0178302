package redistest

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestSentinelFailover(t *testing.T) {
	s := StartSentinel(t, 1, 3)
	if len(s.SentinelAddrs()) != 3 || len(s.Nodes()) != 2 || s.MasterName() == "" {
		t.Fatalf("sentinels %v, nodes %v, name %q", s.SentinelAddrs(), addrs(s.Nodes()), s.MasterName())
	}
	old, replica := s.Nodes()[0], s.Nodes()[1]
	if m := s.Master(t); m != old {
		t.Fatalf("master %s, want %s", m.Addr(), old.Addr())
	}
	setAndWait(t, old.Addr(), "k", "v")

	start := time.Now()
	old.Kill()
	nm := s.WaitFailover(t, old, failoverBound)
	t.Logf("failover of %s to %s in %v", old.Addr(), nm.Addr(), time.Since(start))
	if nm != replica {
		t.Fatalf("new master %s, want the replica %s", nm.Addr(), replica.Addr())
	}
	if v := get(t, nm.Addr(), "k"); v != "v" {
		t.Fatalf("GET k on the new master: %v", v)
	}
	if m := s.Master(t); m != nm {
		t.Fatalf("Master = %s, want %s", m.Addr(), nm.Addr())
	}

	// go-redis finds the new master through the sentinels.
	rc := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: s.MasterName(), SentinelAddrs: s.SentinelAddrs()})
	defer rc.Close()
	ctx := context.Background()
	if err := rc.Set(ctx, "k2", "v2", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if v := get(t, nm.Addr(), "k2"); v != "v2" {
		t.Fatalf("GET k2 on the new master: %v", v)
	}
}
