package consulkv_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv"
	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
)

func newKV(t *testing.T, cfg consulkv.Config) *consulkv.KV {
	t.Helper()
	if cfg.WatchWait == 0 {
		cfg.WatchWait = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(tlogWriter{t}, nil))
	}
	kv, err := consulkv.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { kv.Close() })
	return kv
}

type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestContract(t *testing.T) {
	addr := consultest.StartAgent(t)
	kvtest.Run(t, func(t *testing.T) meta.KV {
		return newKV(t, consulkv.Config{Address: addr})
	})
}

// The catalog over Consul reports and ignores values written by hand.
func TestCatalogMalformedValues(t *testing.T) {
	addr := consultest.StartAgent(t)
	kvtest.RunCatalog(t, func(t *testing.T) meta.KV {
		return newKV(t, consulkv.Config{Address: addr})
	})
}

func TestNewValidatesAddress(t *testing.T) {
	for _, a := range []string{"ftp://x:1", "http://", "host:1/path"} {
		if _, err := consulkv.New(consulkv.Config{Address: a}); err == nil {
			t.Errorf("New(%q) accepted a bad address", a)
		}
	}
	for _, a := range []string{"127.0.0.1:8500", "http://127.0.0.1:8500", "https://consul.example:8501/"} {
		if _, err := consulkv.New(consulkv.Config{Address: a}); err != nil {
			t.Errorf("New(%q): %v", a, err)
		}
	}
	kv, err := consulkv.New(consulkv.Config{Address: "127.0.0.1:8501", TLS: consulkv.TLSConfig{InsecureSkipVerify: true}})
	if err != nil || kv.Address() != "https://127.0.0.1:8501" {
		t.Errorf("TLS without a scheme: %v %v", kv, err)
	}
	if _, err := consulkv.New(consulkv.Config{TLS: consulkv.TLSConfig{CAFile: "/nonexistent/ca.pem"}}); err == nil {
		t.Error("New accepted a missing CA file")
	}
}

