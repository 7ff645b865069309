package lun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/blockdev"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Replica is one copy of an image as a volume sees it.
type Replica struct {
	Node  string
	Copy  Copy
	Local bool
	// RTT estimates the copy's latency for nearest-copy reads; nil or 0
	// means unknown (tried after the known ones).
	RTT func() time.Duration
}

// MapStore records block state changes in the metadata store. Both calls
// return only once the change is stored.
type MapStore interface {
	SetBlockStates(ctx context.Context, node string, blocks []int64, s placement.SyncState) error
}

// Config is a volume's geometry and policy.
type Config struct {
	Size      int64
	BlockSize int64
	// MinCopies is how many copies a write must reach; fewer fails the
	// write with a SCSI error.
	MinCopies int
	// CopyTimeout bounds each copy's part of a request (default 10 s): a
	// copy that does not answer in time is treated as failed.
	CopyTimeout time.Duration
	// Alive reports whether a node is alive in the membership; a dead
	// node's copy is not waited on. Nil: all alive.
	Alive func(node string) bool
	// BeforeWrite, when set, runs before a write or unmap of blocks
	// starts (the owner's activity log); an error fails the request
	// before any copy is touched.
	BeforeWrite func(ctx context.Context, blocks []int64) error
	Log         *slog.Logger
}

// Volume is the LUN backend of one image: it implements scsi.Backend over
// the image's copies. Every request is split at block boundaries; reads
// take each block from the nearest in-sync copy (local first), writes go
// to every in-sync copy in parallel, and a copy that fails is recorded out
// of sync for exactly the blocks written before the write is acknowledged.
type Volume struct {
	cfg   Config
	store MapStore
	locks blockLocks
	// ranges orders overlapping writes (see rangeLocks); taken before
	// the block locks.
	ranges rangeLocks

	mu       sync.RWMutex
	replicas []*Replica
	maps     map[string]*placement.BlockMap // by node
	dirty    map[string]map[int64]bool      // blocks written since the copy's last Sync
	// failedAt records a copy's last failure: for CopyTimeout after it,
	// requests fail at once instead of each waiting out the timeout (a
	// stalled peer would otherwise cost every new block a full timeout).
	failedAt map[string]time.Time

	lastIO atomic.Int64 // unix nanos of the last foreground request
	size   atomic.Int64 // bytes; grows online (Grow)

	// suspect holds blocks a failed request may have left different on
	// in-sync copies (some copies took it, and the others could not be
	// recorded out of sync; or it reached none, and a copy whose answer
	// was lost may have taken it); guarded by mu. ReconcileSuspects
	// repairs them.
	suspect map[int64]bool

	// seq numbers the block-state records this volume made (stored
	// first, then applied here); marked keeps the last one of each
	// (node, block), with its state, until maps read after it are
	// installed. Maps read from the catalog before such a record must not
	// undo it when they are installed (SetReplicas, Grow). Out of sync: a
	// write that failed on a copy between the read and the install would
	// otherwise make the copy in sync again in memory, and a read could
	// return data older than an acknowledged write. In sync too (chaos
	// seed 114): a sync recorded between the read and the install was
	// undone in memory only, the owner then left the copy out of its
	// writes without recording anything, the catalog still said in sync,
	// and the next owner read the copy: every write acknowledged in
	// between was lost. The marks cost one entry per block changed since
	// the last install (a full resync of a 100 GiB image in 4 MiB blocks
	// between two installs: 25,600). Guarded by mu.
	seq    uint64
	marked map[string]map[int64]mark

	// owed holds, per node, blocks written to its copy whose flush failed
	// and that are not recorded out of sync yet: no flush answers GOOD
	// until they are (a copy that failed a flush may have lost them,
	// even if its next flush works). Guarded by mu.
	owed map[string]map[int64]bool

	// writeFails counts, per node, the writes and unmaps to its copy that
	// failed (a timed-out one may still land); fencedAt is the count a
	// copy was last fenced at (Fencer). A sync or a reconcile fences a
	// copy first unless it was fenced since its last failure, so that no
	// write sent before can land after the block is copied. Guarded by
	// mu.
	writeFails map[string]uint64
	fencedAt   map[string]uint64
	// fenceMu makes the sync workers that find a copy unfenced send one
	// fence, not one each.
	fenceMu sync.Mutex
}

