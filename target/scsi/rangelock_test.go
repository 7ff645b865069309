package scsi

import (
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A steady stream of writes does not starve an exclusive range: writes
// that arrive while it waits queue behind it (before, 8 writers in a loop
// kept a whole-LU hold waiting for more than 3 s).
func TestCAWLockExclusiveIsNotStarved(t *testing.T) {
	var c cawLock
	c.init()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writes atomic.Int64
	for i := range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				h := c.writeLock(uint64(i), uint64(i)+2)
				time.Sleep(100 * time.Microsecond)
				writes.Add(1) // counted while the range is held
				c.writeUnlock(h)
			}
		})
	}
	defer func() { close(stop); wg.Wait() }()
	for writes.Load() < 100 {
		time.Sleep(time.Millisecond)
	}
	got := make(chan struct{})
	go func() {
		h := c.cawLockRange(0, math.MaxUint64)
		// Holding it, no write runs.
		before := writes.Load()
		time.Sleep(20 * time.Millisecond)
		if w := writes.Load(); w != before {
			t.Errorf("%d writes ran while the whole range was held", w-before)
		}
		c.cawUnlock(h)
		close(got)
	}()
	select {
	case <-got:
	case <-time.After(20 * time.Second):
		t.Fatal("the exclusive range never got its turn under a steady write load")
	}
	// Writes go on after it.
	after := writes.Load()
	for writes.Load() < after+10 {
		time.Sleep(time.Millisecond)
	}
}
