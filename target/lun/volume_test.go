package lun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

// faulty is a Copy over a real file that can be told to fail or stall,
// and records the pieces written to it.
type faulty struct {
	*FileCopy
	fail  atomic.Bool
	stall atomic.Bool
	// lostAck: writes are applied, then fail (the answer was lost).
	lostAck atomic.Bool
	mu      sync.Mutex
	pieces  [][2]int64
}

var errInjected = errors.New("injected failure")

func (f *faulty) check(ctx context.Context) error {
	if f.stall.Load() {
		<-ctx.Done()
		return ctx.Err()
	}
	if f.fail.Load() {
		return errInjected
	}
	return nil
}

func (f *faulty) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := f.check(ctx); err != nil {
		return err
	}
	return f.FileCopy.ReadAt(ctx, p, off)
}

func (f *faulty) WriteAt(ctx context.Context, p []byte, off int64, d bool) error {
	if err := f.check(ctx); err != nil {
		return err
	}
	f.mu.Lock()
	f.pieces = append(f.pieces, [2]int64{off, int64(len(p))})
	f.mu.Unlock()
	if err := f.FileCopy.WriteAt(ctx, p, off, d); err != nil || !f.lostAck.Load() {
		return err
	}
	return errInjected
}

func (f *faulty) Sync(ctx context.Context) error {
	if err := f.check(ctx); err != nil {
		return err
	}
	return f.FileCopy.Sync(ctx)
}

// memMaps is a MapStore that keeps the maps in memory and can fail.
type memMaps struct {
	mu   sync.Mutex
	maps map[string]*placement.BlockMap
	fail bool
	// hook, when set, runs after a change is stored, before the call
	// returns (outside mu).
	hook func()
}

func (m *memMaps) setFail(f bool) {
	m.mu.Lock()
	m.fail = f
	m.mu.Unlock()
}

func (m *memMaps) SetBlockStates(_ context.Context, node string, blocks []int64, s placement.SyncState) error {
	if m.hook != nil {
		defer m.hook()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail {
		return errors.New("metadata store unreachable")
	}
	for _, b := range blocks {
		m.maps[node].Set(b, s)
	}
	return nil
}

func (m *memMaps) get(node string, b int64) placement.SyncState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.maps[node].Get(b)
}

type rig struct {
	v      *Volume
	reps   []*Replica
	copies map[string]*faulty
	store  *memMaps
	dead   sync.Map
}

func newRig(t *testing.T, size, bs int64, minCopies int, nodes ...string) *rig {
	t.Helper()
	r := &rig{copies: map[string]*faulty{}, store: &memMaps{maps: map[string]*placement.BlockMap{}}}
	var reps []*Replica
	blocks := (size + bs - 1) / bs
	for i, n := range nodes {
		fc, err := CreateFile(filepath.Join(t.TempDir(), n+".img"), size)
		if err != nil {
			t.Fatal(err)
		}
		f := &faulty{FileCopy: fc}
		r.copies[n] = f
		reps = append(reps, &Replica{Node: n, Copy: f, Local: i == 0})
		r.store.maps[n] = placement.NewBlockMap(blocks, placement.InSync)
	}
	maps := map[string]*placement.BlockMap{}
	for n, m := range r.store.maps {
		maps[n] = m.Clone()
	}
	v, err := NewVolume(Config{Size: size, BlockSize: bs, MinCopies: minCopies, CopyTimeout: 500 * time.Millisecond,
		Alive: func(n string) bool { _, d := r.dead.Load(n); return !d }}, reps, maps, r.store)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	r.v = v
	r.reps = reps
	return r
}

func pattern(n int64, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestVolumeSplitsAtBlockBoundaries(t *testing.T) {
	const bs, size = 64 << 10, 64<<10*5 + 4096 // last block partial
	r := newRig(t, size, bs, 1, "n1")
	ctx := context.Background()
	model := make([]byte, size)
	rnd := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		off := rnd.Int64N(size/512) * 512
		n := min(rnd.Int64N(3*bs/512+1)*512, size-off)
		buf := pattern(n, byte(rnd.Uint32()))
		r.copies["n1"].pieces = nil
		if err := r.v.WriteAt(ctx, buf, off, rnd.IntN(4) == 0); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], buf)
		for _, p := range r.copies["n1"].pieces {
			if p[0]/bs != (p[0]+p[1]-1)/bs {
				t.Fatalf("piece %v crosses a block boundary", p)
			}
		}
		got := make([]byte, n)
		if err := r.v.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, buf) {
			t.Fatalf("read back differs at %d+%d: %v", off, n, err)
		}
	}
	all := make([]byte, size)
	if err := r.v.ReadAt(ctx, all, 0); err != nil || !bytes.Equal(all, model) {
		t.Fatalf("whole image differs from the model: %v", err)
	}
	if err := r.v.WriteAt(ctx, make([]byte, 1024), size-512, false); err == nil {
		t.Fatal("a write past the end succeeded")
	}
}

