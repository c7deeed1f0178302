package redistest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ClusterNodeTimeout is the cluster-node-timeout of every cluster node: a
// master that answers nobody for about this long is failed over, some
// hundreds of milliseconds to a few seconds later.
const ClusterNodeTimeout = 1500 * time.Millisecond

// setupTimeout bounds how long a cluster or a sentinel setup may take to
// become ready, after its processes have started.
const setupTimeout = 60 * time.Second

// queryTimeout bounds how long Masters, MasterFor, ReplicaOf and
// Sentinel.Master wait for the nodes to agree.
const queryTimeout = 15 * time.Second

// numSlots is the number of hash slots of a Redis Cluster.
const numSlots = 16384

// busOffset is what Redis adds to a node's port for its cluster bus port.
const busOffset = 10000

// Cluster is a Redis Cluster owned by a test: redis-server processes in
// cluster mode on 127.0.0.1, each with its own directory, stopped by
// t.Cleanup.
type Cluster struct {
	nodes    []*Server
	masters  int
	replicas int // per master

	mu    sync.Mutex
	shard map[int]int // port -> a slot of the shard it last served as master
}

// StartCluster starts a Redis Cluster of masters masters with
// replicasPerMaster replicas each, and returns once every node reports
// cluster_state:ok, all nodes agree on who serves each of the 16384 slots,
// and every replica is in sync with its master, so that a master can fail
// over. Three masters or more are joined with redis-cli --cluster create;
// one or two (which redis-cli refuses) by hand. A cluster with one master
// cannot fail over: no other master can vote.
func StartCluster(t testing.TB, masters, replicasPerMaster int) *Cluster {
	t.Helper()
	if masters < 1 || replicasPerMaster < 0 {
		t.Fatalf("redistest: StartCluster(%d, %d): need a master or more and no negative replica count", masters, replicasPerMaster)
	}
	c := &Cluster{masters: masters, replicas: replicasPerMaster, shard: map[int]int{}}
	args := []string{
		"--cluster-enabled", "yes",
		"--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", strconv.Itoa(int(ClusterNodeTimeout / time.Millisecond)),
		"--cluster-replica-validity-factor", "0", // any replica may take over, however stale
		"--cluster-announce-ip", "127.0.0.1",
		"--repl-diskless-sync-delay", "0", // replicas sync at once, not 5 s later
	}
	for i := 0; i < masters*(1+replicasPerMaster); i++ {
		c.nodes = append(c.nodes, startWith(t, t.TempDir(), clusterPort, "", args...))
	}
	if masters >= 3 {
		c.createWithCLI(t)
	} else {
		c.createByHand(t)
	}
	c.WaitHealthy(t, setupTimeout)
	return c
}

