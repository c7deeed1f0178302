//go:build linux

package tether

import (
	"os"
	"runtime"
	"strconv"
	"strings"
)

// cpuCapacity returns how many CPUs the process may use: GOMAXPROCS, or
// less under a cgroup CPU quota (the runtime's GOMAXPROCS is never below
// 2, so a container limited to one core would otherwise never look busy).
func cpuCapacity() float64 {
	n := float64(runtime.GOMAXPROCS(0))
	if q, ok := cgroupQuota(); ok && q < n {
		return q
	}
	return n
}

// cgroupQuota reads the CPU quota of the process's cgroup, in CPUs: cgroup
// v2's cpu.max, else v1's cfs quota and period.
func cgroupQuota() (float64, bool) {
	if b, err := os.ReadFile("/sys/fs/cgroup/cpu.max"); err == nil {
		f := strings.Fields(string(b))
		if len(f) == 2 && f[0] != "max" {
			return ratio(f[0], f[1])
		}
		return 0, false
	}
	q, err1 := os.ReadFile("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
	p, err2 := os.ReadFile("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return ratio(strings.TrimSpace(string(q)), strings.TrimSpace(string(p)))
}

func ratio(quota, period string) (float64, bool) {
	q, err1 := strconv.ParseFloat(quota, 64)
	p, err2 := strconv.ParseFloat(period, 64)
	if err1 != nil || err2 != nil || q <= 0 || p <= 0 {
		return 0, false
	}
	return q / p, true
}
