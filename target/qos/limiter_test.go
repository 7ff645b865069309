package qos

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock the test moves; started tells of every timer.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	timers  []*fakeTimer
	started chan time.Duration
}

type fakeTimer struct {
	at      time.Time
	c       chan time.Time
	stopped bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: t0, started: make(chan time.Duration, 100)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Timer(d time.Duration) (<-chan time.Time, func() bool) {
	c.mu.Lock()
	ft := &fakeTimer{at: c.now.Add(d), c: make(chan time.Time, 1)}
	c.timers = append(c.timers, ft)
	c.mu.Unlock()
	c.started <- d
	return ft.c, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := !ft.stopped
		ft.stopped = true
		return was
	}
}

// advance moves the clock and fires the timers due.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, ft := range c.timers {
		if ft.stopped {
			continue
		}
		if !ft.at.After(c.now) {
			ft.c <- c.now
			ft.stopped = true
			continue
		}
		kept = append(kept, ft)
	}
	c.timers = kept
}

// waitTimer waits until a waiting I/O started its timer and returns its
// duration.
func (c *fakeClock) waitTimer(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-c.started:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no I/O started waiting")
		return 0
	}
}

// goWait runs Wait in a goroutine; its result arrives on the channel.
func goWait(ctx context.Context, l *Limiter, op Op, bytes int64) <-chan error {
	done := make(chan error, 1)
	go func() { done <- l.Wait(ctx, op, bytes) }()
	return done
}

// notYet fails if done already received: an I/O that ran too early runs
// within the grace period.
func notYet(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("%s ran early (err %v)", what, err)
	case <-time.After(100 * time.Millisecond):
	}
}

func mustDone(t *testing.T, done <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s still waits", what)
		return nil
	}
}

func TestUnlimitedCostsNothing(t *testing.T) {
	l := New(newFakeClock())
	ctx := context.Background()
	if n := testing.AllocsPerRun(1000, func() { _ = l.Wait(ctx, Write, 4096) }); n != 0 {
		t.Fatalf("an unlimited Wait allocates %v times", n)
	}
	var none *Limiter
	if err := none.Wait(ctx, Read, 1); err != nil || !none.Limits().Zero() {
		t.Fatalf("a nil limiter: %v", err)
	}
	// Within the burst, a limited image does not allocate either.
	l.Set(Limits{IOPS: Rate{Limit: 1 << 40}})
	if n := testing.AllocsPerRun(1000, func() { _ = l.Wait(ctx, Write, 4096) }); n != 0 {
		t.Fatalf("a Wait within the burst allocates %v times", n)
	}
}

func TestWaitHoldsUntilItsTime(t *testing.T) {
	clk := newFakeClock()
	l := New(clk)
	l.Set(Limits{WriteIOPS: Rate{Limit: 10, Burst: 1}})
	ctx := context.Background()
	if err := l.Wait(ctx, Write, 4096); err != nil {
		t.Fatal(err)
	}
	done := goWait(ctx, l, Write, 4096)
	if d := clk.waitTimer(t); d != 100*time.Millisecond {
		t.Fatalf("second write waits %v, want 100ms", d)
	}
	clk.advance(99 * time.Millisecond)
	notYet(t, done, "the second write")
	// A read is not held behind the waiting write.
	if err := mustDone(t, goWait(ctx, l, Read, 4096), "a read"); err != nil {
		t.Fatal(err)
	}
	clk.advance(time.Millisecond)
	if err := mustDone(t, done, "the second write"); err != nil {
		t.Fatalf("a delayed write failed: %v", err)
	}
}

func TestWaitEndsWithItsContext(t *testing.T) {
	clk := newFakeClock()
	l := New(clk)
	l.Set(Limits{IOPS: Rate{Limit: 1, Burst: 1}})
	l.Wait(context.Background(), Read, 512)
	ctx, cancel := context.WithCancel(context.Background())
	done := goWait(ctx, l, Read, 512)
	clk.waitTimer(t)
	cancel()
	if err := mustDone(t, done, "the cancelled read"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v, want context.Canceled", err)
	}
	// Its reservation was the last: given back, the next read waits 1 s,
	// not 2 s.
	done = goWait(context.Background(), l, Read, 512)
	if d := clk.waitTimer(t); d != time.Second {
		t.Fatalf("after a cancelled read the next waits %v, want 1s", d)
	}
	clk.advance(time.Second)
	mustDone(t, done, "the read after")
}

// TestWritesKeepTheirOrder: a write arriving after the limit was raised
// would be due before one still waiting under the old limit; it waits for
// it. A cancelled write keeps the queue too.
func TestWritesKeepTheirOrder(t *testing.T) {
	clk := newFakeClock()
	l := New(clk)
	l.Set(Limits{WriteIOPS: Rate{Limit: 1, Burst: 1}})
	ctx := context.Background()
	l.Wait(ctx, Write, 512)
	order := make(chan int, 3)
	run := func(ctx context.Context, i int) <-chan error {
		done := make(chan error, 1)
		go func() {
			err := l.Wait(ctx, Write, 512)
			if err == nil {
				order <- i
			}
			done <- err
		}()
		return done
	}
	w2 := run(ctx, 2)
	if d := clk.waitTimer(t); d != time.Second {
		t.Fatalf("w2 waits %v", d)
	}
	l.Set(Limits{WriteIOPS: Rate{Limit: 1000, Burst: 1}})
	cctx, cancel := context.WithCancel(ctx)
	w3 := run(cctx, 3)
	clk.waitTimer(t)
	w4 := run(ctx, 4)
	clk.waitTimer(t)
	clk.advance(10 * time.Millisecond) // w3's and w4's times, not w2's
	notYet(t, w4, "a write behind an earlier waiting one")
	cancel()
	if err := mustDone(t, w3, "w3"); !errors.Is(err, context.Canceled) {
		t.Fatalf("w3: %v", err)
	}
	notYet(t, w4, "a write behind a cancelled one behind a waiting one")
	clk.advance(time.Second)
	mustDone(t, w2, "w2")
	mustDone(t, w4, "w4")
	if a, b := <-order, <-order; a != 2 || b != 4 {
		t.Fatalf("writes ran in the order %d, %d", a, b)
	}
}

// TestRemovingLimitsReleasesWaiters: waiting I/O runs at once when the
// limits go, and the limiter is off again afterwards.
func TestRemovingLimitsReleasesWaiters(t *testing.T) {
	clk := newFakeClock()
	l := New(clk)
	l.Set(Limits{BPS: Rate{Limit: 1 << 20}})
	ctx := context.Background()
	l.Wait(ctx, Write, 1<<20)
	done := goWait(ctx, l, Write, 1<<20)
	if d := clk.waitTimer(t); d != time.Second {
		t.Fatalf("waits %v", d)
	}
	l.Set(Limits{})
	if err := mustDone(t, done, "a write after the limits were removed"); err != nil {
		t.Fatal(err)
	}
	if l.on.Load() {
		t.Fatal("the limiter is still on without limits or waiters")
	}
	// Setting the same limits twice does not wake a waiter early.
	l.Set(Limits{IOPS: Rate{Limit: 1, Burst: 1}})
	l.Wait(ctx, Read, 1)
	done = goWait(ctx, l, Read, 1)
	clk.waitTimer(t)
	l.Set(Limits{IOPS: Rate{Limit: 1, Burst: 1}})
	l.Set(Limits{IOPS: Rate{Limit: 1, Burst: 1}, WriteBPS: Rate{Limit: 1 << 30}})
	notYet(t, done, "a read after an unrelated change")
	clk.advance(time.Second)
	mustDone(t, done, "the read")
}
