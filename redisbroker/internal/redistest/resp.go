package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// The harness talks to its servers with this minimal RESP2 client rather
// than go-redis: one connection per exchange, a deadline on every command,
// no pool and no background goroutine.

// cmdTimeout bounds one command, connecting included.
const cmdTimeout = 2 * time.Second

// respError is an error reply (-ERR ...).
type respError string

func (e respError) Error() string { return string(e) }

// respConn is one connection to a server.
type respConn struct {
	c net.Conn
	r *bufio.Reader
}

func dial(addr string) (*respConn, error) {
	c, err := net.DialTimeout("tcp", addr, cmdTimeout)
	if err != nil {
		return nil, err
	}
	return &respConn{c: c, r: bufio.NewReader(c)}, nil
}

func (c *respConn) Close() error { return c.c.Close() }

// do sends a command and reads its reply: string (simple or bulk), int64,
// nil, []any, or a respError as the error (within arrays, as a value).
func (c *respConn) do(args ...string) (any, error) {
	_ = c.c.SetDeadline(time.Now().Add(cmdTimeout))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(c.c, b.String()); err != nil {
		return nil, err
	}
	v, err := readReply(c.r)
	if err != nil {
		return nil, err
	}
	if e, ok := v.(respError); ok {
		return nil, e
	}
	return v, nil
}

// do runs one command on a fresh connection to addr.
func do(addr string, args ...string) (any, error) {
	c, err := dial(addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.do(args...)
}

// doString runs a command whose reply is a string.
func doString(addr string, args ...string) (string, error) {
	v, err := do(addr, args...)
	if err != nil {
		return "", err
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("%s: %v answered %T, not a string", addr, args, v)
	}
	return s, nil
}

// info returns the fields of INFO section as a map.
func info(addr, section string) (map[string]string, error) {
	s, err := doString(addr, "INFO", section)
	if err != nil {
		return nil, err
	}
	return fields(s), nil
}

// fields parses "key:value" lines (INFO, CLUSTER INFO).
func fields(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			m[k] = v
		}
	}
	return m
}

func readReply(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || !strings.HasSuffix(line, "\r\n") {
		return nil, fmt.Errorf("bad RESP line %q", line)
	}
	kind, body := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return body, nil
	case '-':
		return respError(body), nil
	case ':':
		return strconv.ParseInt(body, 10, 64)
	case '$':
		n, err := strconv.Atoi(body)
		if err != nil {
			return nil, err
		}
		if n < 0 {
			return nil, nil
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(body)
		if err != nil {
			return nil, err
		}
		if n < 0 {
			return nil, nil
		}
		a := make([]any, n)
		for i := range a {
			if a[i], err = readReply(r); err != nil {
				return nil, err
			}
		}
		return a, nil
	}
	return nil, errors.New("unknown RESP reply type in " + strconv.Quote(line))
}

// pairs turns a flat [k1 v1 k2 v2 ...] reply of strings into a map.
func pairs(v any) map[string]string {
	a, _ := v.([]any)
	m := map[string]string{}
	for i := 0; i+1 < len(a); i += 2 {
		k, _ := a[i].(string)
		val, _ := a[i+1].(string)
		m[k] = val
	}
	return m
}
