package ownership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// Clock is the time a node decides by. Only differences of its readings
// are used (Go's monotonic clock rides along with time.Time), so a node
// whose wall clock is minutes off decides as if it were right.
type Clock interface{ Now() time.Time }

// SystemClock is the process's clock.
type SystemClock struct{}

// Now implements Clock.
func (SystemClock) Now() time.Time { return time.Now() }

// SessionConfig configures a Session.
type SessionConfig struct {
	Store meta.Locker
	// Name names the session in the store ("ukai:<node>").
	Name string
	// TTL: the store invalidates the session when not renewed for TTL;
	// the node itself stops using it TTL after it sent its last
	// successful renewal. Renewed every TTL/3.
	TTL time.Duration
	// LockDelay is how long the store keeps an invalidated session's
	// locks from everyone. At least TTL (a peer may destroy the session
	// of a node it saw die while that node, cut off, still serves until
	// its own TTL runs out); see LockDelayFor.
	LockDelay time.Duration
	// Path keeps the session id across restarts of the process, so that
	// a restarted node finds its locks still held (its previous process
	// is gone: nothing else uses them). "" keeps nothing.
	Path string
	// Clock; SystemClock when nil.
	Clock Clock
	Log   *slog.Logger
	// OnLost is called when the store invalidated the session: every
	// lock it held is gone, and whatever the node served under it must
	// stop.
	OnLost func(id string)
}

// LockDelayFor is the lock delay for a TTL: the TTL and a tenth more, for
// the clock rates of the node and the store and I/O already past the
// node's check when its TTL ends (copies fence those by generation too).
func LockDelayFor(ttl time.Duration) time.Duration { return ttl + ttl/10 }

// Session keeps one store session alive for the node.
type Session struct {
	cfg SessionConfig

	try chan struct{} // one attempt to create or renew at a time (Run, Ensure); capacity 1

	mu         sync.Mutex
	id         string
	validUntil time.Time // by cfg.Clock: last successful renewal sent + TTL
	failing    bool      // renewals failing (logged once)
	gone       bool      // the store said "gone" once: not valid; a second answer confirms it
	lastEnsure time.Time // Ensure's last own attempt
	renewals   int64     // successful renewals
}

// Renewals is the number of renewals that succeeded since the session
// started.
func (s *Session) Renewals() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.renewals
}

// NewSession returns a Session; Run creates (or reuses) and renews it.
func NewSession(cfg SessionConfig) *Session {
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.OnLost == nil {
		cfg.OnLost = func(string) {}
	}
	return &Session{cfg: cfg, try: make(chan struct{}, 1)}
}

// Current returns the session id while the node may act on it: the last
// successful renewal was sent less than TTL ago. "" otherwise.
func (s *Session) Current() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.id == "" || s.gone || !s.cfg.Clock.Now().Before(s.validUntil) {
		return ""
	}
	return s.id
}

// Valid says whether id is the session and is valid now.
func (s *Session) Valid(id string) bool { return id != "" && s.Current() == id }

