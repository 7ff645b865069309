package lun

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/ukai-storage/ukai/placement"
)

// Checksummer is a copy that can hash a range where the data is, so that
// comparing copies moves hashes, not data.
type Checksummer interface {
	// Checksum returns the SHA-256 of bytes [off, off+n); a hole hashes
	// like zeros.
	Checksum(ctx context.Context, off, n int64) ([32]byte, error)
}

// checksum hashes a range of r's copy, through Checksummer when it has
// one, else by reading it.
func checksum(ctx context.Context, r *Replica, off, n int64) ([32]byte, error) {
	if c, ok := r.Copy.(Checksummer); ok {
		return c.Checksum(ctx, off, n)
	}
	buf := make([]byte, n)
	if err := r.Copy.ReadAt(ctx, buf, off); err != nil {
		return [32]byte{}, err
	}
	return sha256.Sum256(buf), nil
}

func (v *Volume) blockRange(b int64) (int64, int64) {
	off := b * v.cfg.BlockSize
	return off, min(v.cfg.BlockSize, v.size.Load()-off)
}

func (v *Volume) replica(node string) *Replica {
	v.mu.RLock()
	defer v.mu.RUnlock()
	for _, r := range v.replicas {
		if r.Node == node {
			return r
		}
	}
	return nil
}

// SyncResult says what SyncBlock did.
type SyncResult struct {
	Copied    bool  // data moved (false: the copy was already equal, or in sync)
	Bytes     int64 // bytes copied
	WasInSync bool
}

// SyncBlock brings dst's copy of block b in sync from an in-sync copy. It
// holds the block exclusively for the whole step (I/O of this node waits),
// compares checksums first and copies only when they differ, and records
// the block in sync before it lets I/O through again, so that a write to
// the block can never land between the copy and the record.
func (v *Volume) SyncBlock(ctx context.Context, b int64, dst string) (SyncResult, error) {
	if b < 0 || b >= v.Blocks() {
		return SyncResult{}, fmt.Errorf("block %d outside the image (%d blocks)", b, v.Blocks())
	}
	unlock := v.locks.exclusive(b)
	defer unlock()
	if v.State(dst, b) == placement.InSync {
		return SyncResult{WasInSync: true}, nil
	}
	d := v.replica(dst)
	if d == nil {
		return SyncResult{}, fmt.Errorf("%s holds no copy of this image", dst)
	}
	if !v.alive(dst) {
		return SyncResult{}, fmt.Errorf("node %s is dead", dst)
	}
	// A write sent to dst before (one that timed out, or a former
	// owner's) must not land after the copy below.
	if err := v.fence(ctx, d); err != nil {
		return SyncResult{}, fmt.Errorf("sync block %d to %s: %w", b, dst, err)
	}
	off, n := v.blockRange(b)
	var srcs []*Replica
	for _, r := range v.readOrder(b) {
		if r.Node != dst {
			srcs = append(srcs, r)
		}
	}
	if len(srcs) == 0 {
		return SyncResult{}, fmt.Errorf("block %d: %w", b, ErrNoInSyncCopy)
	}
	res := SyncResult{}
	var errs []error
	done := false
	for _, src := range srcs {
		cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
		same, err := v.sameBlock(cctx, src, d, off, n)
		if err == nil && !same {
			err = v.copyBlock(cctx, src, d, off, n)
			res.Copied, res.Bytes = err == nil, n
		}
		cancel()
		if err == nil {
			done = true
			break
		}
		if ctx.Err() != nil {
			return SyncResult{}, ctx.Err()
		}
		errs = append(errs, fmt.Errorf("from %s: %w", src.Node, err))
	}
	if !done {
		return SyncResult{}, fmt.Errorf("sync block %d to %s: %w", b, dst, errors.Join(errs...))
	}
	// The destination answered: writes may go to it again at once.
	v.noteResult(dst, nil)
	// dst holds the block now (under the exclusive lock): from here on it
	// gets every write to it, even when the record below fails. A failed
	// record may still have landed (the store answered nothing, or
	// restarted after committing), and a successor then trusts dst as in
	// sync: had this owner left dst out of its later writes, dst would be
	// stale yet "in sync", and a successor's reconciliation would copy
	// it over the others (chaos seed 101: an acknowledged write undone, a
	// stale read). An in-sync copy here that the store says is out of
	// sync only costs a sync; the next map from the store brings it back.
	err := v.store.SetBlockStates(ctx, dst, []int64{b}, placement.InSync)
	v.mu.Lock()
	v.setStatesLocked(dst, []int64{b}, placement.InSync)
	v.mu.Unlock()
	if err != nil {
		return SyncResult{}, fmt.Errorf("record block %d of %s in sync: %w", b, dst, err)
	}
	return res, nil
}

func (v *Volume) sameBlock(ctx context.Context, src, dst *Replica, off, n int64) (bool, error) {
	a, err := checksum(ctx, src, off, n)
	if err != nil {
		return false, err
	}
	b, err := checksum(ctx, dst, off, n)
	if err != nil {
		// The destination may be missing data entirely: copy.
		return false, nil
	}
	return a == b, nil
}

