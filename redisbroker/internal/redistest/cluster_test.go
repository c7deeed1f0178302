package redistest

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// failoverBound is how long a failover may take in these tests: seconds
// usually, much more on a loaded machine.
const failoverBound = 30 * time.Second

// setAndWait writes key=val on addr and waits until a replica at least
// has it.
func setAndWait(t *testing.T, addr, key, val string) {
	t.Helper()
	c, err := dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.do("SET", key, val); err != nil {
		t.Fatalf("SET %s on %s: %v", key, addr, err)
	}
	v, err := c.do("WAIT", "1", "1500") // within cmdTimeout
	if err != nil || v != int64(1) {
		t.Fatalf("WAIT 1 on %s: %v, %v", addr, v, err)
	}
}

func get(t *testing.T, addr, key string) any {
	t.Helper()
	v, err := do(addr, "GET", key)
	if err != nil {
		t.Fatalf("GET %s on %s: %v", key, addr, err)
	}
	return v
}

func TestKeySlot(t *testing.T) {
	c := StartCluster(t, 1, 0)
	addr := c.Nodes()[0].Addr()
	for _, key := range []string{"", "a", "foo", "{user1000}.following", "{}x", "x{}", "a{b}c{d}", "{{b}}", "k9", "\xff\x00"} {
		v, err := do(addr, "CLUSTER", "KEYSLOT", key)
		if err != nil {
			t.Fatal(err)
		}
		if got := KeySlot(key); int64(got) != v {
			t.Errorf("KeySlot(%q) = %d, CLUSTER KEYSLOT says %v", key, got, v)
		}
	}
}

func TestClusterOneMaster(t *testing.T) {
	c := StartCluster(t, 1, 0)
	if len(c.Addrs()) != 1 || len(c.Masters(t)) != 1 || c.MasterFor(t, "k") != c.Nodes()[0] {
		t.Fatalf("addrs %v, masters %v", c.Addrs(), addrs(c.Masters(t)))
	}
	rc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	defer rc.Close()
	ctx := context.Background()
	for i := range 20 {
		k := "k" + strconv.Itoa(i)
		if err := rc.Set(ctx, k, i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if v, err := rc.Get(ctx, "k7").Result(); err != nil || v != "7" {
		t.Fatalf("GET k7: %q, %v", v, err)
	}
	if v := get(t, c.Nodes()[0].Addr(), "k7"); v != "7" {
		t.Fatalf("GET k7 on the node: %v", v)
	}
}

func TestClusterOneMasterOneReplica(t *testing.T) {
	c := StartCluster(t, 1, 1)
	m := c.Masters(t)
	if len(m) != 1 || m[0] != c.Nodes()[0] || c.ReplicaOf(t, m[0]) != c.Nodes()[1] {
		t.Fatalf("masters %v, nodes %v", addrs(m), c.Addrs())
	}
	setAndWait(t, m[0].Addr(), "k", "v")
}

func TestClusterFailover(t *testing.T) {
	c := StartCluster(t, 3, 1)
	if len(c.Nodes()) != 6 || len(c.Addrs()) != 6 {
		t.Fatalf("nodes %v", c.Addrs())
	}
	masters := c.Masters(t)
	if len(masters) != 3 {
		t.Fatalf("masters %v", addrs(masters))
	}
	// A key on each master, on its replica too.
	keys := map[*Server]string{}
	for i := 0; len(keys) < 3; i++ {
		k := "key" + strconv.Itoa(i)
		m := c.MasterFor(t, k)
		if !slices.Contains(masters, m) {
			t.Fatalf("MasterFor(%q) = %s, not a master", k, m.Addr())
		}
		if _, ok := keys[m]; !ok {
			keys[m] = k
			setAndWait(t, m.Addr(), k, "v-"+k)
		}
	}
	// The cluster, as go-redis sees it from Addrs.
	rc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	ctx := context.Background()
	for _, k := range keys {
		if v, err := rc.Get(ctx, k).Result(); err != nil || v != "v-"+k {
			t.Errorf("go-redis GET %s: %q, %v", k, v, err)
		}
	}
	rc.Close()

	old := masters[1]
	key := keys[old]
	replica := c.ReplicaOf(t, old)
	start := time.Now()
	old.Kill()
	nm := c.WaitFailover(t, old, failoverBound)
	t.Logf("failover of %s to %s in %v", old.Addr(), nm.Addr(), time.Since(start))
	if nm != replica {
		t.Fatalf("new master %s, want the replica %s", nm.Addr(), replica.Addr())
	}
	if v := get(t, nm.Addr(), key); v != "v-"+key {
		t.Fatalf("GET %s on the new master: %v", key, v)
	}
	if m := c.MasterFor(t, key); m != nm {
		t.Fatalf("MasterFor(%q) = %s, want %s", key, m.Addr(), nm.Addr())
	}
	if ms := c.Masters(t); len(ms) != 3 || slices.Contains(ms, old) || !slices.Contains(ms, nm) {
		t.Fatalf("masters after failover: %v", addrs(ms))
	}

	// The killed master comes back as the replica of the new one.
	old.Restart(t)
	c.WaitHealthy(t, failoverBound)
	if r := c.ReplicaOf(t, nm); r != old {
		t.Fatalf("replica of %s: %s, want %s", nm.Addr(), r.Addr(), old.Addr())
	}
}

func TestClusterPort(t *testing.T) {
	seen := map[int]bool{}
	for range 20 {
		p, err := clusterPort()
		if err != nil {
			t.Fatal(err)
		}
		if p < 1024 || p+busOffset > 65535 {
			t.Fatalf("port %d", p)
		}
		seen[p] = true
	}
	if len(seen) < 2 {
		t.Fatalf("always the same port: %v", seen)
	}
}

func addrs(ss []*Server) []string {
	a := make([]string, len(ss))
	for i, s := range ss {
		a[i] = s.Addr()
	}
	return a
}
