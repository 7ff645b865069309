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
	changed  chan struct{} // closed (and replaced) when a count drops to 0 while someone waits
	waiters  int           // drainLocked calls waiting on changed
}

// enter admits a write of (gen, n) unless it is older than the fence; the
// caller calls leave once the write is applied (or failed).
//
// The first write of a newer generation (a new owner) is a fence too: it
// raises the floor to its generation and waits, within ctx, for the
// writes of older generations already admitted. Otherwise the generation
// check (the Store's, at the request's start) and the write's landing
// would be apart: a former owner's write admitted before the new owner's
// first write could land after it. The owner's own writes to its local
// copy come through here too (Server.Admit), and there that gap was
// unbounded: a write that passed the owner's checks and then waited (for
// a block lock, for the activity log's record in the store, for the
// process to be resumed) landed on the deposed owner's copy after the new
// owner had written the block there, a copy recorded in sync (chaos
// seed 111: a stale read 3 s after two newer acknowledged writes).
func (g *gate) enter(ctx context.Context, gen, n uint64) (leave func(), err error) {
	e := epoch{gen, n}
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.admissible(e); err != nil {
		return nil, err
	}
	if gen > g.floor.gen {
		g.floor = epoch{gen: gen}
		if err := g.drainLocked(ctx, g.floor); err != nil {
			return nil, err
		}
		if err := g.admissible(e); err != nil { // a fence came while it waited
			return nil, err
		}
	}
	g.inflight[e]++
	return func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.inflight[e]--; g.inflight[e] == 0 {
			delete(g.inflight, e)
			if g.waiters > 0 { // a channel per write costs the owner's local writes 0.2 us
				close(g.changed)
				g.changed = make(chan struct{})
			}
		}
	}, nil
}

// admissible says why a write of e is refused, if it is: an older
// generation than the floor's (a newer owner wrote or fenced), or an older
// epoch of the floor's generation (the owner fenced since).
func (g *gate) admissible(e epoch) error {
	switch {
	case e.gen < g.floor.gen:
		return fmt.Errorf("%w: generation %d, a newer owner's %d came first", ErrStaleGeneration, e.gen, g.floor.gen)
	case e.less(g.floor):
		return fmt.Errorf("%w: epoch %d/%d, fenced at %d/%d", ErrStaleEpoch, e.gen, e.n, g.floor.gen, g.floor.n)
	}
	return nil
}

// fence raises the floor to (gen, n) and waits, within ctx, until no
// write older than it is being applied. A fence older than the floor
// (the same owner's fences arriving out of order) leaves the floor where
// it is: it only waits for the writes older than itself. (An older
// generation never gets here: the Store refuses it first.)
func (g *gate) fence(ctx context.Context, gen, n uint64) error {
	e := epoch{gen, n}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.floor.less(e) {
		g.floor = e
	}
	return g.drainLocked(ctx, e)
}

// drainLocked waits, within ctx, until no write older than e is being
// applied. g.mu is held on entry and on return; it is let go while
// waiting.
func (g *gate) drainLocked(ctx context.Context, e epoch) error {
	for {
		older := false
		for k := range g.inflight {
			if k.less(e) {
				older = true
				break
			}
		}
		if !older {
			return nil
		}
		ch := g.changed
		g.waiters++
		g.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			g.mu.Lock()
			g.waiters--
			return fmt.Errorf("fence: writes before it still being applied: %w", context.Cause(ctx))
		}
		g.mu.Lock()
		g.waiters--
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

// Admit admits a write of this node's own to its copy of ref.ID, as the
// owner (ref.Gen; ref.Epoch 0 for local writes), through the same gate as
// its peers' writes (see gate.enter): it is refused when a newer owner
// wrote to the copy or fenced it. leave is called once the write is
// applied or failed.
func (s *Server) Admit(ctx context.Context, ref Ref) (leave func(), err error) {
	return s.gates.get(ref.ID).enter(ctx, ref.Gen, ref.Epoch)
}

// Generation is the newest generation this node's copy of id has admitted
// a write of, or been fenced at (0: none).
func (s *Server) Generation(id string) uint64 {
	s.gates.mu.Lock()
	g := s.gates.m[id]
	s.gates.mu.Unlock()
	if g == nil {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.floor.gen
}

// Forget drops the gate of an image whose copy left this node.
func (s *Server) Forget(id string) {
	s.gates.mu.Lock()
	delete(s.gates.m, id)
	s.gates.mu.Unlock()
}