// Fencer is a copy that can be fenced (blockdev.Fencer).
type Fencer = blockdev.Fencer

// fence fences r's copy unless it was fenced since its last failed write.
// The caller holds the blocks it is about to copy or compare.
func (v *Volume) fence(ctx context.Context, r *Replica) error {
	f, ok := r.Copy.(Fencer)
	if !ok {
		return nil
	}
	v.fenceMu.Lock()
	defer v.fenceMu.Unlock()
	v.mu.RLock()
	fails := v.writeFails[r.Node]
	at, done := v.fencedAt[r.Node]
	v.mu.RUnlock()
	if done && at == fails {
		return nil
	}
	return v.fenceNow(ctx, r, f)
}

// fenceNow fences r's copy (f) within the copy timeout and notes the
// failures it covers. The caller holds fenceMu.
func (v *Volume) fenceNow(ctx context.Context, r *Replica, f Fencer) error {
	v.mu.RLock()
	fails := v.writeFails[r.Node]
	v.mu.RUnlock()
	cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
	defer cancel()
	if err := f.Fence(cctx); err != nil {
		return fmt.Errorf("fence the copy on %s: %w", r.Node, err)
	}
	v.mu.Lock()
	// Failures counted after fails may have sent writes after the fence:
	// the next sync fences again.
	if cur, ok := v.fencedAt[r.Node]; !ok || cur < fails {
		v.fencedAt[r.Node] = fails
	}
	v.mu.Unlock()
	return nil
}

// FenceAll fences every copy that can be fenced, in parallel, whatever its
// past failures, and returns the nodes whose copies could not be. A new
// owner does it before it reads the activity log and serves: a former
// owner's write admitted at a copy lands before the fence answers, one
// that arrives later is refused, so nothing the former owner sent lands
// after the new owner's first read or write.
func (v *Volume) FenceAll(ctx context.Context) []string {
	v.mu.RLock()
	reps := slices.Clone(v.replicas)
	v.mu.RUnlock()
	v.fenceMu.Lock()
	defer v.fenceMu.Unlock()
	var (
		wg  sync.WaitGroup
		bmu sync.Mutex
		bad []string
	)
	for _, r := range reps {
		f, ok := r.Copy.(Fencer)
		if !ok {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := v.fenceNow(ctx, r, f); err != nil {
				v.cfg.Log.Warn("cannot fence a copy", "node", r.Node, "err", err)
				bmu.Lock()
				bad = append(bad, r.Node)
				bmu.Unlock()
			}
		}()
	}
	wg.Wait()
	slices.Sort(bad)
	return bad
}

// MapVersion orders block maps read from the catalog against the state
// changes a volume makes: read it before reading the maps, and pass it to
// SetReplicas or Grow with them.
type MapVersion uint64

// MapVersion returns the volume's current version (see MapVersion).
func (v *Volume) MapVersion() MapVersion {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return MapVersion(v.seq)
}

// mark is a block-state record this volume made (see Volume.marked).
type mark struct {
	seq   uint64
	state placement.SyncState
}

// setStatesLocked records in memory a change already stored: blocks of
// node's copy are now in state s. The caller holds mu.
func (v *Volume) setStatesLocked(node string, blocks []int64, s placement.SyncState) {
	v.seq++
	mk := v.marked[node]
	if mk == nil {
		mk = map[int64]mark{}
		v.marked[node] = mk
	}
	m := v.maps[node]
	for _, b := range blocks {
		mk[b] = mark{v.seq, s}
		if m != nil {
			m.Set(b, s)
		}
	}
}

// touch notes foreground I/O (the synchronizer yields to it).
func (v *Volume) touch() { v.lastIO.Store(time.Now().UnixNano()) }

// QuietFor reports whether no foreground request started within d.
func (v *Volume) QuietFor(d time.Duration) bool {
	return time.Since(time.Unix(0, v.lastIO.Load())) >= d
}

