package lun

import (
	"context"
	"sync"
)

// rangeLocks orders overlapping writes. Block locks are shared among
// writes, so two writes to the same bytes used to fan out to the copies at
// the same time, and each copy applied them in its own order: the copies
// then held different data, all "in sync", and nothing noticed until a
// verify (found by the chaos harness, seed 2: two initiators writing the
// same 4 KiB within 40 us, the owner's local copy kept the first, the
// remote ones the second). An overlapping write now waits until the
// earlier one has reached every copy, so every copy sees the same order.
// Writes to different bytes, even in one block, still run in parallel.
//
// The set of held ranges is a plain list: it holds at most the writes in
// flight on the volume (queue depths, not image sizes), and a write scans
// it once.
type rangeLocks struct {
	mu   sync.Mutex
	held []*heldRange
}

type heldRange struct {
	lo, hi int64 // [lo, hi)
	done   chan struct{}
}

// lock waits until no held range overlaps [lo, hi), holds it, and
// returns the unlock; or ctx's error.
func (r *rangeLocks) lock(ctx context.Context, lo, hi int64) (func(), error) {
	for {
		r.mu.Lock()
		var conflict *heldRange
		for _, h := range r.held {
			if h.lo < hi && lo < h.hi {
				conflict = h
				break
			}
		}
		if conflict == nil {
			h := &heldRange{lo: lo, hi: hi, done: make(chan struct{})}
			r.held = append(r.held, h)
			r.mu.Unlock()
			return func() { r.release(h) }, nil
		}
		r.mu.Unlock()
		select {
		case <-conflict.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (r *rangeLocks) release(h *heldRange) {
	r.mu.Lock()
	for i, x := range r.held {
		if x == h {
			last := len(r.held) - 1
			r.held[i] = r.held[last]
			r.held[last] = nil
			r.held = r.held[:last]
			break
		}
	}
	r.mu.Unlock()
	close(h.done)
}
