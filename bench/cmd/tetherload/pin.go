package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// The room scenario runs as the issue that asked for it measured: the
// server pinned to one core, the load process to the other, so that
// neither steals the other's CPU. Linux only, as the rest of tetherload.

// parseCPUs reads a comma list of CPU numbers: "0", "0,1".
func parseCPUs(s string) ([]int, error) {
	var cpus []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 || n >= 1024 {
			return nil, fmt.Errorf("bad CPU %q in %q", f, s)
		}
		cpus = append(cpus, n)
	}
	return cpus, nil
}

// pinProcess binds every thread of the process to cpus and sets GOMAXPROCS
// to their number. Threads made later inherit the binding of the thread
// that makes them; the threads are walked twice, so that one made during
// the first walk by a thread not yet bound is caught by the second.
func pinProcess(cpus []int) error {
	var mask [1024 / 64]uint64
	for _, c := range cpus {
		mask[c/64] |= 1 << (c % 64)
	}
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			_, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, uintptr(tid), unsafe.Sizeof(mask), uintptr(unsafe.Pointer(&mask)))
			if errno != 0 && errno != syscall.ESRCH { // ESRCH: the thread has exited
				return fmt.Errorf("sched_setaffinity(%d, %v): %w", tid, cpus, errno)
			}
		}
	}
	runtime.GOMAXPROCS(len(cpus))
	return nil
}

// raiseFileLimit makes sure the process may open need files: the soft
// limit up to the hard one, and past the hard one where the process may
// (root). Child processes inherit the limit.
func raiseFileLimit(need uint64) error {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return err
	}
	if rl.Cur >= need {
		return nil
	}
	want := syscall.Rlimit{Cur: min(need, rl.Max), Max: rl.Max}
	if need > rl.Max {
		want = syscall.Rlimit{Cur: need, Max: need}
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		if need <= rl.Max {
			return err
		}
		// Not allowed past the hard limit: up to it, then.
		want = syscall.Rlimit{Cur: rl.Max, Max: rl.Max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			return err
		}
	}
	if want.Cur < need {
		return fmt.Errorf("open files limited to %d (hard limit), %d needed: raise it (ulimit -Hn, or prlimit as root)", want.Cur, need)
	}
	return nil
}