// NewVolume returns the backend of an image over its replicas, with the
// block maps as the catalog has them.
func NewVolume(cfg Config, replicas []*Replica, maps map[string]*placement.BlockMap, store MapStore) (*Volume, error) {
	if cfg.BlockSize <= 0 || cfg.BlockSize&(cfg.BlockSize-1) != 0 {
		return nil, fmt.Errorf("block size %d is not a power of two", cfg.BlockSize)
	}
	if cfg.MinCopies < 1 {
		cfg.MinCopies = 1
	}
	if cfg.CopyTimeout <= 0 {
		cfg.CopyTimeout = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	v := &Volume{cfg: cfg, store: store,
		dirty: map[string]map[int64]bool{}, failedAt: map[string]time.Time{},
		marked: map[string]map[int64]mark{}, owed: map[string]map[int64]bool{},
		writeFails: map[string]uint64{}, fencedAt: map[string]uint64{}}
	v.size.Store(cfg.Size)
	if err := v.SetReplicas(replicas, maps, 0); err != nil {
		return nil, err
	}
	return v, nil
}

// SetMinCopies changes how many copies a write must reach.
func (v *Volume) SetMinCopies(k int) {
	v.mu.Lock()
	v.cfg.MinCopies = max(k, 1)
	v.mu.Unlock()
}

// Blocks is the number of blocks.
func (v *Volume) Blocks() int64 { return (v.size.Load() + v.cfg.BlockSize - 1) / v.cfg.BlockSize }

// Size is the volume's size in bytes.
func (v *Volume) Size() int64 { return v.size.Load() }

// Grow makes the volume size bytes long, with the copies' block maps of
// the new length (every copy must already cover the new size), read at
// version readAt. No I/O runs meanwhile. A smaller size is refused.
func (v *Volume) Grow(size int64, replicas []*Replica, maps map[string]*placement.BlockMap, readAt MapVersion) error {
	return v.Exclusively(func() error {
		old := v.size.Load()
		if size < old {
			return fmt.Errorf("volume is %d bytes: cannot shrink to %d", old, size)
		}
		v.size.Store(size)
		if err := v.SetReplicas(replicas, maps, readAt); err != nil {
			v.size.Store(old)
			return err
		}
		return nil
	})
}

// ReadHeld reads like ReadAt for a caller that already holds the blocks
// (a BeforeWrite hook preserving data before it changes).
func (v *Volume) ReadHeld(ctx context.Context, p []byte, off int64) error {
	ps, err := v.split(off, int64(len(p)))
	if err != nil {
		return err
	}
	return each(ps, func(pc piece) error { return v.readUnlocked(ctx, p[pc.lo:pc.lo+pc.n], pc) })
}

// SetReplicas replaces the copies and block maps (a location was added or
// removed, or the maps changed in the catalog). Replicas not in the new
// set are closed. readAt is the MapVersion read before the maps were: the
// state changes this volume made after it are applied on top of them, so
// a copy recorded out of sync meanwhile stays out of sync.
func (v *Volume) SetReplicas(replicas []*Replica, maps map[string]*placement.BlockMap, readAt MapVersion) error {
	for _, r := range replicas {
		m, ok := maps[r.Node]
		if !ok || m.Len() != v.Blocks() {
			return fmt.Errorf("no block map of %d blocks for copy on %s", v.Blocks(), r.Node)
		}
	}
	v.mu.Lock()
	old := v.replicas
	v.replicas = replicas
	v.maps = map[string]*placement.BlockMap{}
	for n, m := range maps {
		v.maps[n] = m.Clone()
	}
	for n, mk := range v.marked {
		m := v.maps[n]
		for b, k := range mk {
			switch {
			case k.seq <= uint64(readAt):
				delete(mk, b) // stored before the maps were read: they have it
			case m != nil && b < m.Len():
				m.Set(b, k.state)
			}
		}
		if len(mk) == 0 || m == nil {
			delete(v.marked, n)
		}
	}
	for n := range v.fencedAt {
		if !slices.ContainsFunc(replicas, func(r *Replica) bool { return r.Node == n }) {
			delete(v.fencedAt, n) // a copy that comes back is fenced anew
		}
	}
	for n := range v.owed {
		if _, ok := v.maps[n]; !ok {
			delete(v.owed, n) // the copy is gone: nothing to record of it
		}
	}
	v.mu.Unlock()
	for _, o := range old {
		if !slices.ContainsFunc(replicas, func(r *Replica) bool { return r == o }) {
			o.Copy.Close()
		}
	}
	return nil
}

// HasSuspects reports blocks that may differ between in-sync copies.
func (v *Volume) HasSuspects() bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return len(v.suspect) > 0
}

