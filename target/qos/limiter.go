package qos

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
)

// Limiter applies one image's limits to its I/O. It is safe for
// concurrent use; a nil *Limiter limits nothing.
//
// Lock order: mu is a leaf, held only to compute a reservation or change
// the limits, never while an I/O waits.
type Limiter struct {
	clock Clock
	// on: limits are set or I/O still waits; off, Wait returns at once.
	on atomic.Bool

	mu sync.Mutex
	b  Buckets
	// tail is, per direction, the channel the last waiting I/O closes
	// when it may run: the next one waits for it too, so none overtakes
	// an earlier one of its direction. nil or closed: nobody waits.
	tail    [2]chan struct{}
	waiting int
	// changed is closed (and replaced) when the limits change: waiting
	// I/O runs at once when they were removed.
	changed chan struct{}
}

// New returns a limiter without limits reading clock (nil: the system
// clock).
func New(clock Clock) *Limiter {
	if clock == nil {
		clock = SystemClock{}
	}
	return &Limiter{clock: clock, changed: make(chan struct{})}
}

// Set changes the limits; I/O already waiting keeps its turn (and runs at
// once if the limits were removed).
func (l *Limiter) Set(lim Limits) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if lim == l.b.Limits() {
		return
	}
	l.b.Set(l.clock.Now(), lim)
	close(l.changed)
	l.changed = make(chan struct{})
	l.on.Store(!lim.Zero() || l.waiting > 0)
}

// Limits returns the limits in force.
func (l *Limiter) Limits() Limits {
	if l == nil {
		return Limits{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Limits()
}

// Waiting is the number of I/O waiting for their turn.
func (l *Limiter) Waiting() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.waiting
}

// Wait returns when an I/O of op and size bytes may run under the
// limits, or with an error wrapping ctx.Err() when ctx ends first (the
// I/O is then not to run). It never fails otherwise.
func (l *Limiter) Wait(ctx context.Context, op Op, bytes int64) error {
	if l == nil || !l.on.Load() {
		return nil
	}
	return l.wait(ctx, op, bytes)
}

func (l *Limiter) wait(ctx context.Context, op Op, bytes int64) error {
	l.mu.Lock()
	now := l.clock.Now()
	r := l.b.Reserve(now, op, bytes)
	prev := l.tail[op]
	if prev != nil && isClosed(prev) {
		prev, l.tail[op] = nil, nil
	}
	if !r.At.After(now) && prev == nil {
		l.mu.Unlock()
		return nil
	}
	mine := make(chan struct{})
	l.tail[op] = mine
	l.waiting++
	changed := l.changed
	l.mu.Unlock()
	defer l.leave()

	if d := r.At.Sub(now); d > 0 {
		c, stop := l.clock.Timer(d)
		defer stop()
	timer:
		for {
			select {
			case <-c:
				break timer
			case <-changed:
				changed = nil
				if l.Limits().Zero() {
					break timer
				}
			case <-ctx.Done():
				return l.abandon(ctx, r, prev, mine)
			}
		}
	}
	if prev != nil {
		select {
		case <-prev:
		case <-ctx.Done():
			return l.abandon(ctx, r, prev, mine)
		}
	}
	close(mine)
	return nil
}

// abandon gives back an I/O's reservation when it will not run, and
// keeps the queue: its place opens once the I/O before it runs.
func (l *Limiter) abandon(ctx context.Context, r Reservation, prev, mine chan struct{}) error {
	l.mu.Lock()
	l.b.Cancel(r)
	l.mu.Unlock()
	if prev == nil || isClosed(prev) {
		close(mine)
	} else {
		go func() { <-prev; close(mine) }()
	}
	return fmt.Errorf("waiting for the image's QoS limit: %w", ctx.Err())
}

// leave counts a waiting I/O out; the last one turns the limiter off when
// there are no limits left.
func (l *Limiter) leave() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.waiting--
	if l.waiting == 0 && l.b.Limits().Zero() {
		l.on.Store(false)
	}
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
