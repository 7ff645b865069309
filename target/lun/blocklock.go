package lun

import (
	"slices"
	"sync"
)

// blockLocks serializes the synchronizer's copy of a block with I/O on the
// same block: I/O takes its blocks shared, the synchronizer one block
// exclusively. A fixed array of stripes keeps memory bounded for any image
// size; a request locks each of its stripes once, in order, so that two
// blocks on one stripe never read-lock it twice (which could deadlock
// behind a waiting writer).
type blockLocks struct {
	stripes [256]sync.RWMutex
}

func stripe(b int64) int { return int(uint64(b) % 256) }

// shared read-locks the stripes of ps and returns the unlock.
func (l *blockLocks) shared(ps []piece) func() {
	idx := make([]int, 0, len(ps))
	for _, p := range ps {
		idx = append(idx, stripe(p.block))
	}
	slices.Sort(idx)
	idx = slices.Compact(idx)
	for _, i := range idx {
		l.stripes[i].RLock()
	}
	return func() {
		for _, i := range idx {
			l.stripes[i].RUnlock()
		}
	}
}

// exclusive write-locks block b's stripe and returns the unlock.
func (l *blockLocks) exclusive(b int64) func() {
	m := &l.stripes[stripe(b)]
	m.Lock()
	return m.Unlock
}

// drain waits until no I/O holds any block: it takes every stripe
// exclusively, in order, then lets go.
func (l *blockLocks) drain() {
	for i := range l.stripes {
		l.stripes[i].Lock()
	}
	for i := range l.stripes {
		l.stripes[i].Unlock()
	}
}