// ReconcileSuspects makes the in-sync copies agree on every suspect block
// (see ReconcileBlock); blocks it cannot repair stay suspect.
func (v *Volume) ReconcileSuspects(ctx context.Context) error {
	v.mu.RLock()
	var bs []int64
	for b := range v.suspect {
		bs = append(bs, b)
	}
	v.mu.RUnlock()
	for _, b := range bs {
		if _, err := v.ReconcileBlock(ctx, b); err != nil {
			return err
		}
		v.mu.Lock()
		delete(v.suspect, b)
		v.mu.Unlock()
	}
	return nil
}

// Exclusively runs fn while no I/O and no sync touches any block (new
// I/O waits): the block maps cannot change under fn.
func (v *Volume) Exclusively(fn func() error) error {
	for i := range v.locks.stripes {
		v.locks.stripes[i].Lock()
	}
	defer func() {
		for i := range v.locks.stripes {
			v.locks.stripes[i].Unlock()
		}
	}()
	return fn()
}

// Drain waits for the I/O in flight to finish (new I/O waits meanwhile):
// after SetReplicas, a removed copy is no longer used once Drain returns.
func (v *Volume) Drain() { v.locks.drain() }

// StopUsing takes node's copy out of reads and writes at once (its map
// reads as out of sync in memory; nothing is recorded) until the next
// SetReplicas, which drops or reinstates it. The owner calls it, every
// block held (Exclusively), once the catalog no longer lists the copy:
// between that record and the new copy set, a write must not land on a
// copy about to be deleted, nor a read come from it (chaos seed 129: a
// failed write landed only on the owner's own removed copy, a read
// returned it, and the copy was deleted 20 ms later).
func (v *Volume) StopUsing(node string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if m, ok := v.maps[node]; ok {
		v.maps[node] = placement.NewBlockMap(m.Len(), placement.OutOfSync)
	}
}

// State returns the state of block b of node's copy (OutOfSync when the
// node holds no copy).
func (v *Volume) State(node string, b int64) placement.SyncState {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if m, ok := v.maps[node]; ok {
		return m.Get(b)
	}
	return placement.OutOfSync
}

// MapsSnapshot returns copies of the block maps.
func (v *Volume) MapsSnapshot() map[string]*placement.BlockMap {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := map[string]*placement.BlockMap{}
	for n, m := range v.maps {
		out[n] = m.Clone()
	}
	return out
}

func (v *Volume) minCopies() int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.cfg.MinCopies
}

func (v *Volume) alive(node string) bool { return v.cfg.Alive == nil || v.cfg.Alive(node) }

// usable says whether to send a request to node's copy now: its node is
// alive and it did not fail within the last CopyTimeout.
func (v *Volume) usable(node string) error {
	if !v.alive(node) {
		return fmt.Errorf("node %s is dead", node)
	}
	v.mu.RLock()
	at, failed := v.failedAt[node]
	v.mu.RUnlock()
	if failed && time.Since(at) < v.cfg.CopyTimeout {
		return fmt.Errorf("copy on %s failed %v ago", node, time.Since(at).Round(time.Millisecond))
	}
	return nil
}

// noteResult records whether a request to node's copy worked.
func (v *Volume) noteResult(node string, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err == nil {
		delete(v.failedAt, node)
	} else {
		v.failedAt[node] = time.Now()
	}
}

// piece is the part of a request inside one block.
type piece struct {
	block int64
	off   int64 // byte offset in the image
	lo    int64 // start within the request buffer
	n     int64
}