func TestFailedCopyMarkedOutOfSyncForExactlyTheBlocksWritten(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 16*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	r.copies["n2"].fail.Store(true)
	// Blocks 2..4 (a write from the middle of block 2 into block 4).
	if err := r.v.WriteAt(ctx, pattern(2*bs+1024, 1), 2*bs+512, false); err != nil {
		t.Fatalf("write with one good copy: %v", err)
	}
	for b := int64(0); b < 16; b++ {
		want := placement.InSync
		if b >= 2 && b <= 4 {
			want = placement.OutOfSync
		}
		if got := r.store.get("n2", b); got != want {
			t.Fatalf("store: block %d of n2 is %v, want %v", b, got, want)
		}
		if r.v.State("n2", b) != want || r.store.get("n1", b) != placement.InSync {
			t.Fatalf("block %d: memory state of n2 %v, n1 %v", b, r.v.State("n2", b), r.store.get("n1", b))
		}
	}
	// Later writes and reads do not touch n2's out-of-sync blocks.
	r.copies["n2"].fail.Store(false)
	r.copies["n2"].pieces = nil
	if err := r.v.WriteAt(ctx, pattern(bs, 9), 3*bs, false); err != nil {
		t.Fatal(err)
	}
	if len(r.copies["n2"].pieces) != 0 {
		t.Fatalf("an out-of-sync copy was written: %v", r.copies["n2"].pieces)
	}
}

func TestMinCopiesFailsTheWriteButRecordsTheFailure(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 8*bs, bs, 2, "n1", "n2")
	ctx := context.Background()
	r.copies["n2"].fail.Store(true)
	err := r.v.WriteAt(ctx, pattern(bs, 3), 0, false)
	var se *scsi.SenseError
	if !errors.As(err, &se) || se.Key != scsi.SenseMediumError {
		t.Fatalf("write below min_copies: %v, want a medium error", err)
	}
	if r.store.get("n2", 0) != placement.OutOfSync {
		t.Fatal("the failed copy was not recorded out of sync")
	}
}

func TestNoCopySucceededMarksNothing(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	r.copies["n1"].fail.Store(true)
	r.copies["n2"].fail.Store(true)
	if err := r.v.WriteAt(context.Background(), pattern(bs, 3), 0, false); err == nil {
		t.Fatal("a write that reached no copy succeeded")
	}
	if r.store.get("n1", 0) != placement.InSync || r.store.get("n2", 0) != placement.InSync {
		t.Fatal("a write that reached no copy marked copies out of sync (the block would have none)")
	}
}

func TestMetadataFailureMeansNoAck(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	r.copies["n2"].fail.Store(true)
	r.store.fail = true
	if err := r.v.WriteAt(context.Background(), pattern(bs, 3), 0, false); err == nil {
		t.Fatal("a write whose failed copy could not be recorded was acknowledged")
	}
}

func TestReadFallsBackAndMarks(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	data := pattern(bs, 5)
	if err := r.v.WriteAt(ctx, data, bs, false); err != nil {
		t.Fatal(err)
	}
	r.copies["n1"].fail.Store(true) // the local copy, tried first
	got := make([]byte, bs)
	if err := r.v.ReadAt(ctx, got, bs); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fallback read: %v", err)
	}
	if r.store.get("n1", 1) != placement.OutOfSync {
		t.Fatal("the copy that failed a read was not marked out of sync")
	}
	// Now n2 is the only in-sync copy of block 1; it fails too.
	r.copies["n2"].fail.Store(true)
	err := r.v.ReadAt(ctx, got, bs)
	var se *scsi.SenseError
	if !errors.As(err, &se) || se.Key != scsi.SenseMediumError || se.ASC != 0x11 || !errors.Is(err, ErrNoInSyncCopy) {
		t.Fatalf("read with no in-sync copy: %v", err)
	}
	if r.store.get("n2", 1) != placement.InSync {
		t.Fatal("the last in-sync copy was marked out of sync")
	}
}

func TestDeadNodeIsNotWaitedOn(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	r.copies["n2"].stall.Store(true)
	r.dead.Store("n2", true)
	start := time.Now()
	if err := r.v.WriteAt(context.Background(), pattern(bs, 1), 0, true); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Fatalf("write waited %v for a dead node", d)
	}
	if r.store.get("n2", 0) != placement.OutOfSync {
		t.Fatal("the dead node's copy was not marked out of sync")
	}
	// A stalled node that is not known dead is bounded by CopyTimeout.
	r.dead.Delete("n2")
	r.store.maps["n2"].Set(1, placement.InSync)
	r.v.maps["n2"].Set(1, placement.InSync)
	start = time.Now()
	if err := r.v.WriteAt(context.Background(), pattern(bs, 1), bs, false); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a stalled copy held the write for %v", d)
	}
}

