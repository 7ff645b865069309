package scsi

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// cawLock makes COMPARE AND WRITE atomic with respect to other writes
// without serializing ordinary writes.
//
// Ordinary writes announce themselves in the inflight counter and, while
// no COMPARE AND WRITE is pending, proceed without any lock (one atomic
// add each way). A COMPARE AND WRITE first raises pending, waits for the
// lock-free writers to drain, then takes its range exclusively; writes
// arriving while pending is raised take their range shared, so they only
// wait for a COMPARE AND WRITE that overlaps them. The counters are
// sequentially consistent, so a writer and a COMPARE AND WRITE starting
// together always see each other (Dekker).
type cawLock struct {
	inflight atomic.Int64
	pending  atomic.Int32

	mu   sync.Mutex
	cond sync.Cond
	held []*lockedRange
	// waiting exclusive ranges: a shared range that overlaps one waits
	// behind it, so that a steady stream of writes cannot starve a
	// COMPARE AND WRITE (or HoldWrites over the whole LU: 8 writers in a
	// loop kept one waiting for more than 3 s before this).
	waiting []*lockedRange
}

type lockedRange struct {
	start, end uint64 // block range [start, end)
	excl       bool
}

func (c *cawLock) init() { c.cond.L = &c.mu }

// writeLock is taken by every command that writes blocks [start, end).
// The returned handle goes to writeUnlock.
func (c *cawLock) writeLock(start, end uint64) *lockedRange {
	c.inflight.Add(1)
	if c.pending.Load() == 0 {
		return nil
	}
	c.inflight.Add(-1)
	return c.lock(start, end, false)
}

func (c *cawLock) writeUnlock(r *lockedRange) {
	if r == nil {
		c.inflight.Add(-1)
		return
	}
	c.unlock(r)
}

// cawLockRange takes [start, end) exclusively for a COMPARE AND WRITE.
func (c *cawLock) cawLockRange(start, end uint64) *lockedRange {
	c.pending.Add(1)
	for d := time.Microsecond; c.inflight.Load() != 0; {
		time.Sleep(d)
		if d < time.Millisecond {
			d *= 2
		}
	}
	return c.lock(start, end, true)
}

// HoldWrites waits for the writes and COMPARE AND WRITEs running through
// the LU to finish and holds new ones until release. A revert rewriting
// the whole image takes it, so that no COMPARE AND WRITE compares before
// the revert and writes after it.
func (lu *LU) HoldWrites() (release func()) {
	h := lu.caw.cawLockRange(0, math.MaxUint64)
	var once sync.Once
	return func() { once.Do(func() { lu.caw.cawUnlock(h) }) }
}

func (c *cawLock) cawUnlock(r *lockedRange) {
	c.unlock(r)
	c.pending.Add(-1)
}

func (c *cawLock) lock(start, end uint64, excl bool) *lockedRange {
	r := &lockedRange{start: start, end: end, excl: excl}
	c.mu.Lock()
	if excl {
		c.waiting = append(c.waiting, r)
	}
	for c.conflicts(r) || !excl && c.yields(r) {
		c.cond.Wait()
	}
	if excl {
		for i, w := range c.waiting {
			if w == r {
				c.waiting = append(c.waiting[:i], c.waiting[i+1:]...)
				break
			}
		}
	}
	c.held = append(c.held, r)
	c.mu.Unlock()
	return r
}

// yields says whether shared range r waits behind an exclusive one.
func (c *cawLock) yields(r *lockedRange) bool {
	for _, w := range c.waiting {
		if w.start < r.end && r.start < w.end {
			return true
		}
	}
	return false
}

func (c *cawLock) conflicts(r *lockedRange) bool {
	for _, h := range c.held {
		if (h.excl || r.excl) && h.start < r.end && r.start < h.end {
			return true
		}
	}
	return false
}

func (c *cawLock) unlock(r *lockedRange) {
	c.mu.Lock()
	for i, h := range c.held {
		if h == r {
			last := len(c.held) - 1
			c.held[i] = c.held[last]
			c.held[last] = nil
			c.held = c.held[:last]
			break
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
}
