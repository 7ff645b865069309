// Package kvtest is the contract test suite every meta.KV implementation
// passes: the embedded store and the Consul store run the same tests.
package kvtest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// Run runs the suite. newKV returns an empty store; each subtest uses its own
// key prefix so stores may be shared.
func Run(t *testing.T, newKV func(t *testing.T) meta.KV) {
	tests := []struct {
		name string
		fn   func(t *testing.T, kv meta.KV, p string)
	}{
		{"GetMissing", testGetMissing},
		{"CreateOnlyOnce", testCreateOnlyOnce},
		{"CASIndex", testCASIndex},
		{"ListPrefixOrder", testListPrefix},
		{"DeleteCAS", testDeleteCAS},
		{"CASGuarded", testCASGuarded},
		{"DeleteTree", testDeleteTree},
		{"WatchWakes", testWatchWakes},
		{"WatchCancel", testWatchCancel},
		{"ConcurrentCAS", testConcurrentCAS},
		{"BinaryValues", testBinary},
		{"DeleteCASMissing", testDeleteCASMissing},
		{"ListEmpty", testListEmpty},
		{"WatchSeesDelete", testWatchSeesDelete},
	}
	tests = append(tests, lockTests...)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, newKV(t), "kvtest/"+tc.name+"/")
		})
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func testGetMissing(t *testing.T, kv meta.KV, p string) {
	if _, err := kv.Get(ctx(t), p+"nope"); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("Get of a missing key: %v, want ErrNotFound", err)
	}
}

func testCreateOnlyOnce(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	if err := kv.CAS(c, p+"a", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	if err := kv.CAS(c, p+"a", []byte("2"), 0); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("second create: %v, want ErrConflict", err)
	}
	e, err := kv.Get(c, p+"a")
	if err != nil || string(e.Value) != "1" || e.ModifyIndex == 0 {
		t.Fatalf("Get after create: %+v %v", e, err)
	}
}

func testCASIndex(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	if err := kv.CAS(c, p+"k", []byte("v1"), 0); err != nil {
		t.Fatal(err)
	}
	e1, _ := kv.Get(c, p+"k")
	if err := kv.CAS(c, p+"k", []byte("v2"), e1.ModifyIndex); err != nil {
		t.Fatalf("CAS with the current index: %v", err)
	}
	e2, _ := kv.Get(c, p+"k")
	if string(e2.Value) != "v2" || e2.ModifyIndex <= e1.ModifyIndex {
		t.Fatalf("after CAS: %+v (before %+v)", e2, e1)
	}
	if err := kv.CAS(c, p+"k", []byte("v3"), e1.ModifyIndex); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("CAS with a stale index: %v, want ErrConflict", err)
	}
	if e, _ := kv.Get(c, p+"k"); string(e.Value) != "v2" {
		t.Fatalf("a failed CAS changed the value to %q", e.Value)
	}
	if err := kv.CAS(c, p+"missing", []byte("x"), 12345); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("CAS on a missing key with an index: %v, want ErrConflict", err)
	}
}

