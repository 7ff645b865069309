package iscsi

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/target/scsi"
)

// memBackend is an in-memory scsi.Backend.
type memBackend struct {
	mu    sync.RWMutex
	data  []byte
	delay atomic.Int64 // nanoseconds per write, to keep commands in flight
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	copy(p, m.data[off:])
	return ctx.Err()
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if d := time.Duration(m.delay.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush(ctx context.Context) error { return ctx.Err() }

func (m *memBackend) Unmap(ctx context.Context, off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}

type testTargets struct {
	mu sync.Mutex
	m  map[string]*scsi.LU
	be map[string]*memBackend
}

func (tt *testTargets) LookupTarget(iqn string) (*scsi.LU, bool) {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	lu, ok := tt.m[iqn]
	return lu, ok
}

func (tt *testTargets) TargetNames() []string {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	var n []string
	for k := range tt.m {
		n = append(n, k)
	}
	return n
}

func (tt *testTargets) add(t testing.TB, iqn string, size int64) *memBackend {
	be := &memBackend{data: make([]byte, size)}
	var id [16]byte
	copy(id[:], iqn)
	lu, err := scsi.NewLU(scsi.Config{Size: size, DeviceID: id, ThinProvisioning: true, WriteCache: true}, be, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("NewLU: %v", err)
	}
	tt.mu.Lock()
	defer tt.mu.Unlock()
	tt.m[iqn] = lu
	tt.be[iqn] = be
	return be
}

func (tt *testTargets) remove(iqn string) {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	delete(tt.m, iqn)
}

const iqnPrefix = "iqn.2024-01.io.ukai"

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("ISCSI_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(&tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tlogWriter struct{ t testing.TB }

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// startServer runs a Server on 127.0.0.1:0 with the given targets (64 MiB
// each) and returns it and its "127.0.0.1:port".
func startServer(t testing.TB, cfg Config, names ...string) (*Server, string, *testTargets) {
	t.Helper()
	tt := &testTargets{m: map[string]*scsi.LU{}, be: map[string]*memBackend{}}
	for _, n := range names {
		tt.add(t, iqnPrefix+":"+n, 64<<20)
	}
	cfg.Listen = "127.0.0.1:0"
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	s, err := NewServer(cfg, tt)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		if err := s.Close(cctx); err != nil {
			t.Errorf("Close: %v", err)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, s.Addr().String(), tt
}

// run runs a client tool with a timeout and returns its combined output.
func run(t testing.TB, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s timed out after %v: %w", name, timeout, ctx.Err())
	}
	return string(out), err
}

func lunURL(addr, name string) string {
	return "iscsi://" + addr + "/" + iqnPrefix + ":" + name + "/0"
}