func TestUnreachable(t *testing.T) {
	// A port nobody listens on: connection refused.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	// A port that accepts connections and never answers: only the
	// timeout ends the request.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()

	const token = "s3cret-token-value"
	for _, tc := range []struct{ name, addr string }{{"refused", closed}, {"silent", silent.Addr().String()}} {
		t.Run(tc.name, func(t *testing.T) {
			timeout := 300 * time.Millisecond
			var logs bytes.Buffer
			kv := newKV(t, consulkv.Config{Address: tc.addr, Token: token, Timeout: timeout,
				WatchWait: time.Second, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			for name, err := range timed(t, kv, timeout) {
				if !errors.Is(err, meta.ErrUnavailable) {
					t.Errorf("%s: %v, want ErrUnavailable", name, err)
					continue
				}
				msg := err.Error()
				if !strings.Contains(msg, tc.addr) || !strings.Contains(msg, "unreachable") {
					t.Errorf("%s: %q does not say Consul at %s is unreachable", name, msg, tc.addr)
				}
				if strings.Contains(msg, token) {
					t.Errorf("%s: error leaks the token: %q", name, msg)
				}
			}
			if strings.Contains(logs.String(), token) {
				t.Errorf("logs leak the token: %s", logs.String())
			}
		})
	}
}

// timed runs every method, checking each returns within timeout (plus
// slack; Watch with an index makes two requests at most).
func timed(t *testing.T, kv *consulkv.KV, timeout time.Duration) map[string]error {
	out := map[string]error{}
	c := ctx(t)
	for name, fn := range map[string]func() error{
		"Get":        func() error { _, err := kv.Get(c, "ukai/x"); return err },
		"List":       func() error { _, _, err := kv.List(c, "ukai/"); return err },
		"CAS":        func() error { return kv.CAS(c, "ukai/x", []byte("v"), 0) },
		"DeleteCAS":  func() error { return kv.DeleteCAS(c, "ukai/x", 3) },
		"DeleteTree": func() error { return kv.DeleteTree(c, "ukai/t/") },
		"Watch":      func() error { _, err := kv.Watch(c, "ukai/", 5); return err },
		"Ping":       func() error { return kv.Ping(c) },
	} {
		start := time.Now()
		out[name] = fn()
		if d := time.Since(start); d > timeout+time.Second {
			t.Errorf("%s took %v with Timeout %v", name, d, timeout)
		}
	}
	// Watch(0) blocks for at most WatchWait (+jitter, +Timeout).
	start := time.Now()
	_, out["Watch0"] = kv.Watch(c, "ukai/", 0)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Watch(0) took %v", d)
	}
	return out
}

func TestAgentStopRestart(t *testing.T) {
	agent := consultest.Start(t)
	kv := newKV(t, consulkv.Config{Address: agent.Addr, Timeout: 2 * time.Second, WatchWait: 30 * time.Second})
	c := ctx(t)
	const p = "ukai/restart/"
	// Enough writes that the index before the restart is well past the
	// fresh agent's.
	for i := range 40 {
		if err := kv.CAS(c, fmt.Sprintf("%sk%02d", p, i), []byte("x"), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := kv.Ping(c); err != nil {
		t.Fatalf("Ping of a live agent: %v", err)
	}
	_, idx, err := kv.List(c, p)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := kv.Watch(c, p, idx); errc <- err }()
	time.Sleep(200 * time.Millisecond) // let the blocking query reach the agent
	stopped := time.Now()
	agent.Stop()
	select {
	case err := <-errc:
		if !errors.Is(err, meta.ErrUnavailable) {
			t.Fatalf("Watch when the agent died: %v, want ErrUnavailable", err)
		}
		t.Logf("Watch failed %v after the agent was killed: %v", time.Since(stopped), err)
	case <-time.After(10 * time.Second):
		t.Fatal("Watch still blocked 10s after the agent died")
	}
	if err := kv.Ping(c); !errors.Is(err, meta.ErrUnavailable) {
		t.Fatalf("Ping with the agent down: %v", err)
	}

	agent.Restart()
	if err := kv.Ping(c); err != nil {
		t.Fatalf("Ping after restart: %v", err)
	}
	// The restarted -dev agent is empty and its index is far behind idx:
	// Watch must not sit out WatchWait but report the reset at once.
	start := time.Now()
	n, err := kv.Watch(c, p, idx)
	if err != nil {
		t.Fatalf("Watch after restart: %v", err)
	}
	if n >= idx {
		t.Fatalf("Watch after restart returned %d, want an index below %d (reset)", n, idx)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Watch after restart took %v", d)
	}
	// And from the new index it works normally.
	go func() { _, err := kv.Watch(c, p, n); errc <- err }()
	time.Sleep(100 * time.Millisecond)
	if err := kv.CAS(c, p+"again", []byte("y"), 0); err != nil {
		t.Fatalf("CAS after restart: %v", err)
	}
	select {
	case err := <-errc:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch after restart missed a change")
	}
	if e, err := kv.Get(c, p+"again"); err != nil || string(e.Value) != "y" {
		t.Fatalf("Get after restart: %+v %v", e, err)
	}
}

func TestWatchLatency(t *testing.T) {
	addr := consultest.StartAgent(t)
	kv := newKV(t, consulkv.Config{Address: addr, WatchWait: time.Minute})
	c := ctx(t)
	const p = "ukai/latency/"
	var worst time.Duration
	for i := range 5 {
		_, idx, err := kv.List(c, p)
		if err != nil {
			t.Fatal(err)
		}
		type res struct {
			n   uint64
			err error
			at  time.Time
		}
		ch := make(chan res, 1)
		go func() { n, err := kv.Watch(c, p, idx); ch <- res{n, err, time.Now()} }()
		time.Sleep(150 * time.Millisecond) // let the query block
		written := time.Now()
		if err := kv.CAS(c, fmt.Sprintf("%sk%d", p, i), []byte("x"), 0); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-ch:
			if r.err != nil {
				t.Fatal(r.err)
			}
			if r.n <= idx {
				t.Fatalf("Watch returned %d, not past %d", r.n, idx)
			}
			d := r.at.Sub(written)
			worst = max(worst, d)
			if d >= time.Second {
				t.Fatalf("Watch saw the change after %v, want < 1s", d)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Watch missed the change")
		}
	}
	t.Logf("worst watch latency: %v", worst)

	// Deleting a key under the prefix wakes the watch too.
	_, idx, _ := kv.List(c, p)
	ch := make(chan error, 1)
	go func() { _, err := kv.Watch(c, p, idx); ch <- err }()
	time.Sleep(150 * time.Millisecond)
	if err := kv.DeleteTree(c, p); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch missed a deletion")
	}
}

func TestValueLimit(t *testing.T) {
	addr := consultest.StartAgent(t)
	kv := newKV(t, consulkv.Config{Address: addr})
	c := ctx(t)
	err := kv.CAS(c, "ukai/big", make([]byte, consulkv.MaxValueSize+1), 0)
	if err == nil || errors.Is(err, meta.ErrUnavailable) || !strings.Contains(err.Error(), "512 KiB") {
		t.Fatalf("CAS of a value over 512 KiB: %v, want a clear size error", err)
	}
	if _, err := kv.Get(c, "ukai/big"); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("the refused value was written: %v", err)
	}
	if err := kv.CAS(c, "ukai/max", bytes.Repeat([]byte{7}, consulkv.MaxValueSize), 0); err != nil {
		t.Fatalf("CAS of exactly 512 KiB: %v", err)
	}
	if e, err := kv.Get(c, "ukai/max"); err != nil || len(e.Value) != consulkv.MaxValueSize {
		t.Fatalf("Get of the 512 KiB value: %d bytes, %v", len(e.Value), err)
	}
}