func (v *Volume) copyBlock(ctx context.Context, src, dst *Replica, off, n int64) error {
	buf := make([]byte, n)
	if err := src.Copy.ReadAt(ctx, buf, off); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if err := dst.Copy.WriteAt(ctx, buf, off, true); err != nil {
		return fmt.Errorf("write to %s: %w", dst.Node, err)
	}
	return nil
}

// Mismatch is a block whose in-sync copies differ.
type Mismatch struct {
	Block int64
	Sums  map[string][32]byte // by node
}

// VerifyBlock compares the checksums of every in-sync copy of block b
// (holding the block against writes of this node meanwhile). Copies that
// cannot be read are returned in unreachable.
func (v *Volume) VerifyBlock(ctx context.Context, b int64) (mm *Mismatch, unreachable []string, err error) {
	if b < 0 || b >= v.Blocks() {
		return nil, nil, fmt.Errorf("block %d outside the image", b)
	}
	unlock := v.locks.exclusive(b)
	defer unlock()
	off, n := v.blockRange(b)
	sums := map[string][32]byte{}
	for _, r := range v.readOrder(b) {
		cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
		s, err := checksum(cctx, r, off, n)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, ctx.Err()
			}
			unreachable = append(unreachable, r.Node)
			continue
		}
		sums[r.Node] = s
	}
	var first *[32]byte
	for _, s := range sums {
		if first == nil {
			first = &s
		} else if s != *first {
			return &Mismatch{Block: b, Sums: sums}, unreachable, nil
		}
	}
	return nil, unreachable, nil
}

// Checksum implements Checksummer for a local file, reading it in large
// chunks.
func (c *FileCopy) Checksum(ctx context.Context, off, n int64) ([32]byte, error) {
	if off >= 0 && off+n <= c.size.Load() && c.Hole(off, n) {
		// A new location's blocks are holes: no need to read and hash
		// zeros (4 MiB of SHA-256 per block of a sync).
		return c.zeroSum(n), nil
	}
	h := sha256.New()
	buf := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		if err := ctx.Err(); err != nil {
			return [32]byte{}, err
		}
		chunk := buf[:min(int64(len(buf)), n-done)]
		if err := c.ReadAt(ctx, chunk, off+done); err != nil {
			return [32]byte{}, err
		}
		h.Write(chunk)
		done += int64(len(chunk))
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s, nil
}

// ReconcileBlock makes every in-sync copy of block b equal to one chosen
// copy (the first in read order: local first): a copy that differs gets
// the block; a copy that cannot be reached or written is recorded out of
// sync. It returns how many copies it rewrote. A new owner runs it on the
// blocks its predecessor may have been writing when it died.
func (v *Volume) ReconcileBlock(ctx context.Context, b int64) (int, error) {
	if b < 0 || b >= v.Blocks() {
		return 0, fmt.Errorf("block %d outside the image", b)
	}
	unlock := v.locks.exclusive(b)
	defer unlock()
	all := v.readOrder(b)
	if len(all) < 2 {
		return 0, nil
	}
	// Writes a former owner (or this one, timed out) sent to any copy
	// must not land after the copies are made equal.
	var reps []*Replica
	var bad []string
	for _, r := range all {
		if err := v.fence(ctx, r); err != nil {
			v.cfg.Log.Warn("reconcile: cannot fence a copy", "node", r.Node, "block", b, "err", err)
			bad = append(bad, r.Node)
			continue
		}
		reps = append(reps, r)
	}
	if len(reps) == 0 {
		return 0, fmt.Errorf("reconcile block %d: no copy could be fenced", b)
	}
	off, n := v.blockRange(b)
	src := reps[0]
	buf := make([]byte, n)
	if err := src.Copy.ReadAt(ctx, buf, off); err != nil {
		return 0, fmt.Errorf("reconcile block %d: read %s: %w", b, src.Node, err)
	}
	want := sha256.Sum256(buf)
	rewritten := 0
	for _, r := range reps[1:] {
		cctx, cancel := context.WithTimeout(ctx, v.cfg.CopyTimeout)
		got, err := checksum(cctx, r, off, n)
		if err == nil && got != want {
			err = r.Copy.WriteAt(cctx, buf, off, true)
			if err == nil {
				rewritten++
			}
		}
		cancel()
		if err != nil {
			bad = append(bad, r.Node)
		}
	}
	if len(bad) > 0 {
		if err := v.markOutOfSync(ctx, bad, []int64{b}); err != nil {
			return rewritten, err
		}
	}
	return rewritten, nil
}

// zeroSum is the checksum of n zero bytes, remembered for the last n asked
// (an image's block size).
func (c *FileCopy) zeroSum(n int64) [32]byte {
	if z := c.zsum.Load(); z != nil && z.n == n {
		return z.sum
	}
	h := sha256.New()
	zeros := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; done += int64(len(zeros)) {
		h.Write(zeros[:min(int64(len(zeros)), n-done)])
	}
	z := &zeroSum{n: n}
	copy(z.sum[:], h.Sum(nil))
	c.zsum.Store(z)
	return z.sum
}

type zeroSum struct {
	n   int64
	sum [32]byte
}
