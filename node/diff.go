package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/diffstream"
	"github.com/ukai-storage/ukai/target/scsi"
)

// ReadDiff implements api.Service: the changes from image's snapshot from
// to its snapshot name (image@snap), or with from empty all of that
// snapshot's data, as a diffstream, read on the image's owner.
//
// Only the blocks the older snapshot holds itself can differ (a block is
// preserved into a snapshot before the image first changes it: package
// cow), plus the part the image grew by in between; each is read in both
// snapshots and sent only when they differ, as zeros ('z') when the newer
// one reads as zeros. Holes stay holes: a full diff skips the blocks that
// read as zeros.
func (n *Node) ReadDiff(ctx context.Context, name, from string, start func(), w io.Writer) error {
	image, short, ok := meta.SplitSnapshotName(name)
	if !ok {
		return fmt.Errorf("%w: export-diff reads a snapshot (IMAGE@SNAPSHOT): an image in use changes while it is read", meta.ErrInvalid)
	}
	if err := meta.ValidateName(image); err != nil {
		return err
	}
	if from != "" {
		if err := meta.ValidateSnapshotName(from); err != nil {
			return err
		}
	}
	if c, err := n.remoteOwner(ctx, image); err != nil {
		return err
	} else if c != nil {
		return c.ReadDiff(ctx, name, from, start, w)
	}
	toRec, err := n.snapshotRecord(ctx, image, short)
	if err != nil {
		return err
	}
	var fromRec meta.Image
	if from != "" {
		if fromRec, err = n.snapshotRecord(ctx, image, from); err != nil {
			return err
		}
		if fromRec.ID == toRec.ID {
			return fmt.Errorf("%w: a diff from %s to itself", meta.ErrInvalid, name)
		}
	}
	s, done, err := n.ownOrigin(ctx, image)
	if err != nil {
		return err
	}
	defer done()
	if from != "" {
		// The origin lists its snapshots in the order they were taken.
		order := func(id string) int {
			return slices.IndexFunc(s.Record().Snapshots, func(r meta.SnapshotRef) bool { return r.ID == id })
		}
		if order(fromRec.ID) > order(toRec.ID) {
			return fmt.Errorf("%w: %s was taken after %s: give the older one as the start", meta.ErrInvalid, fromRec.Name, toRec.Name)
		}
	}
	own := func(rec meta.Image) (func(), error) {
		if !s.Record().HasSnapshot(rec.ID) {
			return nil, fmt.Errorf("%w: %s is not a snapshot of %s any more", meta.ErrImageNotFound, rec.Name, image)
		}
		sn, err := n.snapshotServed(ctx, meta.SnapshotRef{Name: rec.Name, ID: rec.ID})
		if err != nil {
			return nil, fmt.Errorf("snapshot %s: %w", rec.Name, err)
		}
		return n.ownSnapshot(ctx, sn)
	}
	toDone, err := own(toRec)
	if err != nil {
		return err
	}
	defer toDone()
	snTo := n.servedSnapshot(meta.SnapshotRef{Name: toRec.Name, ID: toRec.ID})
	bs := toRec.BlockSize
	blocks := toRec.Blocks()
	var candidates []int64
	snFrom := snTo
	if from == "" {
		for b := range blocks {
			candidates = append(candidates, b)
		}
	} else {
		fromDone, err := own(fromRec)
		if err != nil {
			return err
		}
		defer fromDone()
		snFrom = n.servedSnapshot(meta.SnapshotRef{Name: fromRec.Name, ID: fromRec.ID})
		if fromRec.BlockSize != bs {
			return fmt.Errorf("%w: %s and %s have different block sizes", meta.ErrInvalid, fromRec.Name, toRec.Name)
		}
		held, err := s.Cow.Held(ctx, cowImage{n, snFrom})
		if err != nil {
			return err
		}
		candidates = held
		// What the image grew by after the older snapshot (its last
		// block partial or not) is new.
		for b := fromRec.Size / bs; b < blocks; b++ {
			candidates = append(candidates, b)
		}
		slices.Sort(candidates)
		candidates = slices.Compact(candidates)
	}
	start()
	dw, err := diffstream.NewWriter(w, from, short, toRec.Size)
	if err != nil {
		return err
	}
	p := make([]byte, bs)
	q := make([]byte, bs)
	for _, b := range candidates {
		if b >= blocks {
			break
		}
		off := b * bs
		l := min(bs, toRec.Size-off)
		if n.snapshotHole(ctx, s, snTo, b) {
			if from == "" || (off+l <= fromRec.Size && n.snapshotHole(ctx, s, snFrom, b)) {
				continue
			}
			if err := dw.Zero(off, l); err != nil {
				return err
			}
			continue
		}
		pb := p[:l]
		if err := n.readSnapshot(ctx, s, snTo, pb, off); err != nil {
			return fmt.Errorf("read %s at %d: %w", toRec.Name, off, err)
		}
		if from != "" {
			qb := q[:l]
			clear(qb)
			if old := min(l, fromRec.Size-off); old > 0 {
				if err := n.readSnapshot(ctx, s, snFrom, qb[:old], off); err != nil {
					return fmt.Errorf("read %s at %d: %w", fromRec.Name, off, err)
				}
			}
			if bytes.Equal(pb, qb) {
				continue
			}
		}
		if scsi.AllZero(pb) {
			if from == "" {
				continue
			}
			err = dw.Zero(off, l)
		} else {
			err = dw.Data(off, pb)
		}
		if err != nil {
			return fmt.Errorf("send %s at %d: %w", toRec.Name, off, err)
		}
	}
	return dw.End()
}

