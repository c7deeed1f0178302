//go:build !linux

package tether

import "runtime"

// cpuCapacity returns how many CPUs the process may use: GOMAXPROCS.
func cpuCapacity() float64 { return float64(runtime.GOMAXPROCS(0)) }
