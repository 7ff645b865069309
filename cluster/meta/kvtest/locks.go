package kvtest

import (
	"errors"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// The Locker contract (ownership rests on it, docs/ownership.md). Consul
// agents started by consultest allow TTLs down to 1 s (session_ttl_min),
// so these run in seconds.

var lockTests = []struct {
	name string
	fn   func(t *testing.T, kv meta.KV, p string)
}{
	{"LockExclusive", testLockExclusive},
	{"LockDelayAfterDestroy", testLockDelayAfterDestroy},
	{"SessionGone", testSessionGone},
	{"SessionTTL", testSessionTTL},
	{"CASTouch", testCASTouch},
	{"PutLocked", testPutLocked},
}

func newSession(t *testing.T, kv meta.KV, name string, ttl, delay time.Duration) string {
	t.Helper()
	id, err := kv.CreateSession(ctx(t), name, ttl, delay)
	if err != nil || id == "" {
		t.Fatalf("CreateSession(%s): %q %v", name, id, err)
	}
	t.Cleanup(func() { _ = kv.DestroySession(ctx(t), id) })
	return id
}

func holder(t *testing.T, kv meta.KV, key string) (string, string) {
	t.Helper()
	e, err := kv.Get(ctx(t), key)
	if err != nil {
		t.Fatalf("Get %s: %v", key, err)
	}
	return e.Session, string(e.Value)
}

func testLockExclusive(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	s1 := newSession(t, kv, "a", 30*time.Second, 0)
	s2 := newSession(t, kv, "b", 30*time.Second, 0)
	key := p + "lock"
	if ok, err := kv.Acquire(c, key, []byte("a1"), s1); !ok || err != nil {
		t.Fatalf("first acquire: %v %v", ok, err)
	}
	if ok, err := kv.Acquire(c, key, []byte("b"), s2); ok || err != nil {
		t.Fatalf("acquire of a held lock by another session: %v %v, want false", ok, err)
	}
	if h, v := holder(t, kv, key); h != s1 || v != "a1" {
		t.Fatalf("holder %q value %q, want %q a1", h, v, s1)
	}
	before, _ := kv.Get(c, key)
	if ok, err := kv.Acquire(c, key, []byte("a2"), s1); !ok || err != nil {
		t.Fatalf("the holder acquiring again: %v %v", ok, err)
	}
	if after, _ := kv.Get(c, key); after.Session != s1 || string(after.Value) != "a2" || after.ModifyIndex <= before.ModifyIndex {
		t.Fatalf("after re-acquire: %+v (before %+v)", after, before)
	}
	if ok, err := kv.Release(c, key, []byte("x"), s2); ok || err != nil {
		t.Fatalf("release by a non-holder: %v %v, want false", ok, err)
	}
	if h, v := holder(t, kv, key); h != s1 || v != "a2" {
		t.Fatalf("a non-holder's release changed the key: %q %q", h, v)
	}
	if ok, err := kv.Release(c, key, []byte("free"), s1); !ok || err != nil {
		t.Fatalf("release by the holder: %v %v", ok, err)
	}
	if h, v := holder(t, kv, key); h != "" || v != "free" {
		t.Fatalf("after release: holder %q value %q", h, v)
	}
	// A release is deliberate: no lock delay.
	if ok, err := kv.Acquire(c, key, []byte("b"), s2); !ok || err != nil {
		t.Fatalf("acquire right after a release: %v %v", ok, err)
	}
}

func testLockDelayAfterDestroy(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	const delay = 2 * time.Second
	s1 := newSession(t, kv, "a", 30*time.Second, delay)
	s2 := newSession(t, kv, "b", 30*time.Second, 0)
	key := p + "lock"
	if ok, err := kv.Acquire(c, key, []byte("a"), s1); !ok || err != nil {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	_, idx, _ := kv.List(c, p)
	woke := make(chan error, 1)
	go func() { _, err := kv.Watch(c, p, idx); woke <- err }()
	destroyed := time.Now()
	if err := kv.DestroySession(c, s1); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-woke:
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("destroying the holder's session did not wake a watch of the key")
	}
	if h, v := holder(t, kv, key); h != "" || v != "a" {
		t.Fatalf("after destroy: holder %q value %q, want none, value kept", h, v)
	}
	if err := kv.DestroySession(c, s1); err != nil {
		t.Fatalf("destroying a session already gone: %v", err)
	}
	for {
		ok, err := kv.Acquire(c, key, []byte("b"), s2)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Since(destroyed) > delay+10*time.Second {
			t.Fatalf("lock still refused %v after its holder's session was destroyed (lock delay %v)", time.Since(destroyed), delay)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The delay is measured by the store from the destroy, which came
	// after `destroyed`: nobody may have had the lock sooner.
	if el := time.Since(destroyed); el < delay-100*time.Millisecond {
		t.Fatalf("another session took the lock %v after the destroy, within the lock delay %v", el, delay)
	}
}

func testSessionGone(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	s := newSession(t, kv, "a", 30*time.Second, 0)
	if err := kv.RenewSession(c, s); err != nil {
		t.Fatalf("renew: %v", err)
	}
	if err := kv.DestroySession(c, s); err != nil {
		t.Fatal(err)
	}
	if err := kv.RenewSession(c, s); !errors.Is(err, meta.ErrSessionGone) {
		t.Fatalf("renew of a destroyed session: %v, want ErrSessionGone", err)
	}
	if ok, err := kv.Acquire(c, p+"lock", []byte("a"), s); ok || !errors.Is(err, meta.ErrSessionGone) {
		t.Fatalf("acquire with a destroyed session: %v %v, want ErrSessionGone", ok, err)
	}
}

// A renewed session keeps its lock past its TTL; one left alone loses it
// no sooner than its TTL and no later than twice that (and slack).
func testSessionTTL(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	const ttl = 2 * time.Second
	kept := newSession(t, kv, "kept", ttl, 0)
	left := newSession(t, kv, "left", ttl, 0)
	start := time.Now()
	for _, l := range []struct{ key, s string }{{p + "kept", kept}, {p + "left", left}} {
		if ok, err := kv.Acquire(c, l.key, []byte("x"), l.s); !ok || err != nil {
			t.Fatalf("acquire %s: %v %v", l.key, ok, err)
		}
	}
	var lost time.Duration
	for time.Since(start) < 3*ttl {
		if err := kv.RenewSession(c, kept); err != nil {
			t.Fatalf("renewing a live session at %v: %v", time.Since(start), err)
		}
		if h, _ := holder(t, kv, p+"left"); h == "" && lost == 0 {
			lost = time.Since(start)
		}
		time.Sleep(ttl / 4)
	}
	if h, _ := holder(t, kv, p+"kept"); h != kept {
		t.Fatalf("a session renewed every TTL/4 lost its lock (holder %q)", h)
	}
	for lost == 0 && time.Since(start) < 2*ttl+10*time.Second {
		if h, _ := holder(t, kv, p+"left"); h == "" {
			lost = time.Since(start)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if lost == 0 {
		t.Fatalf("a session not renewed still held its lock %v later (ttl %v)", time.Since(start), ttl)
	}
	if lost < ttl-100*time.Millisecond {
		t.Fatalf("a session not renewed lost its lock after %v, before its TTL %v", lost, ttl)
	}
	if err := kv.RenewSession(c, left); !errors.Is(err, meta.ErrSessionGone) {
		t.Fatalf("renewing an expired session: %v, want ErrSessionGone", err)
	}
}

// CASTouch: the change and its doorbells land together or not at all.
func testCASTouch(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	key, bells := p+"rec", []string{p + "bells/a/rec", p + "bells/b/rec"}
	index := func(k string) uint64 {
		e, err := kv.Get(c, k)
		if errors.Is(err, meta.ErrNotFound) {
			return 0
		}
		if err != nil {
			t.Fatal(err)
		}
		return e.ModifyIndex
	}
	if err := kv.CASTouch(c, key, []byte("v1"), 0, bells); err != nil {
		t.Fatalf("create with touches: %v", err)
	}
	r1, a1, b1 := index(key), index(bells[0]), index(bells[1])
	if r1 == 0 || a1 == 0 || b1 == 0 {
		t.Fatalf("after create: record %d, bells %d %d", r1, a1, b1)
	}
	if err := kv.CASTouch(c, key, []byte("v2"), 0, bells); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("second create: %v, want ErrConflict", err)
	}
	if err := kv.CASTouch(c, key, []byte("v2"), r1+1000, bells[:1]); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("update with a wrong index: %v, want ErrConflict", err)
	}
	if index(bells[0]) != a1 || index(bells[1]) != b1 || index(key) != r1 {
		t.Fatal("a refused CASTouch touched something")
	}
	if err := kv.CASTouch(c, key, []byte("v2"), r1, bells[:1]); err != nil {
		t.Fatalf("update: %v", err)
	}
	if index(bells[0]) <= a1 || index(bells[1]) != b1 {
		t.Fatalf("update touched bells %d→%d and %d→%d, want only the first", a1, index(bells[0]), b1, index(bells[1]))
	}
	if err := kv.CASTouch(c, key, nil, index(key)+1000, bells); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("delete with a wrong index: %v, want ErrConflict", err)
	}
	b2 := index(bells[1])
	if err := kv.CASTouch(c, key, nil, index(key), bells); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if index(key) != 0 || index(bells[1]) <= b2 {
		t.Fatalf("after delete: record %d, bell %d (was %d)", index(key), index(bells[1]), b2)
	}
	if err := kv.CASTouch(c, key, nil, 5, bells); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("delete of a missing key: %v, want ErrNotFound", err)
	}
}

// PutLocked writes only while the session holds the lock: not for
// another session, not after a release, not without a session; a refused
// write changes nothing.
func testPutLocked(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	s1 := newSession(t, kv, "a", 30*time.Second, 0)
	s2 := newSession(t, kv, "b", 30*time.Second, 0)
	lock, key := p+"lock", p+"data"
	if err := kv.PutLocked(c, key, []byte("x"), lock, s1); !errors.Is(err, meta.ErrLockLost) {
		t.Fatalf("put under a lock nobody holds: %v, want %v", err, meta.ErrLockLost)
	}
	if ok, err := kv.Acquire(c, lock, []byte("a"), s1); !ok || err != nil {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	if err := kv.PutLocked(c, key, []byte("v1"), lock, s1); err != nil {
		t.Fatalf("put by the holder: %v", err)
	}
	if err := kv.PutLocked(c, key, []byte("v2"), lock, s2); !errors.Is(err, meta.ErrLockLost) {
		t.Fatalf("put by another session: %v, want %v", err, meta.ErrLockLost)
	}
	if err := kv.PutLocked(c, key, []byte("v2"), lock, ""); !errors.Is(err, meta.ErrLockLost) {
		t.Fatalf("put without a session: %v, want %v", err, meta.ErrLockLost)
	}
	if ok, err := kv.Release(c, lock, []byte("a"), s1); !ok || err != nil {
		t.Fatalf("release: %v %v", ok, err)
	}
	if err := kv.PutLocked(c, key, []byte("v3"), lock, s1); !errors.Is(err, meta.ErrLockLost) {
		t.Fatalf("put after the release: %v, want %v", err, meta.ErrLockLost)
	}
	e, err := kv.Get(c, key)
	if err != nil || string(e.Value) != "v1" {
		t.Fatalf("value %q (%v), want v1: a refused put changed it", e.Value, err)
	}
}