// Run creates the session (or takes the one a previous process left, if
// the store still has it) and renews it every TTL/3 until ctx ends. It
// retries with backoff while the store is unreachable.
func (s *Session) Run(ctx context.Context) {
	every := s.cfg.TTL / 3
	for ctx.Err() == nil {
		err := s.attempt(ctx)
		wait := every
		if err != nil && ctx.Err() == nil {
			// Try again sooner: the session may still be saved.
			wait = min(every, time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
}

// attempt creates the session when there is none, else renews it.
func (s *Session) attempt(ctx context.Context) error {
	if !s.lockTry(ctx) {
		return ctx.Err()
	}
	defer s.unlockTry()
	return s.attemptLocked(ctx)
}

func (s *Session) attemptLocked(ctx context.Context) error {
	s.mu.Lock()
	id := s.id
	s.mu.Unlock()
	if id == "" {
		return s.start(ctx)
	}
	return s.renew(ctx, id)
}

// Ensure returns the session if valid now; otherwise it makes one attempt
// to create or renew it at once (I/O that finds the node without a valid
// session, e.g. right after the store came back, need not wait for Run's
// next round), and returns the session if that worked, "" if not.
//
// An attempt already running (Run's, or another Ensure's) is waited for
// rather than raced: up to ensureTimeout, about as long as one request to
// the store may take. A store that just came back can hold a renewal for
// a second or more while it elects a leader; with a 1 s wait, a write
// that came 7 ms before such a renewal answered failed NOT READY although
// the store already took other requests (CI, TestConsulOutageKeepsIOGoing).
// Ensure makes at most one attempt of its own per ensureEvery: I/O on a
// node whose store refuses connections gets its NOT READY at once, and a
// cut store sees at most about one attempt a second from it. Its own, not
// Run's: an attempt of Run's that failed when a partition healed (its
// connection closed) must not keep the first I/O after the heal from
// trying (chaos seed 2: `image verify` refused right after the heal).
func (s *Session) Ensure(ctx context.Context) string {
	if id := s.Current(); id != "" {
		return id
	}
	ctx, cancel := context.WithTimeout(ctx, ensureTimeout)
	defer cancel()
	if !s.lockTry(ctx) {
		return s.Current() // the attempt that held it may have worked
	}
	defer s.unlockTry()
	if id := s.Current(); id != "" {
		return id
	}
	s.mu.Lock()
	recent := !s.lastEnsure.IsZero() && s.cfg.Clock.Now().Sub(s.lastEnsure) < ensureEvery
	if !recent {
		s.lastEnsure = s.cfg.Clock.Now()
	}
	s.mu.Unlock()
	if recent {
		return ""
	}
	_ = s.attemptLocked(ctx)
	return s.Current()
}

const (
	ensureEvery   = time.Second
	ensureTimeout = 5 * time.Second
)

func (s *Session) lockTry(ctx context.Context) bool {
	select {
	case s.try <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

func (s *Session) unlockTry() { <-s.try }

// start reuses the saved session or creates one.
func (s *Session) start(ctx context.Context) error {
	if id := s.saved(); id != "" {
		switch err := s.renew(ctx, id); {
		case err == nil:
			s.cfg.Log.Info("ownership session of the previous process still valid: its locks are kept", "session", id)
			return nil
		case !errors.Is(err, meta.ErrSessionGone):
			return err
		}
	}
	// The TTL runs from when the request was sent: the store started it
	// later than that, however long the answer took.
	sent := s.cfg.Clock.Now()
	id, err := s.cfg.Store.CreateSession(ctx, s.cfg.Name, s.cfg.TTL, s.cfg.LockDelay)
	if err != nil {
		s.cfg.Log.Warn("cannot create the ownership session; retrying", "err", err)
		return err
	}
	s.save(id)
	s.mu.Lock()
	s.id, s.validUntil, s.failing, s.gone = id, sent.Add(s.cfg.TTL), false, false
	s.mu.Unlock()
	s.cfg.Log.Info("ownership session created", "session", id, "ttl", s.cfg.TTL, "lock_delay", s.cfg.LockDelay)
	return nil
}

// renew renews id; on success the node may act on it for TTL from the
// moment the request was sent (the store restarted its TTL later than
// that).
func (s *Session) renew(ctx context.Context, id string) error {
	sent := s.cfg.Clock.Now()
	err := s.cfg.Store.RenewSession(ctx, id)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case err == nil:
		if s.failing {
			s.cfg.Log.Info("ownership session renewed again", "session", id)
		}
		s.id, s.validUntil, s.failing, s.gone = id, sent.Add(s.cfg.TTL), false, false
		s.renewals++
		return nil
	case errors.Is(err, meta.ErrSessionGone):
		if s.id != id {
			return err
		}
		// Believed only when said twice in a row, or once the session's
		// time is up anyway. Consul answers "not found" for a moment
		// while it restarts (chaos seed 115: a renewal said gone, the
		// next one, 1 s later, renewed the same session), and believing
		// the first answer fenced every image of the node and made it
		// take each one again. Meanwhile the session is not valid (Current
		// is ""): no I/O runs under it, initiators get NOT READY and
		// retry, exactly as when renewals fail; the next answer either
		// renews it (I/O goes on, nothing retaken) or confirms it gone.
		if !s.gone && sent.Before(s.validUntil) {
			s.gone = true
			s.cfg.Log.Warn("the store says this node's ownership session is gone; I/O waits while it is asked again", "session", id)
			return err
		}
		s.cfg.Log.Error("the store invalidated this node's ownership session: every image owned under it is fenced", "session", id)
		s.id, s.validUntil, s.gone = "", time.Time{}, false
		s.mu.Unlock()
		s.cfg.OnLost(id)
		s.mu.Lock()
		return err
	default:
		if !s.failing {
			s.failing = true
			left := time.Duration(0)
			if !s.validUntil.IsZero() {
				left = max(0, s.validUntil.Sub(s.cfg.Clock.Now()).Round(time.Millisecond))
			}
			s.cfg.Log.Warn("cannot renew the ownership session; images stay served until its TTL runs out", "session", id, "left", left, "err", err)
		}
		return err
	}
}

// Close gives the session up: the store frees its remaining locks (with
// the lock delay; the node releases the locks it can first, which frees
// them at once) and the saved id is removed.
func (s *Session) Close(ctx context.Context) error {
	s.mu.Lock()
	id := s.id
	s.id, s.validUntil, s.gone = "", time.Time{}, false
	s.mu.Unlock()
	if id == "" {
		return nil
	}
	if err := s.cfg.Store.DestroySession(ctx, id); err != nil {
		return fmt.Errorf("destroy the ownership session: %w", err)
	}
	if s.cfg.Path != "" {
		_ = os.Remove(s.cfg.Path)
	}
	return nil
}

func (s *Session) saved() string {
	if s.cfg.Path == "" {
		return ""
	}
	b, err := os.ReadFile(s.cfg.Path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func (s *Session) save(id string) {
	if s.cfg.Path == "" {
		return
	}
	tmp := s.cfg.Path + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o600); err == nil {
		err = os.Rename(tmp, s.cfg.Path)
		if err == nil {
			return
		}
	}
	s.cfg.Log.Warn("cannot save the ownership session id; a restart will wait for its lock delay", "path", s.cfg.Path)
}