func TestKeys(t *testing.T) {
	addr := consultest.StartAgent(t)
	kv := newKV(t, consulkv.Config{Address: addr})
	c := ctx(t)
	if err := kv.CAS(c, "/ukai/x", []byte("v"), 0); err == nil {
		t.Error("CAS accepted a key starting with '/'")
	}
	if _, err := kv.Get(c, "/ukai/x"); err == nil || errors.Is(err, meta.ErrNotFound) {
		t.Errorf("Get of a key starting with '/': %v", err)
	}
	if err := kv.DeleteTree(c, ""); err == nil {
		t.Error("DeleteTree(\"\") was accepted")
	}
	// Keys with spaces, '%', '?', '#' and unicode survive the URL.
	odd := "ukai/odd/a b%20c?d#e/é"
	if err := kv.CAS(c, odd, []byte("v"), 0); err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(c, odd)
	if err != nil || e.Key != odd {
		t.Fatalf("Get(%q) = %+v %v", odd, e, err)
	}
	es, _, err := kv.List(c, "ukai/odd/")
	if err != nil || len(es) != 1 || es[0].Key != odd {
		t.Fatalf("List = %+v %v", es, err)
	}
	if err := kv.DeleteCAS(c, odd, e.ModifyIndex); err != nil {
		t.Fatal(err)
	}
}

