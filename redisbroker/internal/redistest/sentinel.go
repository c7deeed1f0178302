package redistest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"testing"
	"time"
)

// SentinelDownAfter is the sentinels' down-after-milliseconds: a master
// that answers no sentinel for this long is failed over, typically a few
// seconds later.
const SentinelDownAfter = time.Second

// sentinelMaster is the name under which the sentinels monitor the master.
const sentinelMaster = "redistest"

// Sentinel is a master, its replicas and the sentinels that monitor them,
// all redis-server processes on 127.0.0.1 owned by a test and stopped by
// t.Cleanup.
type Sentinel struct {
	data      []*Server // the first master, then the replicas
	sentinels []*Server
}

// StartSentinel starts a master with replicas replicas and sentinels
// sentinels (redis-server --sentinel) that monitor it with a quorum of a
// majority of them, and returns once the replicas are in sync and every
// sentinel sees the master, the replicas and the other sentinels, so
// that a failover can happen. A failover needs a replica at least.
func StartSentinel(t testing.TB, replicas, sentinels int) *Sentinel {
	t.Helper()
	if replicas < 0 || sentinels < 1 {
		t.Fatalf("redistest: StartSentinel(%d, %d): need no negative replica count and a sentinel or more", replicas, sentinels)
	}
	s := &Sentinel{}
	args := []string{"--repl-diskless-sync-delay", "0"} // replicas sync at once, not 5 s later
	master := startWith(t, t.TempDir(), freePort, "", args...)
	s.data = append(s.data, master)
	var ports []int
	for range replicas {
		r := startWith(t, t.TempDir(), freePort, "",
			append(slices.Clone(args), "--replicaof", "127.0.0.1", strconv.Itoa(master.Port()))...)
		s.data = append(s.data, r)
		ports = append(ports, r.Port())
	}
	deadline := time.Now().Add(setupTimeout)
	for {
		err := replicasOnline(master.Port(), ports)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: replicas not in sync within %v: %v", setupTimeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conf := fmt.Sprintf(`sentinel monitor %[1]s 127.0.0.1 %[2]d %[3]d
sentinel down-after-milliseconds %[1]s %[4]d
sentinel failover-timeout %[1]s 5000
sentinel parallel-syncs %[1]s 1
`, sentinelMaster, master.Port(), sentinels/2+1, SentinelDownAfter.Milliseconds())
	for range sentinels {
		dir := t.TempDir()
		file := filepath.Join(dir, "sentinel.conf") // the sentinel rewrites it: its state
		if err := os.WriteFile(file, []byte(conf), 0o600); err != nil {
			t.Fatalf("redistest: %v", err)
		}
		s.sentinels = append(s.sentinels, startWith(t, dir, freePort, file, "--sentinel"))
	}
	s.WaitHealthy(t, setupTimeout)
	return s
}

// MasterName returns the name the sentinels monitor the master by: what
// redis.FailoverOptions.MasterName wants.
func (s *Sentinel) MasterName() string { return sentinelMaster }

// SentinelAddrs returns the host:port of every sentinel: what
// redis.FailoverOptions.SentinelAddrs wants.
func (s *Sentinel) SentinelAddrs() []string {
	a := make([]string, len(s.sentinels))
	for i, n := range s.sentinels {
		a[i] = n.Addr()
	}
	return a
}

// Sentinels returns the sentinel processes.
func (s *Sentinel) Sentinels() []*Server { return slices.Clone(s.sentinels) }

// Nodes returns the data nodes: the first master, then the replicas, in
// start order, whatever their role now.
func (s *Sentinel) Nodes() []*Server { return slices.Clone(s.data) }

// Master returns the current master as the running sentinels that answer
// agree (SENTINEL get-master-addr-by-name). Between the kill of the master
// and its failover, that is the killed server.
func (s *Sentinel) Master(t testing.TB) *Server {
	t.Helper()
	deadline := time.Now().Add(queryTimeout)
	for {
		m, err := s.agreedMaster(false)
		if err == nil {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: sentinels do not agree on a master within %v: %v", queryTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitFailover waits up to timeout until every running sentinel that
// answers names another master than old (killed or paused), is done with
// the failover, and that master, running, reports role:master; it returns
// that master.
func (s *Sentinel) WaitFailover(t testing.TB, old *Server, timeout time.Duration) *Server {
	t.Helper()
	if !slices.Contains(s.data, old) {
		t.Fatalf("redistest: %s is not a data node of this sentinel setup", old.Addr())
	}
	deadline := time.Now().Add(timeout)
	for {
		m, err := s.agreedMaster(true)
		if err == nil && m == old {
			err = fmt.Errorf("the master is still %s", old.Addr())
		}
		if err == nil {
			var inf map[string]string
			if inf, err = info(m.Addr(), "replication"); err == nil && inf["role"] != "master" {
				err = fmt.Errorf("%s: role:%s", m.Addr(), inf["role"])
			}
		}
		if err == nil {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: no failover from %s within %v: %v", old.Addr(), timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitHealthy waits up to timeout until every process is running, every
// replica is in sync with the master, and every sentinel agrees on that
// master, sees its replicas up, knows the other sentinels and finds the
// quorum reachable (SENTINEL CKQUORUM). StartSentinel does this; call it
// again after restarting a killed node.
func (s *Sentinel) WaitHealthy(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := s.healthy()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: sentinel setup not healthy within %v: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *Sentinel) healthy() error {
	for _, n := range append(slices.Clone(s.data), s.sentinels...) {
		if !n.Running() {
			return fmt.Errorf("%s is not running", n.Addr())
		}
	}
	m, err := s.agreedMaster(true)
	if err != nil {
		return err
	}
	var want []int // the replicas' ports
	for _, n := range s.data {
		if n != m {
			want = append(want, n.Port())
		}
	}
	if err := replicasOnline(m.Port(), want); err != nil {
		return err
	}
	for _, sn := range s.sentinels {
		v, err := do(sn.Addr(), "SENTINEL", "REPLICAS", sentinelMaster)
		if err != nil {
			return fmt.Errorf("sentinel %s: %v", sn.Addr(), err)
		}
		var got []int
		for _, r := range asList(v) {
			p := pairs(r)
			if p["flags"] != "slave" || p["master-link-status"] != "ok" || p["master-port"] != strconv.Itoa(m.Port()) {
				return fmt.Errorf("sentinel %s sees replica %s: flags %s, master-link-status %s, master-port %s",
					sn.Addr(), p["port"], p["flags"], p["master-link-status"], p["master-port"])
			}
			port, _ := strconv.Atoi(p["port"])
			got = append(got, port)
		}
		sort.Ints(got)
		sort.Ints(want)
		if !slices.Equal(got, want) {
			return fmt.Errorf("sentinel %s sees replicas %v, want %v", sn.Addr(), got, want)
		}
		v, err = do(sn.Addr(), "SENTINEL", "SENTINELS", sentinelMaster)
		if err != nil {
			return fmt.Errorf("sentinel %s: %v", sn.Addr(), err)
		}
		others := asList(v)
		for _, o := range others {
			if p := pairs(o); p["flags"] != "sentinel" {
				return fmt.Errorf("sentinel %s sees sentinel %s: flags %s", sn.Addr(), p["port"], p["flags"])
			}
		}
		if len(others) != len(s.sentinels)-1 {
			return fmt.Errorf("sentinel %s knows %d other sentinels, want %d", sn.Addr(), len(others), len(s.sentinels)-1)
		}
		if _, err := do(sn.Addr(), "SENTINEL", "CKQUORUM", sentinelMaster); err != nil {
			return fmt.Errorf("sentinel %s: CKQUORUM: %v", sn.Addr(), err)
		}
	}
	return nil
}

// agreedMaster asks the running sentinels for the master's address and
// returns the data node there if they agree. With settled, each must also
// be done with any failover (flags of SENTINEL MASTER: just "master").
func (s *Sentinel) agreedMaster(settled bool) (*Server, error) {
	agreed := ""
	for _, sn := range s.sentinels {
		if !sn.Running() {
			continue
		}
		v, err := do(sn.Addr(), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinelMaster)
		if err != nil {
			continue // paused, say
		}
		a := asList(v)
		if len(a) != 2 {
			return nil, fmt.Errorf("sentinel %s: get-master-addr-by-name answered %v", sn.Addr(), v)
		}
		host, _ := a[0].(string)
		port, _ := a[1].(string)
		addr := net.JoinHostPort(host, port)
		if agreed == "" {
			agreed = addr
		} else if addr != agreed {
			return nil, fmt.Errorf("sentinels disagree: %s, %s", agreed, addr)
		}
		if settled {
			v, err := do(sn.Addr(), "SENTINEL", "MASTER", sentinelMaster)
			if err != nil {
				return nil, fmt.Errorf("sentinel %s: %v", sn.Addr(), err)
			}
			if f := pairs(v)["flags"]; f != "master" {
				return nil, fmt.Errorf("sentinel %s: master %s flags %s", sn.Addr(), addr, f)
			}
		}
	}
	if agreed == "" {
		return nil, errors.New("no running sentinel answers")
	}
	for _, n := range s.data {
		if n.Addr() == agreed {
			return n, nil
		}
	}
	return nil, fmt.Errorf("the sentinels' master %s is none of the data nodes", agreed)
}

// asList returns an array reply's elements.
func asList(v any) []any {
	a, _ := v.([]any)
	return a
}
