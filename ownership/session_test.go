package ownership

import (
	"context"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

func openStore(t *testing.T) *meta.BoltKV {
	t.Helper()
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	return kv
}

// cutStore is a store whose session renewals can be made to fail as if
// it were unreachable.
type cutStore struct {
	*meta.BoltKV
	cut  atomic.Bool
	slow atomic.Int64 // a renewal takes this long (a store electing a leader)
	// gone: the next renewals answer "session gone" (a store restarting);
	// goneSaid counts those answers.
	gone, goneSaid atomic.Int32
}

// CreateSession keeps the store's session 10× the TTL, so that it
// outlives a cut longer than the node's TTL (Consul waits up to 2×).
func (c *cutStore) CreateSession(ctx context.Context, name string, ttl, delay time.Duration) (string, error) {
	if c.cut.Load() {
		return "", meta.ErrUnavailable
	}
	return c.BoltKV.CreateSession(ctx, name, 10*ttl, delay)
}

func (c *cutStore) RenewSession(ctx context.Context, id string) error {
	if c.cut.Load() {
		return meta.ErrUnavailable
	}
	if c.gone.Load() > 0 {
		c.gone.Add(-1)
		c.goneSaid.Add(1)
		return meta.ErrSessionGone
	}
	if d := time.Duration(c.slow.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return c.BoltKV.RenewSession(ctx, id)
}

// skewed is a clock minutes ahead of the process's.
type skewed struct{ d time.Duration }

func (s skewed) Now() time.Time { return time.Now().Add(s.d) }

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func run(t *testing.T, s *Session) context.CancelFunc {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return cancel
}

// A node whose renewals fail stops using its session TTL after its last
// successful renewal was sent, by its own clock, whatever that clock's
// wall time says; renewals that work again make it valid again (the
// store kept the session, so nobody else can hold its locks).
func TestSessionFencesWhenRenewalsFail(t *testing.T) {
	for _, skew := range []time.Duration{0, 7 * time.Minute, -7 * time.Minute} {
		t.Run(skew.String(), func(t *testing.T) {
			st := &cutStore{BoltKV: openStore(t)}
			const ttl = 600 * time.Millisecond
			s := NewSession(SessionConfig{Store: st, Name: "ukai:n1", TTL: ttl, LockDelay: LockDelayFor(ttl), Clock: skewed{skew}})
			run(t, s)
			waitFor(t, 5*time.Second, "a session", func() bool { return s.Current() != "" })
			id := s.Current()
			// Renewed every TTL/3: stays valid.
			time.Sleep(3 * ttl)
			if s.Current() != id {
				t.Fatalf("a renewed session lapsed")
			}
			st.cut.Store(true)
			cut := time.Now()
			lapsed := waitFor(t, 5*time.Second, "the session to lapse", func() bool { return s.Current() == "" })
			if lapsed > ttl+200*time.Millisecond {
				t.Fatalf("still valid %v after renewals began failing (ttl %v)", lapsed, ttl)
			}
			if time.Since(cut) < ttl/3 {
				t.Fatalf("lapsed %v after the cut: sooner than the renewal period allows", time.Since(cut))
			}
			st.cut.Store(false)
			waitFor(t, 5*time.Second, "the session back", func() bool { return s.Current() == id })
		})
	}
}

// The store invalidating the session (a peer destroyed it) fences
// everything at once and a new session is made.
func TestSessionLostAndReplaced(t *testing.T) {
	st := openStore(t)
	var lost atomic.Value
	s := NewSession(SessionConfig{Store: st, Name: "ukai:n1", TTL: 600 * time.Millisecond, LockDelay: 0,
		OnLost: func(id string) { lost.Store(id) }})
	run(t, s)
	waitFor(t, 5*time.Second, "a session", func() bool { return s.Current() != "" })
	id := s.Current()
	if ok, err := st.Acquire(context.Background(), "owners/x", []byte("n1"), id); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if err := st.DestroySession(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "OnLost", func() bool { v, _ := lost.Load().(string); return v == id })
	waitFor(t, 5*time.Second, "a new session", func() bool { c := s.Current(); return c != "" && c != id })
	if s.Valid(id) {
		t.Fatal("the invalidated session is still valid")
	}
}

// One "session gone" from the store, then renewals that work (Consul
// restarting: chaos seed 115) fence nothing: the session is not valid
// meanwhile (no I/O under it), the node asks again, and the renewal that
// works makes the same session valid again. Said twice, it is believed.
func TestSessionGoneOnceIsAskedAgain(t *testing.T) {
	st := &cutStore{BoltKV: openStore(t)}
	var lost atomic.Int32
	s := NewSession(SessionConfig{Store: st, Name: "ukai:n1", TTL: 900 * time.Millisecond, LockDelay: LockDelayFor(900 * time.Millisecond),
		OnLost: func(string) { lost.Add(1) }})
	run(t, s)
	waitFor(t, 5*time.Second, "a session", func() bool { return s.Current() != "" })
	id := s.Current()
	st.slow.Store(int64(200 * time.Millisecond)) // the renewal after the "gone" answers late
	st.gone.Store(1)
	// Not valid while in doubt (the next renewal takes 200 ms).
	waitFor(t, 5*time.Second, "the session not valid after the store said gone", func() bool { return !s.Valid(id) })
	st.slow.Store(0)
	waitFor(t, 5*time.Second, "the same session valid again", func() bool { return s.Current() == id })
	if lost.Load() != 0 {
		t.Fatalf("one \"gone\" fenced the node (OnLost %d times)", lost.Load())
	}
	// Said twice in a row: lost.
	st.gone.Store(2)
	waitFor(t, 5*time.Second, "OnLost", func() bool { return lost.Load() == 1 })
	if st.goneSaid.Load() != 3 {
		t.Fatalf("lost after %d \"gone\" answers, want the second of the pair", st.goneSaid.Load()-1)
	}
	if s.Valid(id) {
		t.Fatal("the session said gone twice is still valid")
	}
}

// A "gone" that comes after the session's time ran out by the node's own
// clock is believed at once: there is nothing left to keep.
func TestSessionGoneAfterLapseIsBelievedAtOnce(t *testing.T) {
	st := &cutStore{BoltKV: openStore(t)}
	var lostAt atomic.Int32
	const ttl = 600 * time.Millisecond
	s := NewSession(SessionConfig{Store: st, Name: "ukai:n1", TTL: ttl, LockDelay: LockDelayFor(ttl),
		OnLost: func(string) { lostAt.Store(st.goneSaid.Load()) }})
	run(t, s)
	waitFor(t, 5*time.Second, "a session", func() bool { return s.Current() != "" })
	st.cut.Store(true)
	waitFor(t, 5*time.Second, "the session to lapse", func() bool { return s.Current() == "" })
	st.gone.Store(5)
	st.cut.Store(false)
	waitFor(t, 5*time.Second, "OnLost", func() bool { return lostAt.Load() != 0 })
	if got := lostAt.Load(); got != 1 {
		t.Fatalf("OnLost after %d \"gone\" answers, want 1 (the session had lapsed)", got)
	}
}

// A restarted process takes its saved session back (its locks are still
// held); a gone one is replaced; Close destroys it and removes the file.
func TestSessionReusedAfterRestart(t *testing.T) {
	st := openStore(t)
	path := filepath.Join(t.TempDir(), "session")
	cfg := SessionConfig{Store: st, Name: "ukai:n1", TTL: 2 * time.Second, LockDelay: 0, Path: path}
	s1 := NewSession(cfg)
	stop := run(t, s1)
	waitFor(t, 5*time.Second, "a session", func() bool { return s1.Current() != "" })
	id := s1.Current()
	stop() // a crash: nothing given up
	s2 := NewSession(cfg)
	run(t, s2)
	waitFor(t, 5*time.Second, "the session", func() bool { return s2.Current() != "" })
	if s2.Current() != id {
		t.Fatalf("restart made session %s, want the saved %s", s2.Current(), id)
	}
	if err := s2.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := st.RenewSession(context.Background(), id); !errors.Is(err, meta.ErrSessionGone) {
		t.Fatalf("after Close: renew %v, want ErrSessionGone", err)
	}
	s3 := NewSession(cfg)
	run(t, s3)
	waitFor(t, 5*time.Second, "a new session", func() bool { return s3.Current() != "" })
	if s3.Current() == id {
		t.Fatal("a closed session was reused")
	}
}

// I/O that finds the node without a session gets an answer within about
// a second while the store is cut, and a session at once when it is back,
// without waiting for Run's next round.
func TestSessionEnsure(t *testing.T) {
	st := &cutStore{BoltKV: openStore(t)}
	st.cut.Store(true)
	s := NewSession(SessionConfig{Store: st, Name: "ukai:n1", TTL: 30 * time.Second, LockDelay: 0})
	run(t, s)
	for range 3 {
		start := time.Now()
		if id := s.Ensure(context.Background()); id != "" {
			t.Fatalf("Ensure with the store cut: %q", id)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Fatalf("Ensure with the store cut took %v", el)
		}
	}
	st.cut.Store(false)
	// Ensure's own attempts are one a second at most: past that, the
	// first call must find the store back (Run retries every second too,
	// so its attempt may be the one that worked).
	time.Sleep(ensureEvery)
	if id := s.Ensure(context.Background()); id == "" {
		t.Fatal("Ensure found no session once the store answered")
	}
}

// I/O that comes while a renewal is on its way to a store that answers
// slowly (Consul just restarted and electing) waits for that renewal
// instead of failing just before it lands (CI saw a write fail NOT READY
// 7 ms before the renewal answered, after a 1 s wait).
func TestSessionEnsureWaitsForSlowRenewal(t *testing.T) {
	st := &cutStore{BoltKV: openStore(t)}
	// Validity counts from a renewal's send: the TTL must outlast it.
	const ttl = 3 * time.Second
	s := NewSession(SessionConfig{Store: st, Name: "ukai:n1", TTL: ttl, LockDelay: 0})
	run(t, s)
	waitFor(t, 5*time.Second, "a session", func() bool { return s.Current() != "" })
	id := s.Current()
	st.cut.Store(true)
	waitFor(t, 5*time.Second, "the session to lapse", func() bool { return s.Current() == "" })
	st.slow.Store(int64(2 * time.Second))
	st.cut.Store(false)
	// Past the last refusal: whichever attempt comes first (Run's retry
	// or Ensure's own), it takes 2 s and works.
	time.Sleep(ensureEvery)
	start := time.Now()
	if got := s.Ensure(context.Background()); got != id {
		t.Fatalf("Ensure during a slow renewal returned %q after %v, want %s", got, time.Since(start), id)
	}
}
