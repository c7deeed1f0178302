// Package redistest starts real redis-server processes for tests: each on
// its own free loopback port, with no persistence, stopped by t.Cleanup.
// It never skips: without redis-server on PATH the test fails and says how
// to install it.
package redistest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// StartTimeout bounds how long a start or restart may take, PING included.
const StartTimeout = 10 * time.Second

// Server is one redis-server process owned by a test.
type Server struct {
	bin  string
	port int
	dir  string
	conf string // config file given first on the command line, or ""
	args []string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited and been waited for
	out  *syncBuffer   // the process's stdout and stderr, all runs
}

// Start starts a redis-server on a free 127.0.0.1 port, waits until it
// answers PING and stops it in t.Cleanup. extra arguments are appended to
// the command line ("--maxmemory", "10mb", ...).
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	return startWith(t, t.TempDir(), freePort, "", extra...)
}

// startWith is Start with a port chooser and a config file, in dir.
func startWith(t testing.TB, dir string, pick func() (int, error), conf string, extra ...string) *Server {
	t.Helper()
	s, err := launch(dir, pick, conf, extra...)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	kind := "redis-server"
	if slices.Contains(extra, "--sentinel") {
		kind = "sentinel"
	} else if slices.Contains(extra, "--cluster-enabled") {
		kind = "cluster node"
	}
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			t.Logf("redistest: %s %s output:\n%s", kind, s.Addr(), s.out.String())
		}
	})
	return s
}

// Launch is Start without a test, for examples: the caller stops the
// server. dir is its working directory.
func Launch(dir string, extra ...string) (*Server, error) {
	return launch(dir, freePort, "", extra...)
}

// launch starts a redis-server on a port chosen by pick, trying again on
// another port if it cannot start (the port was taken meanwhile). conf, if
// not "", is the config file, given first on the command line.
func launch(dir string, pick func() (int, error), conf string, extra ...string) (*Server, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("redis-server is not on PATH (%v): install redis-server: apt-get install redis-server; .ci/run does", err)
	}
	s := &Server{bin: bin, dir: dir, conf: conf, args: extra, out: &syncBuffer{}}
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := pick()
		if err != nil {
			return nil, fmt.Errorf("no free port: %w", err)
		}
		s.port = port
		if last = s.start(); last == nil {
			return s, nil
		}
	}
	return nil, fmt.Errorf("cannot start redis-server: %v\n%s", last, s.out.String())
}

// Addr returns the server's host:port.
func (s *Server) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

// Port returns the server's TCP port.
func (s *Server) Port() int { return s.port }

// Running reports whether the process is running (it may be paused).
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// Stop kills the server (SIGKILL: no goodbye to its clients, data lost)
// and waits for it to exit. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd, s.done = nil, nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGCONT) // a paused process dies as well, but be sure
	_ = cmd.Process.Kill()
	<-done
}

// Kill is Stop: kill -9, the way to make a master fail in a cluster or
// under sentinels.
func (s *Server) Kill() { s.Stop() }

// Restart stops the server, if running, and starts a new one on the same
// port with no data, returning once it answers PING.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	deadline := time.Now().Add(StartTimeout)
	for {
		err := s.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: cannot restart redis-server on %s: %v\n%s", s.Addr(), err, s.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Pause stops the process with SIGSTOP: its connections stay open but it
// answers nothing, like a hung server. Resume undoes it.
func (s *Server) Pause(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGSTOP)
}

// Resume continues a paused server.
func (s *Server) Resume(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGCONT)
}

func (s *Server) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd == nil {
		t.Fatalf("redistest: redis-server %s is not running", s.Addr())
	}
	if err := cmd.Process.Signal(sig); err != nil {
		t.Fatalf("redistest: signal %v to redis-server: %v", sig, err)
	}
}

// Output returns what the server printed so far, every run included.
func (s *Server) Output() string { return s.out.String() }

// start starts the process on s.port and waits for PING; on failure the
// process is gone.
func (s *Server) start() error {
	var args []string
	if s.conf != "" {
		args = append(args, s.conf)
	}
	args = append(args,
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", s.dir,
		"--daemonize", "no",
		"--databases", "1",
		"--loglevel", "warning",
	)
	args = append(args, s.args...)
	cmd := exec.Command(s.bin, args...)
	cmd.Stdout = s.out
	cmd.Stderr = s.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test binary
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	deadline := time.Now().Add(StartTimeout)
	for {
		select {
		case <-done:
			return fmt.Errorf("redis-server exited at start: %v", cmd.ProcessState)
		default:
		}
		if err := ping(s.Addr()); err == nil {
			break
		} else if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-done
			return fmt.Errorf("no PONG within %v: %v", StartTimeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	return nil
}

// ping sends PING over a fresh connection and expects +PONG.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return errors.New("unexpected answer to PING: " + strings.TrimSpace(line))
	}
	return nil
}

// freePort returns a TCP port that was free on 127.0.0.1 a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
