// Package activity keeps an image owner's activity log: the blocks
// written since the last flush, stored in the catalog (under the
// ownership lock) before a write touches any copy. A successor that takes
// the image reconciles only those blocks, not the whole image: a write
// that reached some copies and not others can only be in one of them.
//
// It owns the in-memory mirror of the stored log and three rules:
//   - a block is in the stored log before a write to it starts (Before);
//     when storing fails, the write fails before any copy is touched;
//   - a log full of blocks written since the last flush is emptied by a
//     flush (every copy durable) and starts over;
//   - the stored log is cleared only once every block in it was flushed
//     and no failed write left copies that may differ (Clear).
//
// Lock order: a write holds its blocks' locks (package lun), then Log.mu
// (in Before). So Log.mu is never held while block locks are taken:
// Clear and Reconcile release it before they reconcile blocks. Holding it
// there deadlocked an image for good, every write and sync waiting
// (chaos seed 102: the node could not even stop).
package activity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// ErrNotHeld: the write waited past the ownership the log is written
// under (a paused process, a lapsed session). Storing the log then would
// replace the one a new owner writes.
var ErrNotHeld = errors.New("this node no longer holds the image's ownership")

// Defaults of Config.
const (
	// DefaultMax bounds the log: when it is full of blocks written since
	// the last flush, the owner flushes and starts over.
	DefaultMax = 512
	// DefaultAhead is how many blocks past a sequential write's block go
	// into the log with it: one metadata write per that many blocks for
	// a sequential writer instead of one per block.
	DefaultAhead = 15
)

// Volume is the image the log covers (a *lun.Volume).
type Volume interface {
	Blocks() int64
	// Flush makes every acknowledged write durable on every copy.
	Flush(ctx context.Context) error
	// HasSuspects says whether a failed write may have left copies that
	// differ; ReconcileSuspects makes them agree.
	HasSuspects() bool
	ReconcileSuspects(ctx context.Context) error
	// ReconcileBlock makes the in-sync copies of block b agree, returning
	// the copies it repaired.
	ReconcileBlock(ctx context.Context, b int64) (int, error)
}

// Store holds the log in the catalog.
type Store interface {
	// Put replaces the stored log. It must fail when this node no longer
	// holds the image's ownership lock (meta.Catalog.SetActivity).
	Put(ctx context.Context, blocks []int64) error
	// Get reads the log the previous owner left.
	Get(ctx context.Context) ([]int64, error)
}

// Config is what a Log needs. Volume, Store and Held are required.
type Config struct {
	Volume Volume
	Store  Store
	// Held says whether this node still holds the ownership the log is
	// written under; Before refuses to store the log (ErrNotHeld) when it
	// does not.
	Held func() bool
	// Now is the clock writes and flushes are stamped with (only ever
	// compared with each other); default time.Now.
	Now        func() time.Time
	Log        *slog.Logger
	Max, Ahead int
}

// Log is one owned image's activity log.
type Log struct {
	cfg       Config
	mu        sync.Mutex
	blocks    map[int64]time.Time // block -> last write start
	lastFlush time.Time
	stored    int // entries in the stored log (0: stored empty)
}

// New returns an empty log (nothing stored yet).
func New(cfg Config) *Log {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Max <= 0 {
		cfg.Max = DefaultMax
	}
	if cfg.Ahead < 0 {
		cfg.Ahead = 0
	} else if cfg.Ahead == 0 {
		cfg.Ahead = DefaultAhead
	}
	return &Log{cfg: cfg, blocks: map[int64]time.Time{}}
}

// Stored is the number of blocks in the stored log (0: stored empty).
func (l *Log) Stored() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stored
}