func (v *Volume) split(off, n int64) ([]piece, error) {
	if size := v.size.Load(); off < 0 || n < 0 || off+n > size {
		return nil, fmt.Errorf("range %d+%d outside the image (size %d)", off, n, size)
	}
	bs := v.cfg.BlockSize
	ps := make([]piece, 0, n/bs+2)
	for done := int64(0); done < n; {
		o := off + done
		b := o / bs
		l := min(n-done, (b+1)*bs-o)
		ps = append(ps, piece{block: b, off: o, lo: done, n: l})
		done += l
	}
	return ps, nil
}

// readOrder returns the in-sync copies of block b, local first, then by
// measured latency, dead nodes left out.
func (v *Volume) readOrder(b int64) []*Replica {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var out []*Replica
	for _, r := range v.replicas {
		if v.maps[r.Node].Get(b) == placement.InSync && v.alive(r.Node) {
			out = append(out, r)
		}
	}
	slices.SortStableFunc(out, func(a, c *Replica) int {
		// A copy whose flush of the block failed is the last resort.
		if oa, oc := v.owed[a.Node][b], v.owed[c.Node][b]; oa != oc {
			if oc {
				return -1
			}
			return 1
		}
		if a.Local != c.Local {
			if a.Local {
				return -1
			}
			return 1
		}
		ra, rc := rtt(a), rtt(c)
		switch {
		case ra == rc:
			return 0
		case ra == 0:
			return 1
		case rc == 0:
			return -1
		case ra < rc:
			return -1
		}
		return 1
	})
	return out
}

func rtt(r *Replica) time.Duration {
	if r.RTT == nil {
		return 0
	}
	return r.RTT()
}

// ErrNoInSyncCopy is a block with no in-sync copy reachable: reads of it
// fail with a medium error, never stale data.
var ErrNoInSyncCopy = errors.New("no in-sync copy of the block is reachable")

func mediumError(err error) error {
	return &scsi.SenseError{Key: scsi.SenseMediumError, ASC: 0x11, ASCQ: 0x00, Err: err}
}

// writeError is a write, unmap or flush that failed: MEDIUM ERROR, WRITE
// ERROR (0c/00).
func writeError(err error) error {
	if se, ok := scsi.AsSense(err); ok && se.Key == scsi.SenseNotReady {
		// The store refused the record because this node no longer owns
		// the image (04/0a): the initiator retries that, through the
		// new owner; MEDIUM ERROR it would not.
		return err
	}
	return &scsi.SenseError{Key: scsi.SenseMediumError, ASC: 0x0c, ASCQ: 0x00, Err: err}
}

// ReadAt implements scsi.Backend.
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) error {
	v.touch()
	ps, err := v.split(off, int64(len(p)))
	if err != nil {
		return err
	}
	return each(ps, func(pc piece) error { return v.readPiece(ctx, p[pc.lo:pc.lo+pc.n], pc) })
}

func (v *Volume) readPiece(ctx context.Context, buf []byte, pc piece) error {
	if v.isSuspect(pc.block) {
		// A failed write may have left the in-sync copies of this block
		// different (some took it, the others could not be recorded out
		// of sync): make them agree before reading, or two reads served
		// by two copies return different data, the newer one first
		// (chaos seed 110: a stale read 3 s after the newer value was
		// read). Until they agree the read fails.
		if _, err := v.ReconcileBlock(ctx, pc.block); err != nil {
			return fmt.Errorf("read of block %d: its copies may differ and cannot be made to agree: %w", pc.block, err)
		}
		v.mu.Lock()
		delete(v.suspect, pc.block)
		v.mu.Unlock()
	}
	defer v.locks.shared([]piece{pc})()
	return v.readUnlocked(ctx, buf, pc)
}

func (v *Volume) isSuspect(b int64) bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.suspect[b]
}