func TestFlushFailureMarksDirtyBlocks(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 8*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	if err := r.v.WriteAt(ctx, pattern(2*bs, 1), 3*bs, false); err != nil {
		t.Fatal(err)
	}
	r.copies["n2"].fail.Store(true)
	if err := r.v.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for b := int64(0); b < 8; b++ {
		want := placement.InSync
		if b == 3 || b == 4 {
			want = placement.OutOfSync
		}
		if r.store.get("n2", b) != want {
			t.Fatalf("after a failed flush block %d of n2 is %v, want %v", b, r.store.get("n2", b), want)
		}
	}
}

func TestSyncUnderConcurrentWrites(t *testing.T) {
	const bs, blocks = 64 << 10, 32
	r := newRig(t, blocks*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	// n2 misses a round of writes.
	r.copies["n2"].fail.Store(true)
	if err := r.v.WriteAt(ctx, pattern(blocks*bs, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	r.copies["n2"].fail.Store(false)
	if r.v.MapsSnapshot()["n2"].Count(placement.OutOfSync) != blocks {
		t.Fatal("n2 should be out of sync everywhere")
	}
	// Sync while a writer keeps rewriting random ranges.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rnd := rand.New(rand.NewPCG(7, 8))
		for {
			select {
			case <-stop:
				return
			default:
			}
			off := rnd.Int64N(blocks*bs/512) * 512
			n := min(int64(rnd.IntN(64)+1)*512*8, blocks*bs-off)
			if err := r.v.WriteAt(ctx, pattern(n, byte(rnd.Uint32())), off, false); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	copied := 0
	for b := int64(0); b < blocks; b++ {
		res, err := r.v.SyncBlock(ctx, b, "n2")
		if err != nil {
			t.Fatal(err)
		}
		if res.Copied {
			copied++
		}
	}
	close(stop)
	wg.Wait()
	if copied == 0 {
		t.Fatal("nothing was copied")
	}
	for b := int64(0); b < blocks; b++ {
		if r.store.get("n2", b) != placement.InSync {
			t.Fatalf("block %d not in sync after sync", b)
		}
		mm, unreachable, err := r.v.VerifyBlock(ctx, b)
		if err != nil || mm != nil || len(unreachable) > 0 {
			t.Fatalf("block %d: copies differ after sync under writes: %+v %v %v", b, mm, unreachable, err)
		}
	}
	// A second sync of an in-sync block does nothing; equal data is not copied.
	r.store.maps["n2"].Set(0, placement.OutOfSync)
	r.v.maps["n2"].Set(0, placement.OutOfSync)
	res, err := r.v.SyncBlock(ctx, 0, "n2")
	if err != nil || res.Copied {
		t.Fatalf("sync of an equal block copied data: %+v %v", res, err)
	}
}

func TestVerifyFindsDivergence(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	if err := r.v.WriteAt(ctx, pattern(4*bs, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	// Corrupt n2's copy of block 2 behind the volume's back.
	if err := r.copies["n2"].FileCopy.WriteAt(ctx, []byte("rot"), 2*bs+100, false); err != nil {
		t.Fatal(err)
	}
	for b := int64(0); b < 4; b++ {
		mm, _, err := r.v.VerifyBlock(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		if (mm != nil) != (b == 2) {
			t.Fatalf("block %d: mismatch %v", b, mm)
		}
	}
}

func TestStalledCopyCostsOneTimeoutNotOnePerBlock(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 16*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	r.copies["n2"].stall.Store(true)
	start := time.Now()
	for b := int64(0); b < 8; b++ {
		if err := r.v.WriteAt(ctx, pattern(bs, byte(b)), b*bs, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.v.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// CopyTimeout is 500 ms: the first write waits it out, the rest fail fast.
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Fatalf("8 writes and a flush against a stalled copy took %v", d)
	}
	for b := int64(0); b < 8; b++ {
		if r.store.get("n2", b) != placement.OutOfSync {
			t.Fatalf("block %d of the stalled copy not recorded out of sync", b)
		}
	}
}

func TestVolumeGrowsOnline(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, 3<<16, 1<<16, 1, "a", "b")
	want := pattern(3<<16, 3)
	if err := r.v.WriteAt(ctx, want, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := r.v.WriteAt(ctx, []byte{1}, 3<<16, false); err == nil {
		t.Fatal("write beyond the end accepted")
	}
	reps := r.reps // the same copies, as the node passes them
	maps := map[string]*placement.BlockMap{}
	for _, n := range []string{"a", "b"} {
		if err := r.copies[n].Grow(5 << 16); err != nil {
			t.Fatal(err)
		}
		maps[n] = placement.NewBlockMap(5, placement.InSync)
		r.store.maps[n] = r.store.maps[n].Resized(5, placement.InSync)
	}
	if err := r.v.Grow(5<<16, reps, map[string]*placement.BlockMap{"a": placement.NewBlockMap(4, placement.InSync), "b": maps["b"]}, r.v.MapVersion()); err == nil || r.v.Size() != 3<<16 {
		t.Fatalf("a map of the wrong length was taken (err %v, size %d)", err, r.v.Size())
	}
	if err := r.v.Grow(5<<16, reps, maps, r.v.MapVersion()); err != nil || r.v.Size() != 5<<16 || r.v.Blocks() != 5 {
		t.Fatalf("grow: %v, size %d", err, r.v.Size())
	}
	if err := r.v.Grow(4<<16, reps, maps, r.v.MapVersion()); err == nil {
		t.Fatal("shrink accepted")
	}
	if err := r.v.WriteAt(ctx, pattern(1<<16, 9), 4<<16, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5<<16)
	if err := r.v.ReadHeld(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:3<<16], want) || !bytes.Equal(got[3<<16:4<<16], make([]byte, 1<<16)) || !bytes.Equal(got[4<<16:], pattern(1<<16, 9)) {
		t.Fatal("data after the grow is not the old data, zeros, then the new write")
	}
}

// A BeforeWrite hook's own sense (NOT READY: retry) reaches the initiator;
// any other hook error is a MEDIUM ERROR; no copy is touched either way.
func TestBeforeWriteSense(t *testing.T) {
	ctx := context.Background()
	fc, err := CreateFile(filepath.Join(t.TempDir(), "a.img"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var hookErr error
	v, err := NewVolume(Config{Size: 1 << 20, BlockSize: 1 << 16,
		BeforeWrite: func(context.Context, []int64) error { return hookErr }},
		[]*Replica{{Node: "a", Copy: fc, Local: true}},
		map[string]*placement.BlockMap{"a": placement.NewBlockMap(16, placement.InSync)}, &memMaps{maps: map[string]*placement.BlockMap{"a": placement.NewBlockMap(16, placement.InSync)}})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	for _, c := range []struct {
		err error
		key byte
	}{
		{&scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x01, Err: errors.New("snapshot not ready")}, scsi.SenseNotReady},
		{errors.New("metadata store unreachable"), scsi.SenseMediumError},
	} {
		hookErr = c.err
		err := v.WriteAt(ctx, []byte{1}, 0, false)
		var se *scsi.SenseError
		if !errors.As(err, &se) || se.Key != c.key {
			t.Fatalf("hook error %v: write answered %v", c.err, err)
		}
		got := make([]byte, 1)
		fc.ReadAt(ctx, got, 0)
		if got[0] != 0 {
			t.Fatal("a copy was written although the hook refused")
		}
	}
}

// A record change installs block maps read from the catalog. A copy
// recorded out of sync after they were read (a write failed on it) stays
// out of sync: a local-first read must not return the data it missed.
func TestInstalledMapsKeepNewerOutOfSync(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "local", "remote")
	old := pattern(bs, 1)
	if err := r.v.WriteAt(ctx, old, bs, true); err != nil {
		t.Fatal(err)
	}
	// The node reads the version, then the maps (all in sync).
	at := r.v.MapVersion()
	read := map[string]*placement.BlockMap{}
	for n, m := range r.store.maps {
		read[n] = m.Clone()
	}
	// Meanwhile a write fails on the local copy: recorded out of sync
	// and acknowledged.
	r.copies["local"].fail.Store(true)
	want := pattern(bs, 2)
	if err := r.v.WriteAt(ctx, want, bs, true); err != nil {
		t.Fatal(err)
	}
	r.copies["local"].fail.Store(false)
	if r.store.get("local", 1) != placement.OutOfSync {
		t.Fatal("the failed copy was not recorded out of sync")
	}
	// The maps read before are installed.
	if err := r.v.SetReplicas(r.reps, read, at); err != nil {
		t.Fatal(err)
	}
	if st := r.v.State("local", 1); st != placement.OutOfSync {
		t.Fatalf("after installing maps read before the failure, the copy is %v, want out of sync", st)
	}
	got := make([]byte, bs)
	if err := r.v.ReadAt(ctx, got, bs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read returned data older than an acknowledged write")
	}
	// Maps read after the record are taken as they are (here: the block
	// synced in the catalog by someone else).
	at = r.v.MapVersion()
	fresh := map[string]*placement.BlockMap{}
	for n, m := range r.store.maps {
		fresh[n] = m.Clone()
	}
	fresh["local"].Set(1, placement.InSync)
	if err := r.v.SetReplicas(r.reps, fresh, at); err != nil {
		t.Fatal(err)
	}
	if st := r.v.State("local", 1); st != placement.InSync {
		t.Fatalf("maps read after the record: block is %v, want in sync", st)
	}
}

// Maps read before a sync recorded a copy in sync must not make it out of
// sync again in memory when they are installed: the owner would leave the
// copy out of its writes without recording anything, the catalog would
// still say in sync, and the next owner would read the copy (chaos seed
// 114: every write acknowledged between a grow's map install and a
// handover was lost).
func TestInstalledMapsKeepNewerInSync(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "local", "remote")
	r.copies["remote"].fail.Store(true)
	if err := r.v.WriteAt(ctx, pattern(bs, 1), bs, true); err != nil {
		t.Fatal(err)
	}
	r.copies["remote"].fail.Store(false)
	if r.store.get("remote", 1) != placement.OutOfSync {
		t.Fatal("test setup: the failed copy was not recorded out of sync")
	}
	// The node reads the version, then the maps (remote out of sync).
	at := r.v.MapVersion()
	read := map[string]*placement.BlockMap{}
	for n, m := range r.store.maps {
		read[n] = m.Clone()
	}
	// Meanwhile the synchronizer brings the block to the copy.
	if _, err := r.v.SyncBlock(ctx, 1, "remote"); err != nil {
		t.Fatal(err)
	}
	if r.store.get("remote", 1) != placement.InSync {
		t.Fatal("test setup: the sync was not recorded")
	}
	// The maps read before are installed, then a write comes.
	if err := r.v.SetReplicas(r.reps, read, at); err != nil {
		t.Fatal(err)
	}
	want := pattern(bs, 2)
	if err := r.v.WriteAt(ctx, want, bs, true); err != nil {
		t.Fatal(err)
	}
	if r.store.get("remote", 1) == placement.InSync {
		got := make([]byte, bs)
		if err := r.copies["remote"].FileCopy.ReadAt(ctx, got, bs); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatal("the catalog says the copy is in sync, but it misses an acknowledged write")
		}
	}
	if st := r.v.State("remote", 1); st != placement.InSync {
		t.Fatalf("after installing maps read before the sync, the copy is %v, want in sync", st)
	}
}

// The install may also come while the out-of-sync record is being stored:
// the record lands on the maps installed.
func TestInstallDuringOutOfSyncRecord(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "local", "remote")
	at := r.v.MapVersion()
	read := map[string]*placement.BlockMap{}
	for n, m := range r.store.maps {
		read[n] = m.Clone()
	}
	installed := false
	r.store.hook = func() {
		if !installed {
			installed = true
			if err := r.v.SetReplicas(r.reps, read, at); err != nil {
				t.Error(err)
			}
		}
	}
	r.copies["local"].fail.Store(true)
	want := pattern(bs, 3)
	if err := r.v.WriteAt(ctx, want, 2*bs, true); err != nil {
		t.Fatal(err)
	}
	r.copies["local"].fail.Store(false)
	if !installed {
		t.Fatal("the store hook did not run")
	}
	if st := r.v.State("local", 2); st != placement.OutOfSync {
		t.Fatalf("block is %v after an install during its record, want out of sync", st)
	}
}

// A flush that failed on a copy while the metadata store is unreachable is
// not forgotten: the initiator's retry fails too until the copy is recorded
// out of sync, even once the copy answers again (it may have restarted
// without the data).
func TestFailedFlushIsNotForgotten(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 8*bs, bs, 1, "n1", "n2")
	if err := r.v.WriteAt(ctx, pattern(2*bs, 1), 3*bs, false); err != nil {
		t.Fatal(err)
	}
	r.copies["n2"].fail.Store(true)
	r.store.setFail(true)
	if err := r.v.Flush(ctx); err == nil {
		t.Fatal("flush answered GOOD with a copy failed and the store unreachable")
	}
	r.copies["n2"].fail.Store(false)
	r.v.noteResult("n2", nil) // n2 answers again
	if err := r.v.Flush(ctx); err == nil {
		t.Fatal("the retry answered GOOD though n2's failed flush is not recorded")
	}
	r.store.setFail(false)
	if err := r.v.Flush(ctx); err != nil {
		t.Fatalf("flush with the store back: %v", err)
	}
	for b := int64(0); b < 8; b++ {
		want := placement.InSync
		if b == 3 || b == 4 {
			want = placement.OutOfSync
		}
		if got := r.store.get("n2", b); got != want {
			t.Fatalf("block %d of n2 is %v in the store, want %v", b, got, want)
		}
		if got := r.v.State("n2", b); got != want {
			t.Fatalf("block %d of n2 is %v in memory, want %v", b, got, want)
		}
	}
	if err := r.v.Flush(ctx); err != nil {
		t.Fatalf("a flush after the record: %v", err)
	}
}

// fencing is a faulty copy that counts its fences.
type fencing struct {
	*faulty
	fences atomic.Int32
}

func (f *fencing) Fence(context.Context) error { f.fences.Add(1); return nil }

// A copy is fenced once before the first sync into it, again only after a
// write to it failed, and the sync workers that find it unfenced together
// send one fence between them.
func TestSyncFencesOncePerFailure(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 8*bs, bs, 1, "a", "b")
	fb := &fencing{faulty: r.copies["b"]}
	r.reps[1].Copy = fb
	if err := r.v.SetReplicas(r.reps, r.store.maps, r.v.MapVersion()); err != nil {
		t.Fatal(err)
	}
	fb.fail.Store(true)
	if err := r.v.WriteAt(ctx, pattern(8*bs, 1), 0, true); err != nil {
		t.Fatal(err)
	}
	fb.fail.Store(false)
	var wg sync.WaitGroup
	for b := int64(0); b < 8; b++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r.v.SyncBlock(ctx, b, "b"); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := fb.fences.Load(); n != 1 {
		t.Fatalf("%d fences for 8 blocks synced after one failure, want 1", n)
	}
	// No failure since: the next syncs do not fence.
	fb.fail.Store(true)
	r.v.WriteAt(ctx, pattern(bs, 2), 0, true)
	fb.fail.Store(false)
	r.v.noteResult("b", nil)
	if _, err := r.v.SyncBlock(ctx, 0, "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.v.SyncBlock(ctx, 0, "b"); err != nil {
		t.Fatal(err)
	}
	if n := fb.fences.Load(); n != 2 {
		t.Fatalf("%d fences after a second failure, want 2", n)
	}
	got := make([]byte, bs)
	if err := fb.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pattern(bs, 2)) {
		t.Fatalf("the synced copy does not hold the last write (%v)", err)
	}
}

// A copy removed from the image takes its owed records with it: flushes
// do not fail for ever on a copy that is no longer there.
func TestOwedRecordsGoWithTheCopy(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	if err := r.v.WriteAt(ctx, pattern(bs, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	r.copies["n2"].fail.Store(true)
	r.store.setFail(true)
	if err := r.v.Flush(ctx); err == nil {
		t.Fatal("flush answered GOOD with a copy failed and the store unreachable")
	}
	at := r.v.MapVersion()
	if err := r.v.SetReplicas(r.reps[:1], map[string]*placement.BlockMap{"n1": r.store.maps["n1"]}, at); err != nil {
		t.Fatal(err)
	}
	if err := r.v.Flush(ctx); err != nil {
		t.Fatalf("flush after n2 left the image: %v", err)
	}
}

// landedButFailed records a change and then reports a failure, as a store
// does when it committed the change but the answer was lost (a timeout, a
// Consul restart mid-request).
type landedButFailed struct{ *memMaps }

func (s landedButFailed) SetBlockStates(ctx context.Context, node string, blocks []int64, st placement.SyncState) error {
	if err := s.memMaps.SetBlockStates(ctx, node, blocks, st); err != nil {
		return err
	}
	return errors.New("metadata store: no answer")
}

// TestSyncRecordFailedButLanded: a sync's in-sync record fails but lands.
// The copy must then get the owner's next writes, so that a successor,
// which trusts the store, finds it up to date. (Chaos seed 101: the copy
// was left out, a successor reconciled from it, and an acknowledged write
// was undone.)
func TestSyncRecordFailedButLanded(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "a", "b")
	r.store.maps["b"].Set(1, placement.OutOfSync)
	maps := map[string]*placement.BlockMap{"a": r.store.maps["a"].Clone(), "b": r.store.maps["b"].Clone()}
	if err := r.v.SetReplicas(r.reps, maps, r.v.MapVersion()); err != nil {
		t.Fatal(err)
	}
	r.v.store = landedButFailed{r.store}
	if _, err := r.v.SyncBlock(ctx, 1, "b"); err == nil {
		t.Fatal("sync with a failed record reported success")
	}
	if r.store.get("b", 1) != placement.InSync {
		t.Fatal("test setup: the record did not land")
	}
	r.v.store = r.store
	want := pattern(bs, 9)
	if err := r.v.WriteAt(ctx, want, bs, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, bs)
	if err := r.copies["b"].ReadAt(ctx, got, bs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("b is recorded in sync for block 1 but missed the owner's write after the sync")
	}
}

// reorder holds the first write to it until a second one has been
// applied (or 300 ms passed): a copy that applies two concurrent writes
// in the other order than the rest.
type reorder struct {
	Copy
	n             atomic.Int32
	first, second chan struct{}
}

func (c *reorder) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	switch c.n.Add(1) {
	case 1:
		close(c.first)
		select {
		case <-c.second:
		case <-time.After(300 * time.Millisecond):
		}
	case 2:
		defer close(c.second)
	}
	return c.Copy.WriteAt(ctx, p, off, durable)
}

// applied signals once its first write is applied.
type applied struct {
	Copy
	once sync.Once
	done chan struct{}
}

func (c *applied) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	err := c.Copy.WriteAt(ctx, p, off, durable)
	c.once.Do(func() { close(c.done) })
	return err
}