// Before records blocks in the log before a write to them starts. The
// common case (all present) touches no metadata. The caller holds the
// blocks' locks.
func (l *Log) Before(ctx context.Context, blocks []int64) (err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.cfg.Now()
	var added []int64
	nblocks := l.cfg.Volume.Blocks()
	for _, b := range blocks {
		if _, ok := l.blocks[b]; !ok {
			added = append(added, b)
			// A sequential writer (the block before is in the log) will
			// want the next blocks too: log them now, in the same
			// metadata write. Logging a block that is not written only
			// costs a successor one needless block comparison.
			if _, seq := l.blocks[b-1]; seq {
				for k := b + 1; k <= b+int64(l.cfg.Ahead) && k < nblocks; k++ {
					if _, ok := l.blocks[k]; !ok && !slices.Contains(blocks, k) {
						added = append(added, k)
						l.blocks[k] = now
					}
				}
			}
		}
		l.blocks[b] = now
	}
	if len(added) == 0 {
		return nil
	}
	// A block is in the log only once the stored log says so: if storing
	// fails, the write fails before any copy is touched, and the next
	// write to the block tries again. (This compared the counts of
	// blocks stored and held, which an eviction can make equal after a
	// failed store: the block then stayed out of the stored log for good.)
	defer func() {
		if err != nil {
			for _, b := range added {
				delete(l.blocks, b)
			}
		}
	}()
	if !l.cfg.Held() {
		return ErrNotHeld
	}
	if len(l.blocks) > l.cfg.Max {
		l.evictFlushed(blocks)
	}
	if len(l.blocks) > l.cfg.Max {
		if err := l.cfg.Volume.Flush(ctx); err != nil {
			return fmt.Errorf("flush to make room in the activity log: %w", err)
		}
		l.lastFlush = l.cfg.Now()
		l.evictFlushed(blocks)
	}
	return l.store(ctx)
}

// evictFlushed drops the blocks made durable by a flush since their last
// write, except those of the write in progress (keep).
func (l *Log) evictFlushed(keep []int64) {
	for b, t := range l.blocks {
		if t.Before(l.lastFlush) && !slices.Contains(keep, b) {
			delete(l.blocks, b)
		}
	}
}

// store writes the in-memory set; the caller holds mu.
func (l *Log) store(ctx context.Context) error {
	list := make([]int64, 0, len(l.blocks))
	for b := range l.blocks {
		list = append(list, b)
	}
	if err := l.cfg.Store.Put(ctx, list); err != nil {
		return err
	}
	l.stored = len(list)
	return nil
}

// Flushed notes a flush that started at at: every block written before
// it is durable on every copy.
func (l *Log) Flushed(at time.Time) {
	l.mu.Lock()
	l.lastFlush = at
	l.mu.Unlock()
}

// Clear empties the stored log once every block in it was flushed (called
// when the image is quiet, and on release). A failed write may have left
// copies different: they are repaired first, and the log keeps the
// blocks for a successor until then.
func (l *Log) Clear(ctx context.Context) {
	l.mu.Lock()
	stored := l.stored
	l.mu.Unlock()
	if stored == 0 {
		return
	}
	vol := l.cfg.Volume
	if vol.HasSuspects() {
		if err := vol.ReconcileSuspects(ctx); err != nil {
			l.cfg.Log.Warn("cannot reconcile blocks a failed write may have left different; keeping the activity log", "err", err)
			return
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stored == 0 || vol.HasSuspects() {
		return // cleared meanwhile, or a write failed since: next time
	}
	for _, t := range l.blocks {
		if !t.Before(l.lastFlush) {
			return
		}
	}
	clear(l.blocks)
	if err := l.store(ctx); err != nil {
		l.cfg.Log.Warn("cannot clear the activity log", "err", err)
	}
}

// Reconcile makes the in-sync copies agree on every block of the log the
// previous owner left, then stores an empty log. A new owner calls it
// before it serves I/O. An unreadable log makes every block suspect.
func (l *Log) Reconcile(ctx context.Context) error {
	vol := l.cfg.Volume
	nblocks := vol.Blocks()
	blocks, err := l.cfg.Store.Get(ctx)
	if err != nil {
		l.cfg.Log.Error("activity log unreadable: reconciling the whole image", "err", err)
		blocks = make([]int64, nblocks)
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
		if b < 0 || b >= nblocks {
			continue
		}
		k, err := vol.ReconcileBlock(ctx, b)
		if err != nil {
			return err
		}
		copied += k
	}
	l.cfg.Log.Info("reconciled the previous owner's activity", "blocks", len(blocks), "copies_repaired", copied, "took", time.Since(start))
	l.mu.Lock()
	defer l.mu.Unlock()
	clear(l.blocks)
	return l.store(ctx)
}