func TestACL(t *testing.T) {
	const root = "root-token-4b1d"
	agent := consultest.Start(t, consultest.WithACL(root))
	c := ctx(t)

	good := newKV(t, consulkv.Config{Address: agent.Addr, Token: root})
	if err := good.CAS(c, "ukai/acl/k", []byte("v"), 0); err != nil {
		t.Fatalf("CAS with the management token: %v", err)
	}
	e, err := good.Get(c, "ukai/acl/k")
	if err != nil || string(e.Value) != "v" {
		t.Fatalf("Get with the management token: %+v %v", e, err)
	}

	const wrong = "wrong-token-7c2e"
	for _, tc := range []struct{ name, token string }{{"wrong", wrong}, {"none", ""}} {
		t.Run(tc.name, func(t *testing.T) {
			kv := newKV(t, consulkv.Config{Address: agent.Addr, Token: tc.token})
			check := func(op string, err error) {
				t.Helper()
				if !errors.Is(err, consulkv.ErrPermissionDenied) || errors.Is(err, meta.ErrUnavailable) {
					t.Errorf("%s: %v, want ErrPermissionDenied (and not ErrUnavailable)", op, err)
					return
				}
				if !strings.Contains(err.Error(), "consul.token") {
					t.Errorf("%s: %q does not point at consul.token", op, err)
				}
				if strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), root) {
					t.Errorf("%s: error leaks a token: %q", op, err)
				}
			}
			_, err := kv.Get(c, "ukai/acl/k")
			check("Get", err)
			check("CAS", kv.CAS(c, "ukai/acl/k", []byte("x"), e.ModifyIndex))
			check("DeleteCAS", kv.DeleteCAS(c, "ukai/acl/k", e.ModifyIndex))
			check("DeleteTree", kv.DeleteTree(c, "ukai/acl/"))
			if tc.token != "" {
				// An unknown token is refused even where an anonymous
				// list is merely filtered.
				_, _, err = kv.List(c, "ukai/acl/")
				check("List", err)
				_, err = kv.Watch(c, "ukai/acl/", 0)
				check("Watch", err)
			}
		})
	}
	if e2, err := good.Get(c, "ukai/acl/k"); err != nil || e2.ModifyIndex != e.ModifyIndex {
		t.Fatalf("a refused write changed the key: %+v %v", e2, err)
	}
}

// Answers Consul would give when it cannot serve, or refuses, the request.
func TestHTTPErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		code   int
		body   string
		want   error
		substr string
	}{
		{"no leader", 500, "No cluster leader", meta.ErrUnavailable, "unavailable"},
		{"rpc", 500, "rpc error making call: EOF", meta.ErrUnavailable, "unavailable"},
		{"bad gateway", 502, "", meta.ErrUnavailable, "unavailable"},
		{"rate limited", 429, "rate limit exceeded", meta.ErrUnavailable, "unavailable"},
		{"acl", 403, "Permission denied", consulkv.ErrPermissionDenied, "consul.token"},
		{"acl not found", 403, "ACL not found", consulkv.ErrPermissionDenied, "consul.token"},
		{"too large", 413, "Request body too large", nil, "too large"},
		{"bad request", 400, "Invalid key", nil, "Invalid key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Header.Get("X-Consul-Token") != "tok-123" {
					t.Errorf("request without the token: %s %s", r.Method, r.URL)
				}
				if strings.Contains(r.URL.String(), "tok-123") {
					t.Errorf("token in the URL: %s", r.URL)
				}
				w.WriteHeader(tc.code)
				io.WriteString(w, tc.body)
			}))
			defer srv.Close()
			kv := newKV(t, consulkv.Config{Address: srv.URL, Token: "tok-123", Timeout: time.Second, WatchWait: time.Second})
			c := ctx(t)
			_, getErr := kv.Get(c, "ukai/x")
			_, _, listErr := kv.List(c, "ukai/")
			_, watchErr := kv.Watch(c, "ukai/", 7)
			for name, err := range map[string]error{
				"Get":        getErr,
				"List":       listErr,
				"CAS":        kv.CAS(c, "ukai/x", []byte("v"), 0),
				"DeleteCAS":  kv.DeleteCAS(c, "ukai/x", 3), // /v1/txn: no StatusError
				"DeleteTree": kv.DeleteTree(c, "ukai/t/"),
				"Watch":      watchErr,
			} {
				if err == nil {
					t.Errorf("%s: no error", name)
					continue
				}
				if tc.want != nil && !errors.Is(err, tc.want) {
					t.Errorf("%s: %v, want %v", name, err, tc.want)
				}
				if tc.want == nil && (errors.Is(err, meta.ErrUnavailable) || errors.Is(err, consulkv.ErrPermissionDenied)) {
					t.Errorf("%s: %v is not a client error", name, err)
				}
				if !strings.Contains(err.Error(), tc.substr) || strings.Contains(err.Error(), "tok-123") {
					t.Errorf("%s: message %q", name, err)
				}
			}
		})
	}
}
