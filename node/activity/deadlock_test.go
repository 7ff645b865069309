package activity

import (
	"context"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
)

// failing is a copy whose writes fail while fail is set.
type failing struct {
	lun.Copy
	fail atomic.Bool
}

func (f *failing) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	if f.fail.Load() {
		return errors.New("injected write failure")
	}
	return f.Copy.WriteAt(ctx, p, off, durable)
}

// refusing is a block-map store that refuses records while refuse is set
// (as the catalog refuses an owner whose generation is not the record's).
type refusing struct{ refuse atomic.Bool }

func (r *refusing) SetBlockStates(context.Context, string, []int64, placement.SyncState) error {
	if r.refuse.Load() {
		return errors.New("record refused")
	}
	return nil
}

// TestClearDoesNotDeadlockWrites: clearing the log reconciles suspect
// blocks, which takes their block locks, while a write holds its block
// lock and then takes the log's lock (Before). Clear held the log's lock
// across the reconciliation: the image then hung for good, every write
// and sync waiting, and the node could not stop (found by chaos seed
// 102). Here a write is held right after it took its block lock; Clear
// starts; once it holds the log's lock (or had 500 ms to take it) the
// write goes on: both must finish. Real volume and file copies.
func TestClearDoesNotDeadlockWrites(t *testing.T) {
	ctx := context.Background()
	const bs = 64 << 10
	var reps []*lun.Replica
	maps := map[string]*placement.BlockMap{}
	var n2 *failing
	for i, node := range []string{"n1", "n2"} {
		fc, err := lun.CreateFile(filepath.Join(t.TempDir(), node+".img"), 4*bs)
		if err != nil {
			t.Fatal(err)
		}
		f := &failing{Copy: fc}
		if node == "n2" {
			n2 = f
		}
		reps = append(reps, &lun.Replica{Node: node, Copy: f, Local: i == 0})
		maps[node] = placement.NewBlockMap(4, placement.InSync)
	}
	entered, proceed := make(chan struct{}, 1), make(chan struct{})
	var hold atomic.Bool
	var l *Log
	ms := &refusing{}
	vol, err := lun.NewVolume(lun.Config{Size: 4 * bs, BlockSize: bs, MinCopies: 1, CopyTimeout: time.Second,
		BeforeWrite: func(ctx context.Context, blocks []int64) error {
			if hold.Load() {
				entered <- struct{}{}
				<-proceed
			}
			return l.Before(ctx, blocks)
		}}, reps, maps, ms)
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	l = New(Config{Volume: vol, Store: &store{}, Held: func() bool { return true }})

	// A suspect block: n2's write fails and its out-of-sync record is
	// refused, so the write fails and block 1 may differ between the
	// copies. The log holds it.
	n2.fail.Store(true)
	ms.refuse.Store(true)
	if err := vol.WriteAt(ctx, make([]byte, 4096), bs, true); err == nil {
		t.Fatal("test setup: the write with a refused record succeeded")
	}
	n2.fail.Store(false)
	ms.refuse.Store(false)
	if !vol.HasSuspects() || l.Stored() == 0 {
		t.Fatalf("test setup: suspects %v, activity log of %d blocks", vol.HasSuspects(), l.Stored())
	}
	l.Flushed(time.Now().Add(time.Hour))

	// A write to block 1, held right after it took the block's lock.
	hold.Store(true)
	wrote := make(chan error, 1)
	go func() { wrote <- vol.WriteAt(ctx, make([]byte, 4096), bs, true) }()
	<-entered
	hold.Store(false)
	cleared := make(chan struct{})
	go func() { l.Clear(ctx); close(cleared) }()
	for deadline := time.Now().Add(500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if !l.mu.TryLock() {
			break // Clear holds it: the hazard is set up
		}
		l.mu.Unlock()
	}
	close(proceed)
	timeout := time.After(10 * time.Second)
	for _, c := range []struct {
		what string
		done <-chan struct{}
	}{{"the write", waitErr(t, wrote)}, {"Clear", cleared}} {
		select {
		case <-c.done:
		case <-timeout:
			t.Fatalf("%s did not finish in 10 s: a write and the log's clearing deadlock", c.what)
		}
	}
	if vol.HasSuspects() {
		t.Error("the suspect block was not reconciled")
	}
}

// waitErr closes the returned channel when errc yields, failing t on an error.
func waitErr(t *testing.T, errc <-chan error) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		if err := <-errc; err != nil {
			t.Errorf("write: %v", err)
		}
		close(done)
	}()
	return done
}
