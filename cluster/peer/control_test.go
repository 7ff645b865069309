package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// recorder is a Control that records the calls it serves.
type recorder struct {
	mu    sync.Mutex
	calls []string
	err   error
}

func (r *recorder) note(s string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, s)
	return r.err
}
func (r *recorder) PrepareCopy(_ context.Context, id string, size int64) error {
	return r.note(fmt.Sprintf("prepare %s %d", id, size))
}
func (r *recorder) GrowCopy(_ context.Context, id string, size int64) error {
	return r.note(fmt.Sprintf("grow %s %d", id, size))
}
func (r *recorder) Release(_ context.Context, image string) error {
	return r.note("release " + image)
}

// The control calls reach the node's Control with their arguments; its
// errors come back with their message; malformed calls are refused before
// they reach it; a node without Control answers 404.
func TestControlCalls(t *testing.T) {
	ctx := context.Background()
	rec := &recorder{}
	_, addr := startServer(t, newStore(), ServerConfig{Control: rec})
	c := newClient(t, addr, ClientConfig{})
	id := newID()
	if err := c.PrepareCopy(ctx, id, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.GrowCopy(ctx, id, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.Release(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	want := []string{fmt.Sprintf("prepare %s %d", id, 1<<20), fmt.Sprintf("grow %s %d", id, 2<<20), "release vm1"}
	if strings.Join(rec.calls, "|") != strings.Join(want, "|") {
		t.Fatalf("calls %q, want %q", rec.calls, want)
	}
	wantErr(t, c.PrepareCopy(ctx, "../x", 1<<20), ErrBadRequest)
	wantErr(t, c.GrowCopy(ctx, id, 0), ErrBadRequest)
	wantErr(t, c.Release(ctx, ""), ErrBadRequest)
	if len(rec.calls) != 3 {
		t.Fatalf("malformed calls reached the node: %q", rec.calls)
	}
	rec.err = errors.New("a copy of image id x with another size exists")
	if err := c.PrepareCopy(ctx, id, 1<<20); err == nil || !strings.Contains(err.Error(), "another size") {
		t.Fatalf("the node's error: %v", err)
	}
	_, bare := startServer(t, newStore(), ServerConfig{})
	wantErr(t, newClient(t, bare, ClientConfig{}).Release(ctx, "vm1"), ErrNoCopy)
}

// With TLS, control calls are served only to a member's certificate.
func TestControlCallsOnlyFromMembers(t *testing.T) {
	ctx := context.Background()
	cert, pool := selfSigned(t)
	rec := &recorder{}
	var member atomic.Bool
	_, addr := startServer(t, newStore(), ServerConfig{
		TLS:     &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert},
		Member:  func(string) bool { return member.Load() },
		Control: rec,
	})
	c := newClient(t, addr, ClientConfig{TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}})
	wantErr(t, c.Release(ctx, "vm1"), ErrForbidden)
	if len(rec.calls) != 0 {
		t.Fatalf("a non-member's call reached the node: %q", rec.calls)
	}
	member.Store(true)
	if err := c.Release(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
}