func (v *Volume) readUnlocked(ctx context.Context, buf []byte, pc piece) error {
	var errs []error
	for _, r := range v.readOrder(pc.block) {
		cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
		err := r.Copy.ReadAt(cctx, buf, pc.off)
		cancel()
		if err == nil {
			if len(errs) > 0 {
				// Copies that failed before this one are now known bad
				// for the block, and another copy has it.
				v.markFailed(ctx, failedNodes(errs), []int64{pc.block})
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		v.cfg.Log.Warn("read from copy failed; trying another", "node", r.Node, "block", pc.block, "err", err)
		errs = append(errs, &copyError{node: r.Node, err: err})
	}
	return mediumError(fmt.Errorf("block %d: %w: %v", pc.block, ErrNoInSyncCopy, errors.Join(errs...)))
}

type copyError struct {
	node string
	err  error
}

func (e *copyError) Error() string { return e.node + ": " + e.err.Error() }

func failedNodes(errs []error) []string {
	var out []string
	for _, e := range errs {
		var ce *copyError
		if errors.As(e, &ce) {
			out = append(out, ce.node)
		}
	}
	return out
}

// markFailed records nodes' copies of blocks out of sync, in the store
// first, then in memory. A read fallback that cannot record it only logs:
// the data returned is correct either way.
func (v *Volume) markFailed(ctx context.Context, nodes []string, blocks []int64) {
	if err := v.markOutOfSync(ctx, nodes, blocks); err != nil {
		v.cfg.Log.Error("cannot record failed copies out of sync", "nodes", nodes, "err", err)
	}
}

func (v *Volume) markOutOfSync(ctx context.Context, nodes []string, blocks []int64) error {
	for _, n := range nodes {
		if err := v.store.SetBlockStates(ctx, n, blocks, placement.OutOfSync); err != nil {
			return fmt.Errorf("mark %d blocks of %s out of sync: %w", len(blocks), n, err)
		}
		v.mu.Lock()
		v.setStatesLocked(n, blocks, placement.OutOfSync)
		v.mu.Unlock()
		v.cfg.Log.Warn("copy marked out of sync", "node", n, "blocks", len(blocks))
	}
	return nil
}

// writeTargets returns the copies a write of block b goes to: every
// in-sync copy. Out-of-sync copies are left to the synchronizer.
func (v *Volume) writeTargets(b int64) []*Replica {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var out []*Replica
	for _, r := range v.replicas {
		if v.maps[r.Node].Get(b) == placement.InSync {
			out = append(out, r)
		}
	}
	return out
}

// writeOp is one piece written to one copy.
type writeOp struct {
	r  *Replica
	pc piece
}

// fanOut runs op on every (copy, piece) pair in parallel and returns,
// per block, the copies that succeeded and failed. Copies of dead nodes
// fail at once.
func (v *Volume) fanOut(ctx context.Context, ps []piece, op func(ctx context.Context, r *Replica, pc piece) error) (ok, failed map[int64][]string) {
	var ops []writeOp
	for _, pc := range ps {
		for _, r := range v.writeTargets(pc.block) {
			ops = append(ops, writeOp{r, pc})
		}
	}
	errs := make([]error, len(ops))
	var wg sync.WaitGroup
	run := func(i int, o writeOp) {
		cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
		defer cancel()
		errs[i] = op(cctx, o.r, o.pc)
		if ctx.Err() == nil {
			v.noteResult(o.r.Node, errs[i])
		}
	}
	last := -1 // the last usable op runs in this goroutine: one fewer to start
	for i, o := range ops {
		if err := v.usable(o.r.Node); err != nil {
			errs[i] = err
			continue
		}
		if last >= 0 {
			wg.Add(1)
			go func(i int, o writeOp) {
				defer wg.Done()
				run(i, o)
			}(last, ops[last])
		}
		last = i
	}
	if last >= 0 {
		run(last, ops[last])
	}
	wg.Wait()
	ok, failed = map[int64][]string{}, map[int64][]string{}
	for i, o := range ops {
		if errs[i] == nil {
			ok[o.pc.block] = append(ok[o.pc.block], o.r.Node)
		} else {
			v.mu.Lock()
			v.writeFails[o.r.Node]++
			v.mu.Unlock()
			failed[o.pc.block] = append(failed[o.pc.block], o.r.Node)
			v.cfg.Log.Warn("write to copy failed", "node", o.r.Node, "block", o.pc.block, "err", errs[i])
		}
	}
	for _, pc := range ps {
		if _, seen := ok[pc.block]; !seen {
			ok[pc.block] = nil
		}
	}
	return ok, failed
}

// markSuspect records blocks whose in-sync copies may differ (see
// suspect).
func (v *Volume) markSuspect(blocks []int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.suspect == nil {
		v.suspect = map[int64]bool{}
	}
	for _, b := range blocks {
		v.suspect[b] = true
	}
}

// settle records the failed copies of every block that reached at least
// one copy, then decides the outcome: every block must have reached
// MinCopies copies.
func (v *Volume) settle(ctx context.Context, what string, ok, failed map[int64][]string) error {
	byNode := map[string][]int64{}
	var short []int64
	var lost []int64 // reached no copy, but meant for two or more
	for b, good := range ok {
		if len(good) > 0 {
			for _, n := range failed[b] {
				byNode[n] = append(byNode[n], b)
			}
		} else if len(failed[b]) >= 2 {
			lost = append(lost, b)
		}
		if len(good) < v.minCopies() {
			short = append(short, b)
		}
	}
	if len(lost) > 0 {
		// A copy whose answer was lost (a timeout, a reset) may hold the
		// new data while another missed it, both still in sync and
		// nothing recorded: the block is suspect, and the next read makes
		// the copies agree first (chaos seed 129 read the failed write's
		// data from one copy, then the older data from the other).
		v.markSuspect(lost)
	}
	for n, bs := range byNode {
		slices.Sort(bs)
		if err := v.markOutOfSync(ctx, []string{n}, bs); err != nil {
			// Not recorded: the write must not be acknowledged, and the
			// copies may now differ on these blocks.
			for _, bb := range byNode {
				v.markSuspect(bb)
			}
			return writeError(fmt.Errorf("%s: %w", what, err))
		}
	}
	if len(short) > 0 {
		slices.Sort(short)
		return writeError(fmt.Errorf("%s of block %d reached %d copies, fewer than min_copies %d", what, short[0], len(ok[short[0]]), v.minCopies()))
	}
	return nil
}

// WriteAt implements scsi.Backend.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	v.touch()
	ps, err := v.split(off, int64(len(p)))
	if err != nil {
		return err
	}
	unlock, err := v.ranges.lock(ctx, off, off+int64(len(p)))
	if err != nil {
		return err
	}
	defer unlock()
	defer v.locks.shared(ps)()
	if err := v.beforeWrite(ctx, ps); err != nil {
		return err
	}
	ok, failed := v.fanOut(ctx, ps, func(ctx context.Context, r *Replica, pc piece) error {
		return r.Copy.WriteAt(ctx, p[pc.lo:pc.lo+pc.n], pc.off, fua)
	})
	if !fua {
		v.noteDirty(ok)
	}
	return v.settle(ctx, "write", ok, failed)
}

func (v *Volume) beforeWrite(ctx context.Context, ps []piece) error {
	if v.cfg.BeforeWrite == nil {
		return nil
	}
	blocks := make([]int64, 0, len(ps))
	for _, p := range ps {
		blocks = append(blocks, p.block)
	}
	if err := v.cfg.BeforeWrite(ctx, blocks); err != nil {
		var se *scsi.SenseError
		if errors.As(err, &se) {
			// The hook chose the sense (NOT READY: retry, say).
			return &scsi.SenseError{Key: se.Key, ASC: se.ASC, ASCQ: se.ASCQ, Err: fmt.Errorf("before the write: %w", err)}
		}
		return writeError(fmt.Errorf("record the write in the activity log: %w", err))
	}
	return nil
}

func (v *Volume) noteDirty(ok map[int64][]string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for b, nodes := range ok {
		for _, n := range nodes {
			d := v.dirty[n]
			if d == nil {
				d = map[int64]bool{}
				v.dirty[n] = d
			}
			d[b] = true
		}
	}
}

// Flush implements scsi.Backend: every in-sync copy syncs in parallel; a
// copy that fails is recorded out of sync for the blocks written to it
// since its last successful sync. Until that record is stored, every
// flush fails: a copy whose flush failed may have lost those blocks (its
// node restarted, say) even when its next flush works, so answering GOOD
// to the initiator's retry would acknowledge data one in-sync copy lacks.
func (v *Volume) Flush(ctx context.Context) error {
	v.mu.Lock()
	reps := slices.Clone(v.replicas)
	dirty := v.dirty
	v.dirty = map[string]map[int64]bool{}
	v.mu.Unlock()
	errs := make([]error, len(reps))
	var wg sync.WaitGroup
	for i, r := range reps {
		if err := v.usable(r.Node); err != nil {
			errs[i] = err
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
			defer cancel()
			errs[i] = r.Copy.Sync(cctx)
			if ctx.Err() == nil {
				v.noteResult(r.Node, errs[i])
			}
		}()
	}
	wg.Wait()
	// Blocks dirty on a copy that failed are owed an out-of-sync record
	// when another copy has them durably; blocks no copy synced stay
	// dirty (nothing better holds them) and this flush fails.
	synced := map[int64]bool{}
	for i, r := range reps {
		if errs[i] == nil {
			for b := range dirty[r.Node] {
				synced[b] = true
			}
		}
	}
	unsynced := 0
	v.mu.Lock()
	for i, r := range reps {
		if errs[i] == nil {
			continue
		}
		for b := range dirty[r.Node] {
			if synced[b] {
				if v.owed[r.Node] == nil {
					v.owed[r.Node] = map[int64]bool{}
				}
				v.owed[r.Node][b] = true
			} else {
				unsynced++
				if v.dirty[r.Node] == nil {
					v.dirty[r.Node] = map[int64]bool{}
				}
				v.dirty[r.Node][b] = true
			}
		}
	}
	owed := map[string][]int64{}
	for n, bs := range v.owed {
		for b := range bs {
			owed[n] = append(owed[n], b)
		}
	}
	v.mu.Unlock()
	for n, bs := range owed {
		slices.Sort(bs)
		if err := v.markOutOfSync(ctx, []string{n}, bs); err != nil {
			return writeError(fmt.Errorf("flush: %w", err))
		}
		v.mu.Lock()
		for _, b := range bs {
			delete(v.owed[n], b)
		}
		if len(v.owed[n]) == 0 {
			delete(v.owed, n)
		}
		v.mu.Unlock()
	}
	// A flush must reach MinCopies copies even when nothing was dirty.
	good := 0
	for _, e := range errs {
		if e == nil {
			good++
		}
	}
	if good < v.minCopies() {
		return writeError(fmt.Errorf("flush reached %d copies, fewer than min_copies %d: %v", good, v.minCopies(), errors.Join(errs...)))
	}
	if unsynced > 0 {
		return writeError(fmt.Errorf("flush: %d written blocks reached no copy durably: %v", unsynced, errors.Join(errs...)))
	}
	return nil
}

// Unmap implements scsi.Backend on every in-sync copy, like a write.
func (v *Volume) Unmap(ctx context.Context, off, n int64) error {
	ps, err := v.split(off, n)
	if err != nil {
		return err
	}
	unlock, err := v.ranges.lock(ctx, off, off+n)
	if err != nil {
		return err
	}
	defer unlock()
	defer v.locks.shared(ps)()
	if err := v.beforeWrite(ctx, ps); err != nil {
		return err
	}
	ok, failed := v.fanOut(ctx, ps, func(ctx context.Context, r *Replica, pc piece) error {
		return r.Copy.Unmap(ctx, pc.off, pc.n)
	})
	return v.settle(ctx, "unmap", ok, failed)
}

// Close closes every copy.
func (v *Volume) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	var errs []error
	for _, r := range v.replicas {
		errs = append(errs, r.Copy.Close())
	}
	v.replicas = nil
	return errors.Join(errs...)
}

// each runs fn on every piece, in parallel when there are several.
func each(ps []piece, fn func(piece) error) error {
	if len(ps) == 1 {
		return fn(ps[0])
	}
	errs := make([]error, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(p)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}