// TestOverlappingWritesReachCopiesInOneOrder: two initiators write the
// same bytes at once. Every copy must end with the same data (either
// write's, as SCSI allows). Before, both writes fanned out together and a
// copy could apply them in the other order: copies differed, all in sync
// (chaos seed 2).
func TestOverlappingWritesReachCopiesInOneOrder(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "a", "b")
	ro := &reorder{Copy: r.copies["b"], first: make(chan struct{}), second: make(chan struct{})}
	ap := &applied{Copy: r.copies["a"], done: make(chan struct{})}
	r.reps[0].Copy, r.reps[1].Copy = ap, ro
	if err := r.v.SetReplicas(r.reps, r.store.maps, r.v.MapVersion()); err != nil {
		t.Fatal(err)
	}
	w1, w2 := pattern(4096, 1), pattern(4096, 2)
	errs := make(chan error, 2)
	go func() { errs <- r.v.WriteAt(ctx, w1, bs+4096, false) }()
	<-ro.first // w1 is held at b
	<-ap.done  // and applied on a
	go func() { errs <- r.v.WriteAt(ctx, w2, bs+4096, false) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	a, b := make([]byte, 4096), make([]byte, 4096)
	if err := r.copies["a"].ReadAt(ctx, a, bs+4096); err != nil {
		t.Fatal(err)
	}
	if err := r.copies["b"].ReadAt(ctx, b, bs+4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("copies differ after two overlapping writes: a holds write %d, b write %d", a[0], b[0])
	}
}