// createWithCLI joins the nodes with redis-cli --cluster create.
func (c *Cluster) createWithCLI(t testing.TB) {
	t.Helper()
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("redistest: redis-cli is not on PATH (%v): install redis-tools (redis-server depends on it)", err)
	}
	args := append([]string{"--cluster", "create"}, c.Addrs()...)
	args = append(args, "--cluster-replicas", strconv.Itoa(c.replicas), "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, cli, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// createByHand assigns the slots to the first c.masters nodes, meets the
// nodes and makes the others replicas, replica k of master k%masters.
func (c *Cluster) createByHand(t testing.TB) {
	t.Helper()
	must := func(addr string, args ...string) {
		t.Helper()
		if _, err := do(addr, args...); err != nil {
			t.Fatalf("redistest: %s: %s: %v", addr, strings.Join(args, " "), err)
		}
	}
	ids := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		must(n.Addr(), "CLUSTER", "SET-CONFIG-EPOCH", strconv.Itoa(i+1))
		id, err := doString(n.Addr(), "CLUSTER", "MYID")
		if err != nil {
			t.Fatalf("redistest: %s: CLUSTER MYID: %v", n.Addr(), err)
		}
		ids[i] = id
	}
	for i := 0; i < c.masters; i++ {
		lo, hi := i*numSlots/c.masters, (i+1)*numSlots/c.masters-1
		must(c.nodes[i].Addr(), "CLUSTER", "ADDSLOTSRANGE", strconv.Itoa(lo), strconv.Itoa(hi))
	}
	for _, n := range c.nodes[1:] {
		must(c.nodes[0].Addr(), "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(n.Port()))
	}
	deadline := time.Now().Add(setupTimeout)
	for k, r := range c.nodes[c.masters:] {
		for {
			// Unknown node until the replica has heard of its master.
			_, err := do(r.Addr(), "CLUSTER", "REPLICATE", ids[k%c.masters])
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("redistest: %s: CLUSTER REPLICATE %s: %v", r.Addr(), ids[k%c.masters], err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// Addrs returns the host:port of every node, masters and replicas, killed
// or not: what redis.ClusterOptions.Addrs wants.
func (c *Cluster) Addrs() []string {
	a := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		a[i] = n.Addr()
	}
	return a
}

// Nodes returns every node, masters and replicas, in start order.
func (c *Cluster) Nodes() []*Server { return slices.Clone(c.nodes) }

// Masters returns the running masters that serve slots, ordered by the
// first slot they serve, as the running nodes agree.
func (c *Cluster) Masters(t testing.TB) []*Server {
	t.Helper()
	v := c.agreedView(t)
	var ms []*Server
	for _, n := range v.nodes {
		s := c.byPort(n.port)
		if s != nil && s.Running() && n.flags["master"] && len(n.slots) > 0 {
			ms = append(ms, s)
		}
	}
	sort.Slice(ms, func(i, j int) bool {
		return v.firstSlot(ms[i].port) < v.firstSlot(ms[j].port)
	})
	return ms
}

// MasterFor returns the master that serves the slot of key, as the
// running nodes agree. Between the kill of that master and its failover,
// that is the killed server.
func (c *Cluster) MasterFor(t testing.TB, key string) *Server {
	t.Helper()
	v := c.agreedView(t)
	slot := KeySlot(key)
	s := c.byPort(v.owner[slot])
	if s == nil {
		t.Fatalf("redistest: no node serves slot %d of key %q:\n%s", slot, key, v.text)
	}
	return s
}

// ReplicaOf returns a running replica of master (the one on the lowest
// port), as the running nodes agree; the test fails if it has none.
func (c *Cluster) ReplicaOf(t testing.TB, master *Server) *Server {
	t.Helper()
	v := c.agreedView(t)
	var id string
	for _, n := range v.nodes {
		if n.port == master.port {
			id = n.id
		}
	}
	var best *Server
	for _, n := range v.nodes {
		s := c.byPort(n.port)
		if id != "" && n.master == id && s != nil && s.Running() && (best == nil || s.port < best.port) {
			best = s
		}
	}
	if best == nil {
		t.Fatalf("redistest: %s has no running replica:\n%s", master.Addr(), v.text)
	}
	return best
}

// WaitHealthy waits up to timeout until every node is running, reports
// cluster_state:ok with all slots served, all nodes agree on the roles and
// the slots, every master has its replicas and every replica is in sync.
// StartCluster does this; call it again after restarting a killed node.
func (c *Cluster) WaitHealthy(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := c.fullyHealthy()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: cluster not healthy within %v: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitFailover waits up to timeout until the slots that old served (old
// was killed or paused) are served by another running master and the
// cluster is ok again, as every other running node sees it, and returns
// that new master: one of old's replicas.
func (c *Cluster) WaitFailover(t testing.TB, old *Server, timeout time.Duration) *Server {
	t.Helper()
	if c.byPort(old.port) != old {
		t.Fatalf("redistest: %s is not a node of this cluster", old.Addr())
	}
	c.mu.Lock()
	slot, ok := c.shard[old.port]
	c.mu.Unlock()
	if !ok {
		t.Fatalf("redistest: %s was never seen serving slots", old.Addr())
	}
	deadline := time.Now().Add(timeout)
	for {
		s, err := c.failedOver(old, slot)
		if err == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: slot %d of %s not failed over within %v: %v", slot, old.Addr(), timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// failedOver returns the new master of slot if the failover of old is
// complete.
func (c *Cluster) failedOver(old *Server, slot int) (*Server, error) {
	v, err := c.healthy(old, false)
	if err != nil {
		return nil, err
	}
	s := c.byPort(v.owner[slot])
	if s == nil || s == old {
		return nil, fmt.Errorf("slot %d still served by %d", slot, v.owner[slot])
	}
	inf, err := info(s.Addr(), "replication")
	if err != nil {
		return nil, err
	}
	if inf["role"] != "master" {
		return nil, fmt.Errorf("%s: role:%s", s.Addr(), inf["role"])
	}
	return s, nil
}

// fullyHealthy is WaitHealthy's test.
func (c *Cluster) fullyHealthy() error {
	for _, n := range c.nodes {
		if !n.Running() {
			return fmt.Errorf("%s is not running", n.Addr())
		}
	}
	v, err := c.healthy(nil, true)
	if err != nil {
		return err
	}
	replicas := map[string][]int{} // master id -> replica ports
	masters := 0
	for _, n := range v.nodes {
		if n.flags["master"] && len(n.slots) > 0 {
			masters++
		} else if n.flags["slave"] {
			replicas[n.master] = append(replicas[n.master], n.port)
		}
	}
	if masters != c.masters {
		return fmt.Errorf("%d masters serve slots, want %d:\n%s", masters, c.masters, v.text)
	}
	for _, n := range v.nodes {
		if !n.flags["master"] {
			continue
		}
		if got := len(replicas[n.id]); got != c.replicas {
			return fmt.Errorf("master %d has %d replicas, want %d:\n%s", n.port, got, c.replicas, v.text)
		}
		if err := replicasOnline(n.port, replicas[n.id]); err != nil {
			return err
		}
	}
	return nil
}

// replicasOnline checks that the master on port streams to each of the
// replicas and that they see their link up.
func replicasOnline(port int, replicas []int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	inf, err := info(addr, "replication")
	if err != nil {
		return err
	}
	online := map[int]bool{}
	for k, val := range inf {
		if n, ok := strings.CutPrefix(k, "slave"); !ok || n == "" || strings.Trim(n, "0123456789") != "" {
			continue // not slave0, slave1, ...
		}
		f := map[string]string{}
		for _, kv := range strings.Split(val, ",") {
			if a, b, ok := strings.Cut(kv, "="); ok {
				f[a] = b
			}
		}
		if p, err := strconv.Atoi(f["port"]); err == nil && f["state"] == "online" {
			online[p] = true
		}
	}
	for _, r := range replicas {
		if !online[r] {
			return fmt.Errorf("master %d: replica %d not online: %v", port, r, inf)
		}
		raddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(r))
		rinf, err := info(raddr, "replication")
		if err != nil {
			return err
		}
		if rinf["master_link_status"] != "up" || rinf["master_sync_in_progress"] != "0" || rinf["master_port"] != strconv.Itoa(port) {
			return fmt.Errorf("replica %d: master_port:%s master_link_status:%s master_sync_in_progress:%s",
				r, rinf["master_port"], rinf["master_link_status"], rinf["master_sync_in_progress"])
		}
	}
	return nil
}

// healthy checks that every running node but skip reports cluster_state:ok
// with every slot ok, and that their views agree, flag no running node
// (but skip) as failing, and give every slot to a running master. With
// strict, a node that does not answer is an error; without, it is left
// out (a paused node), but one node at least must answer.
func (c *Cluster) healthy(skip *Server, strict bool) (*view, error) {
	live := func(port int) bool {
		s := c.byPort(port)
		return s != nil && s != skip && s.Running()
	}
	var agreed *view
	for _, s := range c.nodes {
		if !live(s.port) {
			continue
		}
		ci, err := doString(s.Addr(), "CLUSTER", "INFO")
		if err != nil {
			if strict {
				return nil, fmt.Errorf("%s: %v", s.Addr(), err)
			}
			continue
		}
		f := fields(ci)
		if f["cluster_state"] != "ok" || f["cluster_slots_ok"] != strconv.Itoa(numSlots) {
			return nil, fmt.Errorf("%s: cluster_state:%s cluster_slots_ok:%s", s.Addr(), f["cluster_state"], f["cluster_slots_ok"])
		}
		v, err := c.viewOf(s, live)
		if err != nil {
			if strict {
				return nil, err
			}
			continue
		}
		for _, n := range v.nodes {
			if live(n.port) && (n.flags["fail"] || n.flags["fail?"] || n.flags["handshake"] || n.flags["noaddr"] || n.link != "connected") {
				return nil, fmt.Errorf("%s sees %d as %s %s:\n%s", s.Addr(), n.port, n.link, n.flagText, v.text)
			}
		}
		for slot, p := range v.owner {
			if !live(p) {
				return nil, fmt.Errorf("%s: slot %d served by %d, not running:\n%s", s.Addr(), slot, p, v.text)
			}
		}
		if agreed == nil {
			agreed = v
		} else if agreed.sig != v.sig {
			return nil, fmt.Errorf("views differ:\n%s\n%s", agreed.text, v.text)
		}
	}
	if agreed == nil {
		return nil, errors.New("no running node answers")
	}
	c.remember(agreed)
	return agreed, nil
}

// agreedView waits until the running nodes that answer agree on the
// roles and the slots, and returns that view.
func (c *Cluster) agreedView(t testing.TB) *view {
	t.Helper()
	live := func(port int) bool {
		s := c.byPort(port)
		return s != nil && s.Running()
	}
	deadline := time.Now().Add(queryTimeout)
	for {
		var agreed *view
		var err error
		for _, s := range c.nodes {
			if !s.Running() {
				continue
			}
			v, verr := c.viewOf(s, live)
			if verr != nil {
				continue // paused, say
			}
			if agreed == nil {
				agreed = v
			} else if agreed.sig != v.sig {
				err = fmt.Errorf("views differ:\n%s\n%s", agreed.text, v.text)
				break
			}
		}
		if agreed == nil && err == nil {
			err = errors.New("no running node answers")
		}
		if err == nil {
			c.remember(agreed)
			return agreed
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: cluster nodes do not agree within %v: %v", queryTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// remember notes which shard each master of v serves.
func (c *Cluster) remember(v *view) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range v.nodes {
		if len(n.slots) > 0 {
			c.shard[n.port] = n.slots[0][0]
		}
	}
}

func (c *Cluster) byPort(port int) *Server {
	for _, n := range c.nodes {
		if n.port == port {
			return n
		}
	}
	return nil
}

// view is one node's CLUSTER NODES.
type view struct {
	text  string
	nodes []clusterNode
	owner []int  // slot -> port of its master, 0 if none
	sig   string // roles and slots, comparable between nodes' views
}

func (v *view) firstSlot(port int) int {
	for _, n := range v.nodes {
		if n.port == port && len(n.slots) > 0 {
			return n.slots[0][0]
		}
	}
	return numSlots
}

// clusterNode is a line of CLUSTER NODES.
type clusterNode struct {
	id       string
	port     int
	flags    map[string]bool
	flagText string
	master   string // its master's id; "-" for a master
	link     string
	slots    [][2]int
}

// viewOf reads s's CLUSTER NODES. Its signature gives each live node's
// role, master and slots, and only the slots of the others (whose flags
// and roles the nodes may well see differently).
func (c *Cluster) viewOf(s *Server, live func(port int) bool) (*view, error) {
	text, err := doString(s.Addr(), "CLUSTER", "NODES")
	if err != nil {
		return nil, fmt.Errorf("%s: CLUSTER NODES: %v", s.Addr(), err)
	}
	nodes, err := parseClusterNodes(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", s.Addr(), err)
	}
	v := &view{text: text, nodes: nodes, owner: make([]int, numSlots)}
	portOf := map[string]int{}
	for _, n := range nodes {
		portOf[n.id] = n.port
	}
	var sig []string
	for _, n := range nodes {
		slots := make([]string, len(n.slots))
		for i, r := range n.slots {
			slots[i] = fmt.Sprintf("%d-%d", r[0], r[1])
			for slot := r[0]; slot <= r[1]; slot++ {
				v.owner[slot] = n.port
			}
		}
		line := fmt.Sprintf("%d %s", n.port, strings.Join(slots, ","))
		if live(n.port) {
			role := "slave"
			if n.flags["master"] {
				role = "master"
			}
			line += fmt.Sprintf(" %s of %d", role, portOf[n.master])
		}
		sig = append(sig, line)
	}
	sort.Strings(sig)
	v.sig = strings.Join(sig, "\n")
	return v, nil
}

// parseClusterNodes parses CLUSTER NODES: id addr flags master ping-sent
// pong-recv config-epoch link-state slot...
func parseClusterNodes(text string) ([]clusterNode, error) {
	var nodes []clusterNode
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			return nil, fmt.Errorf("bad CLUSTER NODES line %q", line)
		}
		n := clusterNode{id: f[0], flags: map[string]bool{}, flagText: f[2], master: f[3], link: f[7]}
		addr, _, _ := strings.Cut(f[1], "@")
		if _, port, err := net.SplitHostPort(addr); err == nil {
			n.port, _ = strconv.Atoi(port)
		}
		for _, fl := range strings.Split(f[2], ",") {
			n.flags[fl] = true
		}
		for _, sl := range f[8:] {
			if strings.HasPrefix(sl, "[") {
				continue // a slot being imported or migrated
			}
			lo, hi, isRange := strings.Cut(sl, "-")
			if !isRange {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 != nil || err2 != nil || a < 0 || b >= numSlots || a > b {
				return nil, fmt.Errorf("bad slot %q in CLUSTER NODES line %q", sl, line)
			}
			n.slots = append(n.slots, [2]int{a, b})
		}
		nodes = append(nodes, n)
	}
	return nodes, nil
}

// KeySlot returns the hash slot of key, as CLUSTER KEYSLOT does: CRC16 of
// the key, or of its hash tag (what is between the first { and the next },
// if not empty), modulo 16384.
func KeySlot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16 // CRC16-CCITT (XMODEM)
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % numSlots
}

// clusterPort returns a port p such that p and its cluster bus port
// p+10000 were both free on 127.0.0.1 a moment ago. Both lie below 32768,
// where Linux's range of ephemeral ports (the local ports of outgoing
// connections, and freePort's) begins by default.
func clusterPort() (int, error) {
	for range 200 {
		p := 11000 + rand.IntN(11000) // bus port in 21000..31999
		if portFree(p) && portFree(p+busOffset) {
			return p, nil
		}
	}
	return 0, errors.New("no port p in 11000..21999 with p and p+10000 free")
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}
