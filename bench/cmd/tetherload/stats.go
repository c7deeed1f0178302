package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"
)

// Stats is one /stats sample of the server process.
type Stats struct {
	// Memory, read after a forced GC unless the sample was taken with gc=0.
	RSS        uint64 `json:"rss_bytes"` // VmRSS of /proc/self/status
	HeapInuse  uint64 `json:"heap_inuse_bytes"`
	HeapAlloc  uint64 `json:"heap_alloc_bytes"`
	StackInuse uint64 `json:"stack_inuse_bytes"`
	Sys        uint64 `json:"sys_bytes"`
	GC         bool   `json:"gc"` // a GC ran just before the memory was read

	Goroutines int `json:"goroutines"`

	// Impl is the -impl the server runs. The conn figures below mean the
	// same for every impl; where an impl cannot observe one, its file says so.
	Impl string `json:"impl"`

	Accepted          int64 `json:"accepted_conns"`     // WebSocket upgrades that succeeded
	Open              int64 `json:"open_conns"`         // accepted and not yet ended
	HeartbeatTimeouts int64 `json:"heartbeat_timeouts"` // ended by the server because the peer's heartbeat failed
	OtherEnds         int64 `json:"other_ends"`         // ended for any other reason
	Pongs             int64 `json:"heartbeat_pongs"`    // heartbeat pongs the server observed (0 where it cannot)
	HubConns          int64 `json:"hub_conns"`          // conns registered for broadcast
	HubEvictions      int64 `json:"hub_evictions"`      // subscribers dropped as too slow (melody: messages dropped)
	// RoomSubscribed is the raw peers a serve -room (or -impl tether-raw)
	// server has subscribed to bench itself (v1 peers subscribe by
	// themselves).
	RoomSubscribed int64 `json:"room_subscribed,omitempty"`
	// tether's hub.Stats(): messages dropped by the queues' overflow (low
	// priority ones first), conns dropped by the heartbeat, handshakes
	// refused with 503 (admission, breaker), deliveries of low-priority
	// topics shed by the breaker, whether it is open now and how many
	// times it opened, and the messages queued now. OverloadOpenSecs is how
	// long the breaker has been open in all (serve -overload, from
	// Observer.Overload). 0 for the other impls.
	HubDrops         uint64  `json:"hub_drops,omitempty"`
	HubDeadPeers     uint64  `json:"hub_dead_peers,omitempty"`
	HubRefused       uint64  `json:"hub_refused,omitempty"`
	HubShed          uint64  `json:"hub_shed,omitempty"`
	HubOverloaded    bool    `json:"hub_overloaded,omitempty"`
	HubOverloads     uint64  `json:"hub_overloads,omitempty"`
	HubQueued        int64   `json:"hub_queued_messages,omitempty"`
	OverloadOpenSecs float64 `json:"overload_open_seconds,omitempty"`

	CPUSeconds float64   `json:"cpu_seconds"` // user + system time of the process
	Time       time.Time `json:"time"`
}

// sampleStats reads the process's figures. CPU time and goroutines are read
// first, so that a forced GC is not charged to the time before the sample;
// then, with gc, a full GC runs so that the memory figures are live memory,
// not garbage awaiting collection.
func sampleStats(gc bool) (Stats, error) {
	s := Stats{Goroutines: runtime.NumGoroutine(), Time: time.Now(), GC: gc}
	var err error
	if s.CPUSeconds, err = cpuSeconds(); err != nil {
		return s, err
	}
	if gc {
		runtime.GC()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s.HeapInuse, s.HeapAlloc = ms.HeapInuse, ms.HeapAlloc
	s.StackInuse, s.Sys = ms.StackInuse, ms.Sys
	if s.RSS, err = vmRSS(); err != nil {
		return s, err
	}
	return s, nil
}

// vmRSS returns the process's resident set size in bytes.
func vmRSS() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := bytes.CutPrefix(sc.Bytes(), []byte("VmRSS:"))
		if !ok {
			continue
		}
		num, ok := bytes.CutSuffix(bytes.TrimSpace(rest), []byte(" kB"))
		if !ok {
			return 0, fmt.Errorf("VmRSS line %q: no kB unit", sc.Text())
		}
		kb, err := strconv.ParseUint(string(bytes.TrimSpace(num)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS line %q: %w", sc.Text(), err)
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no VmRSS in /proc/self/status")
}

// cpuSeconds returns the user plus system CPU time of the process.
func cpuSeconds() (float64, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime), nil
}