// TestDisjointWritesInOneBlockStayParallel: the ordering is per byte
// range, not per block: a write to other bytes of the same block does not
// wait for a slow one.
func TestDisjointWritesInOneBlockStayParallel(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "a", "b")
	ro := &reorder{Copy: r.copies["b"], first: make(chan struct{}), second: make(chan struct{})}
	r.reps[1].Copy = ro
	if err := r.v.SetReplicas(r.reps, r.store.maps, r.v.MapVersion()); err != nil {
		t.Fatal(err)
	}
	slow := make(chan error, 1)
	go func() { slow <- r.v.WriteAt(ctx, pattern(4096, 1), bs, false) }()
	<-ro.first // held at b until the second write is applied there
	if err := r.v.WriteAt(ctx, pattern(4096, 2), bs+8192, false); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ro.second: // it was applied at b while the first was still held
	default:
		t.Fatal("a write to other bytes of the block waited for the first")
	}
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
}

// notOwnerStore refuses every record as a store does once another node
// owns the image.
type notOwnerStore struct{}

func (notOwnerStore) SetBlockStates(context.Context, string, []int64, placement.SyncState) error {
	return fmt.Errorf("record: %w", &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x0a, Err: errors.New("not the owner")})
}

// TestRefusedRecordIsNotReady: a write whose out-of-sync record the store
// refuses because this node no longer owns the image fails with the
// store's NOT READY 04/0a, which initiators retry (through the new
// owner), not MEDIUM ERROR, which they report to the VM.
func TestRefusedRecordIsNotReady(t *testing.T) {
	const bs = 64 << 10
	ctx := context.Background()
	r := newRig(t, 4*bs, bs, 1, "a", "b")
	r.v.store = notOwnerStore{}
	r.copies["b"].fail.Store(true)
	err := r.v.WriteAt(ctx, pattern(4096, 3), 0, true)
	se, ok := scsi.AsSense(err)
	if !ok || se.Key != scsi.SenseNotReady || se.ASC != 0x04 || se.ASCQ != 0x0a {
		t.Fatalf("write whose record was refused: %v, want NOT READY 04/0a", err)
	}
}

