package membership

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// testLogger logs warnings and errors to stderr (debug with
// UKAI_MEMBERSHIP_DEBUG=1). It does not use t.Log: memberlist goroutines
// may still log after a test returns.
func testLogger() *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("UKAI_MEMBERSHIP_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// captureLog is a concurrency-safe log sink.
type captureLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *captureLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *captureLog) contains(sub ...string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, line := range strings.Split(c.buf.String(), "\n") {
		all := true
		for _, s := range sub {
			all = all && strings.Contains(line, s)
		}
		if all {
			return true
		}
	}
	return false
}

func testConfig(name string, join ...string) Config {
	cfg := DefaultConfig()
	cfg.Name = name
	cfg.Bind = "127.0.0.1:0"
	cfg.Join = join
	cfg.Logger = testLogger()
	return cfg
}

func testMeta(name string) NodeMeta {
	return NodeMeta{
		API:      "127.0.0.1:9" + name[len(name)-1:] + "00",
		ISCSI:    "127.0.0.1:3260",
		Peer:     "127.0.0.1:9" + name[len(name)-1:] + "01",
		Labels:   map[string]string{"zone": "z-" + name, "rack": "r1"},
		Capacity: 1 << 40,
		Free:     1 << 39,
		Version:  "test",
	}
}

// startAgent starts an agent that is shut down when the test ends.
func startAgent(t testing.TB, cfg Config, meta NodeMeta) *Agent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a, err := New(ctx, cfg, meta)
	if err != nil {
		t.Fatalf("New(%s): %v", cfg.Name, err)
	}
	t.Cleanup(func() { _ = a.Shutdown() })
	return a
}

// waitFor polls cond every 10 ms until it holds or timeout passes, and
// returns how long it took.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if cond() {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sees reports whether a sees name in state st (and, if meta is not nil,
// with that meta).
func sees(a *Agent, name string, st State, meta *NodeMeta) bool {
	m, ok := a.Member(name)
	if !ok || m.State != st {
		return false
	}
	return meta == nil || metaEqual(m.Meta, *meta)
}

func metaEqual(x, y NodeMeta) bool {
	return fmt.Sprint(x) == fmt.Sprint(y) // maps print sorted
}

// eventLog collects an agent's events.
type eventLog struct {
	mu  sync.Mutex
	evs []Event
}

func collect(a *Agent) *eventLog {
	l := &eventLog{}
	go func() {
		for ev := range a.Events() {
			l.mu.Lock()
			l.evs = append(l.evs, ev)
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *eventLog) has(name string, typ EventType) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ev := range l.evs {
		if ev.Member.Name == name && ev.Type == typ {
			return true
		}
	}
	return false
}