func testListPrefix(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	for _, k := range []string{"b/2", "a/1", "b/1", "c"} {
		if err := kv.CAS(c, p+k, []byte(k), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := kv.CAS(c, p[:len(p)-1]+"x/b/9", []byte("other"), 0); err != nil {
		t.Fatal(err)
	}
	es, idx, err := kv.List(c, p+"b/")
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 || es[0].Key != p+"b/1" || es[1].Key != p+"b/2" || string(es[1].Value) != "b/2" {
		t.Fatalf("List(b/) = %+v", es)
	}
	if idx < es[1].ModifyIndex {
		t.Fatalf("List index %d older than an entry it returned (%d)", idx, es[1].ModifyIndex)
	}
	all, _, _ := kv.List(c, p)
	if len(all) != 4 {
		t.Fatalf("List(all) returned %d entries, want 4", len(all))
	}
}

func testDeleteCAS(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	if err := kv.CAS(c, p+"d", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	e, _ := kv.Get(c, p+"d")
	if err := kv.DeleteCAS(c, p+"d", e.ModifyIndex+1000); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("DeleteCAS with a wrong index: %v", err)
	}
	if err := kv.DeleteCAS(c, p+"d", e.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Get(c, p+"d"); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("after delete: %v", err)
	}
}

func testDeleteTree(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	for _, k := range []string{"t/1", "t/2/x", "u"} {
		if err := kv.CAS(c, p+k, nil, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := kv.DeleteTree(c, p+"t/"); err != nil {
		t.Fatal(err)
	}
	es, _, _ := kv.List(c, p)
	if len(es) != 1 || es[0].Key != p+"u" {
		t.Fatalf("after DeleteTree: %+v", es)
	}
}

func testWatchWakes(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	_, idx, err := kv.List(c, p)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan uint64, 1)
	errc := make(chan error, 1)
	go func() {
		n, err := kv.Watch(c, p, idx)
		if err != nil {
			errc <- err
			return
		}
		done <- n
	}()
	// Keep writing until the watcher returns: it must see a change.
	for i := 0; ; i++ {
		if err := kv.CAS(c, fmt.Sprintf("%sw%d", p, i), []byte("x"), 0); err != nil {
			t.Fatal(err)
		}
		select {
		case n := <-done:
			if n <= idx {
				t.Fatalf("Watch returned index %d, not past %d", n, idx)
			}
			// A change already past the index returns at once.
			start := time.Now()
			if _, err := kv.Watch(c, p, idx); err != nil {
				t.Fatal(err)
			}
			if time.Since(start) > 5*time.Second {
				t.Fatal("Watch on an old index blocked")
			}
			return
		case err := <-errc:
			t.Fatal(err)
		case <-time.After(50 * time.Millisecond):
		}
		if i > 200 {
			t.Fatal("Watch never woke up")
		}
	}
}

func testWatchCancel(t *testing.T, kv meta.KV, p string) {
	c, cancel := context.WithCancel(ctx(t))
	_, idx, err := kv.List(c, p)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := kv.Watch(c, p, idx); errc <- err }()
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Watch after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Watch ignored the cancelled context")
	}
}

// Concurrent read-modify-write with CAS loses no increment.
func testConcurrentCAS(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	if err := kv.CAS(c, p+"n", []byte{0}, 0); err != nil {
		t.Fatal(err)
	}
	const workers, each = 4, 10
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				for {
					e, err := kv.Get(c, p+"n")
					if err != nil {
						t.Error(err)
						return
					}
					err = kv.CAS(c, p+"n", []byte{e.Value[0] + 1}, e.ModifyIndex)
					if err == nil {
						break
					}
					if !errors.Is(err, meta.ErrConflict) {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	e, _ := kv.Get(c, p+"n")
	if int(e.Value[0]) != workers*each {
		t.Fatalf("counter = %d, want %d: a CAS overwrote another writer", e.Value[0], workers*each)
	}
}

func testBinary(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	v := make([]byte, 300<<10)
	for i := range v {
		v[i] = byte(i * 7)
	}
	if err := kv.CAS(c, p+"bin", v, 0); err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(c, p+"bin")
	if err != nil || string(e.Value) != string(v) {
		t.Fatalf("binary value of %d bytes did not round-trip: %v", len(v), err)
	}
}

// DeleteCAS of a key that does not exist (never did, or was just deleted)
// is ErrNotFound, not success and not ErrConflict.
func testDeleteCASMissing(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	if err := kv.DeleteCAS(c, p+"never", 1); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("DeleteCAS of a missing key: %v, want ErrNotFound", err)
	}
	if err := kv.CAS(c, p+"d", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(c, p+"d")
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.DeleteCAS(c, p+"d", e.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	if err := kv.DeleteCAS(c, p+"d", e.ModifyIndex); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("second DeleteCAS: %v, want ErrNotFound", err)
	}
}

// List of a prefix with no keys is empty, not an error.
func testListEmpty(t *testing.T, kv meta.KV, p string) {
	es, _, err := kv.List(ctx(t), p+"none/")
	if err != nil || len(es) != 0 {
		t.Fatalf("List of an empty prefix: %+v %v", es, err)
	}
}

// Deleting keys under the prefix wakes a watcher.
func testWatchSeesDelete(t *testing.T, kv meta.KV, p string) {
	c := ctx(t)
	const n = 100
	for i := range n {
		if err := kv.CAS(c, fmt.Sprintf("%sk%03d", p, i), nil, 0); err != nil {
			t.Fatal(err)
		}
	}
	_, idx, err := kv.List(c, p)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := kv.Watch(c, p, idx); errc <- err }()
	// Keep deleting until the watcher returns.
	for i := range n {
		e, err := kv.Get(c, fmt.Sprintf("%sk%03d", p, i))
		if err != nil {
			t.Fatal(err)
		}
		if err := kv.DeleteCAS(c, e.Key, e.ModifyIndex); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("Watch never woke up on deletions")
}

// testCASGuarded: the write lands only while both the key and the guard
// are where the caller read them; a moved guard or key changes nothing.
func testCASGuarded(t *testing.T, kv meta.KV, p string) {
	cx := ctx(t)
	key, guard := p+"chunk", p+"record"
	for _, k := range []string{key, guard} {
		if err := kv.CAS(cx, k, []byte("v1"), 0); err != nil {
			t.Fatal(err)
		}
	}
	ek, _ := kv.Get(cx, key)
	eg, _ := kv.Get(cx, guard)
	if err := kv.CASGuarded(cx, key, []byte("v2"), ek.ModifyIndex, guard, eg.ModifyIndex); err != nil {
		t.Fatalf("guarded write with both indexes current: %v", err)
	}
	ek, _ = kv.Get(cx, key)
	// The guard moves (a lease renewal, a takeover): refused.
	if err := kv.CAS(cx, guard, []byte("v2"), eg.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	if err := kv.CASGuarded(cx, key, []byte("v3"), ek.ModifyIndex, guard, eg.ModifyIndex); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("guarded write after the guard moved: %v, want ErrConflict", err)
	}
	// The key moved: refused too.
	eg, _ = kv.Get(cx, guard)
	if err := kv.CASGuarded(cx, key, []byte("v3"), ek.ModifyIndex-1, guard, eg.ModifyIndex); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("guarded write with a stale key index: %v, want ErrConflict", err)
	}
	// A missing guard: refused.
	if err := kv.CASGuarded(cx, key, []byte("v3"), ek.ModifyIndex, p+"nosuch", 1); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("guarded write with a missing guard: %v, want ErrConflict", err)
	}
	if e, err := kv.Get(cx, key); err != nil || string(e.Value) != "v2" {
		t.Fatalf("key after refused writes: %q %v, want v2", e.Value, err)
	}
}