// A write that reached one copy and could not record the other out of
// sync leaves the block suspect: the next reads must all return the same
// data, whichever copy serves them (chaos seed 110 read the new value
// from one copy, then the old one from the other).
func TestSuspectBlockReadsAgree(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	old := pattern(bs, 1)
	if err := r.v.WriteAt(ctx, old, 0, false); err != nil {
		t.Fatal(err)
	}
	// n1 (the local copy, read first) misses the write; its out-of-sync
	// record fails: the write is not acknowledged, and n2 holds the new
	// data while both copies are in sync.
	r.copies["n1"].fail.Store(true)
	r.store.setFail(true)
	if err := r.v.WriteAt(ctx, pattern(bs, 2), 0, false); err == nil {
		t.Fatal("a write whose failed copy could not be recorded was acknowledged")
	}
	r.copies["n1"].fail.Store(false)
	r.store.setFail(false)
	if !r.v.HasSuspects() {
		t.Fatal("the block is not suspect")
	}
	first := make([]byte, bs)
	if err := r.v.ReadAt(ctx, first, 0); err != nil {
		t.Fatal(err)
	}
	// Whichever copy serves the next read, it returns what the first did:
	// both copies now hold it.
	copiesHold(t, r, first, "n1", "n2")
	if r.v.HasSuspects() {
		t.Fatal("the block is still suspect after its copies were made to agree")
	}
}

