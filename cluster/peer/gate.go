package peer

import (
	"context"
	"fmt"
	"sync"
)

// Fencing orders the writes a copy applies against the syncs of its
// blocks. An owner's write to a remote copy can time out while the
// request is still on its way (in a socket buffer, queued behind other
// requests, or in a stalled pwrite); the owner then records the copy out
// of sync and the synchronizer later copies the block to it and records
// it in sync. Without fencing, the late write could land after that copy
// and overwrite newer data on a copy that is recorded in sync: a silent
// divergence no read would notice.
//
// Every write and unmap carries the writer's epoch of the copy (Ref.Epoch;
// generation first, then epoch). Before it syncs a block to a copy that
// may have writes in flight, the owner raises its epoch and sends a
// fence: the copy refuses every later write older than the fence
// (ErrStaleEpoch), and answers the fence only once the older writes it had
// already accepted are applied. Whatever the owner copies after that
// cannot be overwritten by what it sent before.

// epoch orders writes: generation first, then the writer's epoch.
type epoch struct{ gen, n uint64 }

func (a epoch) less(b epoch) bool { return a.gen < b.gen || a.gen == b.gen && a.n < b.n }

// gate is one image's fence on this node's copy.
type gate struct {
	mu       sync.Mutex
	floor    epoch
	inflight map[epoch]int // writes being applied, by epoch
	changed  chan struct{} // closed (and replaced) when a count drops to 0
}

// enter admits a write of (gen, n) unless it is older than the fence; the
// caller calls leave once the write is applied (or failed).
func (g *gate) enter(gen, n uint64) (leave func(), err error) {
	e := epoch{gen, n}
	g.mu.Lock()
	defer g.mu.Unlock()
	if e.less(g.floor) {
		return nil, fmt.Errorf("%w: epoch %d/%d, fenced at %d/%d", ErrStaleEpoch, gen, n, g.floor.gen, g.floor.n)
	}
	g.inflight[e]++
	return func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.inflight[e]--; g.inflight[e] == 0 {
			delete(g.inflight, e)
			close(g.changed)
			g.changed = make(chan struct{})
		}
	}, nil
}

// fence raises the floor to (gen, n) and waits, within ctx, until no
// write older than it is being applied. A fence older than the floor
// (the same owner's fences arriving out of order) leaves the floor where
// it is: it only waits for the writes older than itself. (An older
// generation never gets here: the Store refuses it first.)
func (g *gate) fence(ctx context.Context, gen, n uint64) error {
	e := epoch{gen, n}
	g.mu.Lock()
	if g.floor.less(e) {
		g.floor = e
	}
	for {
		older := false
		for k := range g.inflight {
			if k.less(e) {
				older = true
				break
			}
		}
		if !older {
			g.mu.Unlock()
			return nil
		}
		ch := g.changed
		g.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("fence: writes before it still being applied: %w", context.Cause(ctx))
		}
		g.mu.Lock()
	}
}

// gates holds the gate of every image a peer wrote to or fenced on this
// node (at most one per copy the node holds: ids are checked by the Store
// first).
type gates struct {
	mu sync.Mutex
	m  map[string]*gate
}

func (gs *gates) get(id string) *gate {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if gs.m == nil {
		gs.m = map[string]*gate{}
	}
	g := gs.m[id]
	if g == nil {
		g = &gate{inflight: map[epoch]int{}, changed: make(chan struct{})}
		gs.m[id] = g
	}
	return g
}

// Fence fences this node's own copy of ref.ID at (ref.Gen, ref.Epoch)
// (see gate.fence): a new owner syncing into its local copy uses it, so
// that no older writer's request, already admitted, lands after.
func (s *Server) Fence(ctx context.Context, ref Ref) error {
	return s.gates.get(ref.ID).fence(ctx, ref.Gen, ref.Epoch)
}

// Forget drops the gate of an image whose copy left this node.
func (s *Server) Forget(id string) {
	s.gates.mu.Lock()
	delete(s.gates.m, id)
	s.gates.mu.Unlock()
}