// WriteDiff implements api.Service: a diffstream applied to image name
// through its owner, like any write (to every copy); 'z' ranges are
// unmapped (whole sectors) or written with zeros. An image smaller than
// the stream's size grows first; a larger one keeps what lies beyond.
// The copies are flushed at the end. A stream cut short or malformed
// stops with an error, the records before it applied: apply it again
// once whole.
//
// As rbd does, a diff from snapshot FROM applies only to an image that
// has a snapshot FROM (the chain of backups stays in order; opts.Force
// overrides), and the image gets a snapshot TO at the end, on which the
// next diff applies (unless opts.NoSnapshot).
func (n *Node) WriteDiff(ctx context.Context, name string, r io.Reader, opts api.DiffOptions) (api.DiffApplied, error) {
	var out api.DiffApplied
	if err := meta.ValidateName(name); err != nil {
		return out, err
	}
	dr, err := diffstream.NewReader(r)
	if err != nil {
		return out, fmt.Errorf("%w: %w", meta.ErrInvalid, err)
	}
	out.From, out.To, out.Size = dr.From, dr.To, dr.Size
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return out, err
	}
	if s.Record().IsSnapshot() {
		return out, fmt.Errorf("%w: %q is a snapshot: snapshots are read-only", meta.ErrInvalid, name)
	}
	if dr.From != "" && !opts.Force {
		if _, err := n.snapshotRecord(ctx, name, dr.From); errors.Is(err, meta.ErrImageNotFound) {
			return out, fmt.Errorf("%w: %s has no snapshot %s, where this diff starts: apply it to an image holding %s's data and take that snapshot first (ukai snapshot create %s), or give --force",
				meta.ErrConflict, name, dr.From, dr.From, meta.SnapshotName(name, dr.From))
		} else if err != nil {
			return out, err
		}
	}
	if dr.Size > s.Vol.Size() {
		if _, err := n.ResizeImage(ctx, name, dr.Size); err != nil {
			return out, fmt.Errorf("grow %s to the diff's %s: %w", name, meta.FormatSize(dr.Size), err)
		}
		if s, err = n.servedByName(ctx, name); err != nil {
			return out, err
		}
	}
	s.BeginBusy()
	defer s.EndBusy()
	g := n.router.Backend(s)
	buf := make([]byte, dataChunk)
	for {
		rec, err := dr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if errors.Is(err, diffstream.ErrMalformed) {
				err = fmt.Errorf("%w: %w", meta.ErrInvalid, err)
			}
			return out, fmt.Errorf("after %d bytes written and %d zeroed: %w", out.Written, out.Zeroed, err)
		}
		for done := int64(0); done < rec.Len; {
			k := min(rec.Len-done, dataChunk)
			off := rec.Off + done
			p := buf[:k]
			if rec.Kind == 'w' {
				if _, err := io.ReadFull(rec.Data, p); err != nil {
					return out, fmt.Errorf("%w: read the diff's data at %d: %w", meta.ErrInvalid, off, err)
				}
				if err := g.WriteAt(ctx, p, off, false); err != nil {
					return out, fmt.Errorf("write %s at %d: %w", name, off, err)
				}
				out.Written += k
			} else {
				if off%meta.SectorSize == 0 && k%meta.SectorSize == 0 {
					err = g.Unmap(ctx, off, k)
				} else {
					clear(p)
					err = g.WriteAt(ctx, p, off, false)
				}
				if err != nil {
					return out, fmt.Errorf("zero %s at %d: %w", name, off, err)
				}
				out.Zeroed += k
			}
			done += k
		}
	}
	if err := g.Flush(ctx); err != nil {
		return out, fmt.Errorf("flush %s: %w", name, err)
	}
	if dr.To != "" && !opts.NoSnapshot && meta.ValidateSnapshotName(dr.To) == nil {
		if _, err := n.snapshotRecord(ctx, name, dr.To); errors.Is(err, meta.ErrImageNotFound) {
			if _, err := n.CreateSnapshot(ctx, name, api.SnapshotRequest{Name: dr.To}); err != nil {
				return out, fmt.Errorf("the diff is applied, but the snapshot %s of its end could not be taken: %w", meta.SnapshotName(name, dr.To), err)
			}
			out.Snapshot = meta.SnapshotName(name, dr.To)
		}
	}
	return out, nil
}