// A write that reached no copy may still have landed on one whose answer
// was lost, while another missed it: both stay in sync with different
// data, so the block is suspect (chaos seed 129 read the failed write's
// data from one copy, then the older data from the other, 2 s later).
func TestWriteReachingNoCopyLeavesBlockSuspect(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	if err := r.v.WriteAt(ctx, pattern(bs, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	r.copies["n1"].fail.Store(true)
	r.copies["n2"].lostAck.Store(true)
	if err := r.v.WriteAt(ctx, pattern(bs, 2), 0, false); err == nil {
		t.Fatal("a write that reached no copy was acknowledged")
	}
	r.copies["n1"].fail.Store(false)
	r.copies["n2"].lostAck.Store(false)
	if !r.v.HasSuspects() {
		t.Fatal("the block is not suspect")
	}
	first := make([]byte, bs)
	if err := r.v.ReadAt(ctx, first, 0); err != nil {
		t.Fatal(err)
	}
	copiesHold(t, r, first, "n1", "n2")
}

// TestStopUsingTakesACopyOutAtOnce: once the owner stops using a removed
// copy, no read comes from it and no write lands on it, before the copy
// set is replaced.
func TestStopUsingTakesACopyOutAtOnce(t *testing.T) {
	const bs = 64 << 10
	r := newRig(t, 4*bs, bs, 1, "n1", "n2")
	ctx := context.Background()
	if err := r.v.WriteAt(ctx, pattern(bs, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.v.Exclusively(func() error { r.v.StopUsing("n1"); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := r.v.WriteAt(ctx, pattern(bs, 2), 0, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, bs)
	if err := r.copies["n1"].FileCopy.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(bs, 1)) {
		t.Fatal("a write landed on a copy no longer used")
	}
	// n1 (local, read first) holds the old data: a read must not see it.
	if err := r.v.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(bs, 2)) {
		t.Fatal("a read came from a copy no longer used")
	}
}

// copiesHold fails t unless block 0 of every named copy holds want (what
// the first read after a failed write returned).
func copiesHold(t *testing.T, r *rig, want []byte, nodes ...string) {
	t.Helper()
	for _, n := range nodes {
		got := make([]byte, len(want))
		if err := r.copies[n].FileCopy.ReadAt(context.Background(), got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("after the first read, copy %s holds other data than that read returned", n)
		}
	}
}

// fenceable is a copy that counts its fences and can refuse them.
type fenceable struct {
	*faulty
	fences atomic.Int32
	refuse bool
}

func (f *fenceable) Fence(context.Context) error {
	if f.refuse {
		return errors.New("unreachable")
	}
	f.fences.Add(1)
	return nil
}

// FenceAll fences every copy that can be fenced, even ones fenced since
// their last failure (a new owner cannot know what its predecessor sent),
// and names the copies it could not fence.
func TestFenceAll(t *testing.T) {
	r := newRig(t, 4<<16, 1<<16, 1, "n1", "n2", "n3")
	ok := &fenceable{faulty: r.copies["n2"]}
	down := &fenceable{faulty: r.copies["n3"], refuse: true}
	r.reps[1].Copy, r.reps[2].Copy = ok, down
	ctx := context.Background()
	for want := int32(1); want <= 2; want++ {
		bad := r.v.FenceAll(ctx)
		if !slices.Equal(bad, []string{"n3"}) {
			t.Fatalf("FenceAll could not fence %v, want [n3]", bad)
		}
		if got := ok.fences.Load(); got != want {
			t.Fatalf("after %d FenceAll the reachable copy was fenced %d times", want, got)
		}
	}
}
