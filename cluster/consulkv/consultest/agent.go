// Package consultest runs a real Consul agent (-dev, loopback only) for
// tests. The binary comes from integration/get-consul.sh (on PATH, or built
// once and cached under .cache/); when it cannot be found the test fails.
package consultest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Agent is a running consul -dev agent bound to 127.0.0.1 only.
type Agent struct {
	// Addr is the HTTP API address, "127.0.0.1:port".
	Addr string

	t     testing.TB
	bin   string
	args  []string
	token string // management token when ACLs are on, for the readiness probe

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	out  *syncBuffer
}

// Option changes how an agent is started.
type Option func(*Agent)

// WithACL starts the agent with ACLs enabled, default policy deny, and
// the given initial management token.
func WithACL(managementToken string) Option {
	return func(a *Agent) {
		a.token = managementToken
		a.args = append(a.args, "-hcl", fmt.Sprintf(
			`acl { enabled = true default_policy = "deny" enable_token_persistence = false tokens { initial_management = %q } }`,
			managementToken))
	}
}

// StartAgent starts an agent and returns its HTTP address; it is killed
// at t.Cleanup.
func StartAgent(t testing.TB) string { return Start(t).Addr }

// Persistent makes the agent a single-node server (instead of -dev) that
// keeps its data in dir, so that Restart keeps the KV store: what an
// operator's Consul does when it restarts.
func Persistent(dir string) Option {
	return func(a *Agent) {
		for i, arg := range a.args {
			if arg == "-dev" {
				server := []string{"-server", "-bootstrap-expect", "1", "-data-dir", dir}
				a.args = append(append(append([]string(nil), a.args[:i]...), server...), a.args[i+1:]...)
				return
			}
		}
	}
}

// Start starts an agent on free loopback ports, waits until it has a
// leader, and kills it at t.Cleanup.
func Start(t testing.TB, opts ...Option) *Agent {
	t.Helper()
	bin := Binary(t)
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		ports, err := FreePorts(4)
		if err != nil {
			t.Fatalf("consultest: free ports: %v", err)
		}
		a := &Agent{t: t, bin: bin, Addr: "127.0.0.1:" + strconv.Itoa(ports[0])}
		a.args = []string{"agent", "-dev",
			"-bind", "127.0.0.1", "-client", "127.0.0.1", "-advertise", "127.0.0.1",
			"-http-port", strconv.Itoa(ports[0]),
			"-serf-lan-port", strconv.Itoa(ports[1]),
			"-serf-wan-port", strconv.Itoa(ports[2]),
			"-server-port", strconv.Itoa(ports[3]),
			"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
			"-node", "ukai-test-" + strconv.Itoa(ports[0]),
			"-log-level", "warn",
			// Lease TTLs of a few seconds in tests (default minimum 10 s).
			"-hcl", `session_ttl_min = "1s"`,
		}
		for _, o := range opts {
			o(a)
		}
		if lastErr = a.start(); lastErr == nil {
			t.Cleanup(a.Stop)
			return a
		}
		a.Stop()
		t.Logf("consultest: attempt %d: %v", attempt+1, lastErr)
	}
	t.Fatalf("consultest: consul agent did not start: %v", lastErr)
	return nil
}

