package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// activityMax bounds the activity log: when it is full of blocks written
// since the last flush, the owner flushes and starts over.
const activityMax = 512

// activityAhead is how many blocks past a sequential write's block go
// into the activity log with it (one metadata write per that many blocks
// for a sequential writer instead of one per block).
const activityAhead = 15

// activity is the owner's in-memory mirror of an image's activity log.
type activity struct {
	mu        sync.Mutex
	blocks    map[int64]time.Time // block -> last write start
	lastFlush time.Time
	stored    int // entries in the stored log (0: stored empty)
}

// beforeWrite records blocks in the activity log before a write to them
// starts. The common case (all present) touches no metadata.
func (n *Node) beforeWrite(ctx context.Context, s *served, blocks []int64) error {
	if err := n.preserve(ctx, s, blocks); err != nil {
		return err
	}
	if onlyLocalCopy(s.record(), n.cfg.Node.Name) {
		// One copy cannot diverge from another: no log needed (and I/O
		// goes on while the metadata store is unreachable).
		return nil
	}
	a := &s.act
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.blocks == nil {
		a.blocks = map[int64]time.Time{}
	}
	now := time.Now()
	var added []int64
	nblocks := s.vol.Blocks()
	for _, b := range blocks {
		if _, ok := a.blocks[b]; !ok {
			added = append(added, b)
			// A sequential writer (the block before is in the log) will
			// want the next blocks too: log them now, in the same
			// metadata write. Logging a block that is not written only
			// costs a successor one needless block comparison.
			if _, seq := a.blocks[b-1]; seq {
				for k := b + 1; k <= b+activityAhead && k < nblocks; k++ {
					if _, ok := a.blocks[k]; !ok && !containsBlock(blocks, k) {
						added = append(added, k)
						a.blocks[k] = now
					}
				}
			}
		}
		a.blocks[b] = now
	}
	if len(added) == 0 {
		return nil
	}
	if !s.offline.Load() && !n.session.Valid(s.session()) {
		// A write that waited past this node's session (a paused
		// process) must not replace the log a new owner writes.
		for _, b := range added {
			delete(a.blocks, b)
		}
		return notReady(fmt.Errorf("record the write in the activity log: %w", errDeposed))
	}
	// A block is in the log only once the stored log says so: if storing
	// fails, the write fails before any copy is touched, and the next
	// write to the block tries again.
	defer func() {
		if a.stored != len(a.blocks) {
			for _, b := range added {
				delete(a.blocks, b)
			}
		}
	}()
	if len(a.blocks) > activityMax {
		// Evict blocks made durable by a flush since their last write.
		for b, t := range a.blocks {
			if t.Before(a.lastFlush) {
				delete(a.blocks, b)
			}
		}
	}
	if len(a.blocks) > activityMax {
		if err := s.vol.Flush(ctx); err != nil {
			return fmt.Errorf("flush to make room in the activity log: %w", err)
		}
		a.lastFlush = time.Now()
		for b, t := range a.blocks {
			if t.Before(a.lastFlush) && !containsBlock(blocks, b) {
				delete(a.blocks, b)
			}
		}
	}
	return n.storeActivity(ctx, s)
}

func containsBlock(bs []int64, b int64) bool {
	for _, x := range bs {
		if x == b {
			return true
		}
	}
	return false
}

// storeActivity writes the in-memory set; the caller holds a.mu.
func (n *Node) storeActivity(ctx context.Context, s *served) error {
	a := &s.act
	list := make([]int64, 0, len(a.blocks))
	for b := range a.blocks {
		list = append(list, b)
	}
	if err := n.cat.SetActivity(ctx, s.record(), n.cfg.Node.Name, s.session(), list); err != nil {
		if errors.Is(err, meta.ErrNotOwner) {
			return notReady(err) // the image moved: the initiator retries there
		}
		return err
	}
	a.stored = len(list)
	return nil
}

// noteFlush marks every block written before now durable.
func (s *served) noteFlush(at time.Time) {
	s.act.mu.Lock()
	s.act.lastFlush = at
	s.act.mu.Unlock()
}

// clearActivity empties the stored activity log once every block in it
// was flushed (called when the image is quiet, and on release).
//
// Lock order: a write holds its blocks' locks, then takes act.mu (in
// beforeWrite); so act.mu is never held here while the suspects are
// reconciled, which takes block locks. Holding it there deadlocked an
// image for good, every write and sync waiting (chaos seed 102: the node
// could not even stop).
func (n *Node) clearActivity(ctx context.Context, s *served) {
	a := &s.act
	a.mu.Lock()
	stored := a.stored
	a.mu.Unlock()
	if stored == 0 {
		return
	}
	// A failed write may have left copies different: repair first (the
	// log keeps the blocks for a successor until then).
	if s.vol.HasSuspects() {
		if err := s.vol.ReconcileSuspects(ctx); err != nil {
			n.log.Warn("cannot reconcile blocks a failed write may have left different; keeping the activity log", "image", s.record().Name, "err", err)
			return
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stored == 0 || s.vol.HasSuspects() {
		return // cleared meanwhile, or a write failed since: next time
	}
	for _, t := range a.blocks {
		if !t.Before(a.lastFlush) {
			return
		}
	}
	a.blocks = map[int64]time.Time{}
	if err := n.storeActivity(ctx, s); err != nil {
		n.log.Warn("cannot clear the activity log", "image", s.record().Name, "err", err)
	}
}

// reconcileActivity makes the in-sync copies agree on every block of the
// activity log the previous owner left, then clears it. Called by a new
// owner before it serves I/O.
func (n *Node) reconcileActivity(ctx context.Context, s *served) error {
	img := s.record()
	blocks, err := n.cat.Activity(ctx, img)
	if err != nil {
		// Unreadable log: every block is suspect.
		n.log.Error("activity log unreadable: reconciling the whole image", "image", img.Name, "err", err)
		blocks = make([]int64, img.Blocks())
		for i := range blocks {
			blocks[i] = int64(i)
		}
	}
	if len(blocks) == 0 {
		return nil
	}
	start := time.Now()
	copied := 0
	for _, b := range blocks {
		if b < 0 || b >= img.Blocks() {
			continue
		}
		k, err := s.vol.ReconcileBlock(ctx, b)
		if err != nil {
			return err
		}
		copied += k
	}
	n.log.Info("reconciled the previous owner's activity", "image", img.Name, "blocks", len(blocks), "copies_repaired", copied, "took", time.Since(start))
	s.act.mu.Lock()
	s.act.blocks = map[int64]time.Time{}
	err = n.storeActivity(ctx, s)
	s.act.mu.Unlock()
	return err
}
