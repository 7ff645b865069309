package node

import (
	"context"
	"fmt"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// RevertSnapshot implements api.Service: image's data becomes its
// snapshot short's again, in place, on the image's owner.
//
// Only the blocks the snapshot holds itself differ from the image (the
// others are still shared with it: package cow), so only those are
// written back, through the volume like any write: to every copy, each
// block preserved first into the image's other snapshots that share it.
// The part of an image grown since the snapshot is unmapped (it did not
// exist then: it reads as zeros).
//
// The image is fenced meanwhile: its initiators' I/O waits (delayed, not
// failed) until the revert ends, so nobody reads a half-reverted image,
// and no COMPARE AND WRITE compares before the revert and writes after.
// A revert that fails half way leaves a mix: running it again finishes it.
func (n *Node) RevertSnapshot(ctx context.Context, image, short string) (api.Image, error) {
	if err := meta.ValidateName(image); err != nil {
		return api.Image{}, err
	}
	if err := meta.ValidateSnapshotName(short); err != nil {
		return api.Image{}, err
	}
	if c, err := n.remoteOwner(ctx, image); err != nil {
		return api.Image{}, err
	} else if c != nil {
		return c.RevertSnapshot(ctx, image, short)
	}
	snapRec, err := n.snapshotRecord(ctx, image, short)
	if err != nil {
		return api.Image{}, err
	}
	s, done, err := n.ownOrigin(ctx, image)
	if err != nil {
		return api.Image{}, err
	}
	defer done()
	if !s.Record().HasSnapshot(snapRec.ID) {
		return api.Image{}, fmt.Errorf("%w: %s is not a snapshot of %s any more", meta.ErrImageNotFound, snapRec.Name, image)
	}
	sn, err := n.snapshotServed(ctx, meta.SnapshotRef{Name: snapRec.Name, ID: snapRec.ID})
	if err != nil {
		return api.Image{}, fmt.Errorf("snapshot %s: %w", snapRec.Name, err)
	}
	snapDone, err := n.ownSnapshot(ctx, sn)
	if err != nil {
		return api.Image{}, err
	}
	defer snapDone()
	// The other snapshots are owned here before any block is held, as
	// for any write (ownedBackend.WriteAt).
	if err := n.ensureSnapshots(ctx, s); err != nil {
		return api.Image{}, err
	}
	start := time.Now()
	if s.LU != nil {
		defer s.LU.HoldWrites()()
	}
	open, err := s.Fence.Close(ctx)
	if err != nil {
		return api.Image{}, fmt.Errorf("revert %s: %w", image, err)
	}
	defer open()
	// Once the fence is closed the revert runs to its end even if its
	// caller goes away: stopped half way it would leave a mix.
	ctx = context.WithoutCancel(ctx)
	fenced := time.Now()
	held, err := s.Cow.Held(ctx, cowImage{n, sn})
	if err != nil {
		return api.Image{}, err
	}
	img, snap := s.Record(), sn.Record()
	var rewritten, unmapped int64
	buf := make([]byte, snap.BlockSize)
	for _, b := range held {
		off := b * snap.BlockSize
		p := buf[:min(snap.BlockSize, snap.Size-off)]
		if n.snapshotHole(ctx, s, sn, b) {
			if err := s.Vol.Unmap(ctx, off, int64(len(p))); err != nil {
				return api.Image{}, fmt.Errorf("revert %s to %s: unmap block %d: %w", image, snapRec.Name, b, err)
			}
			unmapped++
			continue
		}
		if err := n.readSnapshot(ctx, s, sn, p, off); err != nil {
			return api.Image{}, fmt.Errorf("revert %s to %s: read block %d: %w", image, snapRec.Name, b, err)
		}
		if err := s.Vol.WriteAt(ctx, p, off, false); err != nil {
			return api.Image{}, fmt.Errorf("revert %s to %s: write block %d: %w", image, snapRec.Name, b, err)
		}
		rewritten++
	}
	if tail := img.Size - snap.Size; tail > 0 {
		// Unmapped ranges read as zeros on every copy (a file copy
		// punches a hole, which zeroes partial blocks too).
		if err := s.Vol.Unmap(ctx, snap.Size, tail); err != nil {
			return api.Image{}, fmt.Errorf("revert %s to %s: clear what the image grew by since: %w", image, snapRec.Name, err)
		}
	}
	if err := s.Vol.Flush(ctx); err != nil {
		return api.Image{}, fmt.Errorf("revert %s to %s: flush: %w", image, snapRec.Name, err)
	}
	open()
	n.log.Info("image reverted to a snapshot", "image", image, "snapshot", snapRec.Name,
		"blocks_rewritten", rewritten, "blocks_unmapped", unmapped, "io_fenced", time.Since(fenced), "took", time.Since(start))
	return n.GetImage(ctx, image, api.BlockView{})
}