// Binary returns the path of the consul binary, failing the test when
// integration/get-consul.sh cannot provide one.
func Binary(t testing.TB) string {
	t.Helper()
	script, err := findScript()
	if err != nil {
		t.Fatalf("consultest: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, script)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("consultest: %s failed (the Consul tests need a consul binary): %v\n%s", script, err, stderr.String())
	}
	bin := strings.TrimSpace(string(out))
	if lines := strings.Split(bin, "\n"); len(lines) > 1 {
		bin = lines[len(lines)-1]
	}
	if fi, err := os.Stat(bin); err != nil || fi.IsDir() {
		t.Fatalf("consultest: %s printed %q, which is not a consul binary: %v", script, bin, err)
	}
	return bin
}

// findScript locates integration/get-consul.sh from this source file, or
// upwards from the working directory.
func findScript() (string, error) {
	var dirs []string
	if _, file, _, ok := runtime.Caller(0); ok {
		dirs = append(dirs, filepath.Dir(file))
	}
	if wd, err := os.Getwd(); err == nil {
		dirs = append(dirs, wd)
	}
	for _, d := range dirs {
		for {
			p := filepath.Join(d, "integration", "get-consul.sh")
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
			parent := filepath.Dir(d)
			if parent == d {
				break
			}
			d = parent
		}
	}
	return "", fmt.Errorf("integration/get-consul.sh not found above %v: cannot find a consul binary", dirs)
}

func (a *Agent) start() error {
	a.mu.Lock()
	cmd := exec.Command(a.bin, a.args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "CHECKPOINT_DISABLE=1")
	setProcAttr(cmd)
	if err := cmd.Start(); err != nil {
		a.mu.Unlock()
		return fmt.Errorf("start %s: %w", a.bin, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	a.cmd, a.done, a.out = cmd, done, out
	a.mu.Unlock()

	deadline := time.Now().Add(60 * time.Second)
	for {
		if a.ready() {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("consul exited during startup: %s\n%s", cmd.ProcessState, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("consul at %s has no leader after 60s:\n%s", a.Addr, out.String())
		}
	}
}

// ready reports whether the agent has elected itself leader (and, with
// ACLs, accepts the management token for KV writes).
func (a *Agent) ready() bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + a.Addr + "/v1/status/leader")
	if err != nil {
		return false
	}
	var leader string
	err = json.NewDecoder(resp.Body).Decode(&leader)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || leader == "" {
		return false
	}
	if a.token == "" {
		return true
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+a.Addr+"/v1/kv/consultest-probe", nil)
	req.Header.Set("X-Consul-Token", a.token)
	resp, err = c.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusNotFound
}

// Stop kills the agent and waits for it to exit. Safe to call twice.
func (a *Agent) Stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	_ = a.cmd.Process.Kill()
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		a.t.Errorf("consultest: consul pid %d did not exit after SIGKILL", a.cmd.Process.Pid)
	}
	a.cmd = nil
}

// Restart starts the agent again on the same ports (a -dev agent starts
// with an empty store) and waits for its leader.
func (a *Agent) Restart() {
	a.t.Helper()
	a.Stop()
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = a.start(); err == nil {
			return
		}
		a.Stop()
		time.Sleep(200 * time.Millisecond) // let the old ports be released
	}
	a.t.Fatalf("consultest: consul restart on %s: %v", a.Addr, err)
}

// Log returns the agent's output so far.
func (a *Agent) Log() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.out == nil {
		return ""
	}
	return a.out.String()
}

// FreePorts returns n distinct ports free now on 127.0.0.1 for both TCP
// and UDP (serf uses both), never handed out before by this process, and
// below the kernel's ephemeral range. A port the kernel picks for
// 127.0.0.1:0 is in that range, where an outgoing connection of an
// already running process can take it between the pick and the bind: a
// node of a test cluster then failed to start with "address already in
// use" (the clean-clone CI run of 2026-12-07, chaos seed 2).
func FreePorts(n int) ([]int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	lo, hi := portRange()
	var ports []int
	var closers []func()
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	start := lo + rand.IntN(hi-lo)
	for i := 0; i < hi-lo && len(ports) < n; i++ {
		p := lo + (start-lo+i)%(hi-lo)
		if handed[p] {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		closers = append(closers, func() { l.Close() })
		u, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		closers = append(closers, func() { u.Close() })
		handed[p] = true
		ports = append(ports, p)
	}
	if len(ports) < n {
		return nil, fmt.Errorf("only %d free ports in [%d, %d)", len(ports), lo, hi)
	}
	return ports, nil
}

var (
	portMu sync.Mutex
	handed = map[int]bool{}
)

// portRange is where FreePorts looks: the 12,000 ports below the
// ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), not below
// 10000.
func portRange() (lo, hi int) {
	hi = 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 11000 {
				hi = v
			}
		}
	}
	return max(10000, hi-12000), hi
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Pid is the agent process's id (0 when it is not running), for CPU
// measurements.
func (a *Agent) Pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil || a.cmd.Process == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// WithHCL adds agent configuration (e.g. limits for a test that opens
// many connections from one address).
func WithHCL(hcl string) Option {
	return func(a *Agent) { a.args = append(a.args, "-hcl", hcl) }
}
